"""A bundle's ``preprocessing`` Compose, mapped transform by transform onto the pipeline's steps.

Each MONAI transform DeepSeg reproduces exactly (:mod:`deepseg_core.pipelines.monai_bundle`) has a
handler here that checks its arguments and returns the step (or None for transforms that do not
change the image, such as ``LoadImaged`` or ``EnsureTyped``). Anything else is a problem: random
transforms, ``Lambdad`` and custom ``scripts.*`` code, unsupported arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .walker import ConfigWalker, transform_name


def map_preprocessing(walker: ConfigWalker) -> list[dict[str, Any]]:
    """The pipeline's ``steps`` (in the bundle's order) for the transforms that touch the image key."""
    compose = walker.component(walker.config.get("preprocessing"), "preprocessing")
    if compose is None:
        return []
    if transform_name(compose.get("_target_")) != "Compose":
        walker.problem("preprocessing", f"expected a Compose of transforms, found {compose.get('_target_')!r}")
        return []
    extra = sorted(set(compose) - {"_target_", "transforms", "_desc_", "map_items", "unpack_items", "log_stats"})
    if extra:
        walker.problem("preprocessing", f"Compose argument(s) {extra} are not supported (e.g. lazy resampling)")
    transforms = compose.get("transforms", [])
    while isinstance(transforms, str) and transforms.startswith("@"):
        transforms = walker.raw(transforms[1:])
    if not isinstance(transforms, list):
        walker.problem("preprocessing", f"transforms must be a list, found {str(transforms)[:60]!r}")
        return []
    steps: list[dict[str, Any]] = []
    for index, item in enumerate(transforms):
        where = f"preprocessing[{index}]"
        component = walker.component(item, where)
        if component is None:
            continue
        name = transform_name(component.get("_target_"))
        if name is None:
            walker.problem(where, f"{component.get('_target_')!r} is not a MONAI transform (custom code is not run)")
            continue
        handler = HANDLERS.get(name)
        if handler is None:
            if name.startswith("Rand"):
                why = "a random transform"
            elif name.startswith("Lambda"):
                why = "runs a Python function from the config"
            else:
                why = "not reproduced by DeepSeg"
            walker.problem(where, f"{name} ({why})")
            continue
        if not walker.for_image(component, where) and name != "LoadImaged":
            continue
        step = handler(walker, component, name, where)
        if step is not None:
            steps.append(step)
    return steps


def _load_image(walker: ConfigWalker, component: dict[str, Any], name: str, where: str) -> None:
    allowed = {
        "reader": None,
        "image_only": True,
        "dtype": "float32",
        "ensure_channel_first": False,
        "simple_keys": False,
        "prune_meta_pattern": None,
        "prune_meta_sep": ".",
        "expanduser": True,
        "overwriting": False,
    }
    args = walker.arguments(component, name, where, allowed)
    if args is None:
        return None
    if args["reader"] not in (None, "NibabelReader", "ITKReader", "nibabelreader", "itkreader"):
        walker.problem(where, f"{name}: reader {args['reader']!r} (DeepSeg reads images itself; NIfTI/ITK geometry only)")
    walker.float32_dtype(name, where, args["dtype"])
    return None


def _noop(walker: ConfigWalker, component: dict[str, Any], name: str, where: str, allowed: dict[str, Any]) -> None:
    args = walker.arguments(component, name, where, allowed)
    if args is not None and "dtype" in args:
        walker.float32_dtype(name, where, args["dtype"])
    return None


def _ensure_channel_first(walker: ConfigWalker, component: dict[str, Any], name: str, where: str) -> None:
    return _noop(walker, component, name, where, {"channel_dim": None, "strict_check": True})


def _ensure_type(walker: ConfigWalker, component: dict[str, Any], name: str, where: str) -> None:
    allowed = {"data_type": "tensor", "dtype": None, "device": None, "wrap_sequence": False, "track_meta": None}
    return _noop(walker, component, name, where, allowed)


def _to_tensor(walker: ConfigWalker, component: dict[str, Any], name: str, where: str) -> None:
    return _noop(walker, component, name, where, {"dtype": None, "device": None, "wrap_sequence": True, "track_meta": None})


def _cast_to_type(walker: ConfigWalker, component: dict[str, Any], name: str, where: str) -> None:
    return _noop(walker, component, name, where, {"dtype": "float32"})


def _orientation(walker: ConfigWalker, component: dict[str, Any], name: str, where: str) -> dict[str, Any] | None:
    args = walker.arguments(
        component, name, where, {"axcodes": None, "as_closest_canonical": False, "labels": None, "lazy": False}
    )
    if args is None:
        return None
    codes = "RAS" if args["as_closest_canonical"] else args["axcodes"]
    ok = (
        isinstance(codes, str)
        and len(codes) == 3
        and sorted("".join(codes).upper().translate(str.maketrans("LPI", "RAS"))) == ["A", "R", "S"]
    )
    if not ok:
        walker.problem(where, f"{name}: axcodes {codes!r} (expected one letter of L/R, P/A, I/S each)")
    if args["labels"] not in (None, [["L", "R"], ["P", "A"], ["I", "S"]]):
        walker.problem(where, f"{name}: labels {args['labels']!r} (only nibabel's default L-R, P-A, I-S)")
    if args["lazy"]:
        walker.problem(where, f"{name}: lazy resampling (fuses orientation and spacing into one resampling)")
    return {"op": "orientation", "axcodes": codes.upper()} if ok else None


def _spacing(walker: ConfigWalker, component: dict[str, Any], name: str, where: str) -> dict[str, Any] | None:
    allowed = {
        "pixdim": None,
        "diagonal": False,
        "mode": "bilinear",
        "padding_mode": "border",
        "align_corners": False,
        "dtype": "float64",
        "scale_extent": False,
        "recompute_affine": False,
        "min_pixdim": None,
        "max_pixdim": None,
        "ensure_same_shape": True,
        "lazy": False,
    }
    args = walker.arguments(component, name, where, allowed)
    if args is None:
        return None
    pixdim = args["pixdim"]
    pixdim = [pixdim] if isinstance(pixdim, int | float) else pixdim
    if isinstance(pixdim, list) and 0 < len(pixdim) < 3:
        pixdim = pixdim + [pixdim[-1]] * (3 - len(pixdim))  # MONAI repeats the last value
    valid = isinstance(pixdim, list) and len(pixdim) == 3 and all(isinstance(v, int | float) and v > 0 for v in pixdim)
    if not valid:
        walker.problem(
            where, f"{name}: pixdim {args['pixdim']!r} (3 positive spacings; 'keep the input spacing' is not reproduced)"
        )
    mode = walker.per_key(args["mode"], component, where)
    padding = walker.per_key(args["padding_mode"], component, where)
    checks = [
        (mode in ("bilinear", "nearest"), f"mode {mode!r} (bilinear or nearest only; spline orders are not reproduced)"),
        (padding == "border", f"padding_mode {padding!r} (only the default 'border')"),
        (not args["diagonal"], "diagonal=True (drops the rotation)"),
        (not args["align_corners"], "align_corners=True"),
        (not args["scale_extent"], "scale_extent=True"),
        (not args["recompute_affine"], "recompute_affine=True"),
        (args["min_pixdim"] is None and args["max_pixdim"] is None, "min_pixdim / max_pixdim"),
        (not args["lazy"], "lazy resampling"),
    ]
    for ok, text in checks:
        if not ok:
            walker.problem(where, f"{name}: {text}")
    walker.float32_dtype(name, where, args["dtype"], accept_float64=True)
    if not valid or not all(ok for ok, _ in checks):
        return None
    return {"op": "spacing", "pixdim_xyz_mm": [float(v) for v in pixdim], "mode": mode}


def _scale_intensity_range(walker: ConfigWalker, component: dict[str, Any], name: str, where: str) -> dict[str, Any] | None:
    allowed = {"a_min": None, "a_max": None, "b_min": None, "b_max": None, "clip": False, "dtype": "float32"}
    args = walker.arguments(component, name, where, allowed)
    if args is None:
        return None
    walker.float32_dtype(name, where, args["dtype"])
    if not all(isinstance(args[k], int | float) and not isinstance(args[k], bool) for k in ("a_min", "a_max")):
        walker.problem(where, f"{name}: a_min / a_max must be numbers, found {args['a_min']!r} / {args['a_max']!r}")
        return None
    return {
        "op": "scale_intensity_range",
        **{k: args[k] for k in ("a_min", "a_max", "b_min", "b_max")},
        "clip": bool(args["clip"]),
    }


def _scale_intensity(walker: ConfigWalker, component: dict[str, Any], name: str, where: str) -> dict[str, Any] | None:
    allowed = {"minv": 0.0, "maxv": 1.0, "factor": None, "channel_wise": False, "dtype": "float32"}
    args = walker.arguments(component, name, where, allowed)
    if args is None:
        return None
    walker.float32_dtype(name, where, args["dtype"])
    if args["factor"] is not None or args["minv"] is None or args["maxv"] is None:
        walker.problem(where, f"{name}: factor / minv=None / maxv=None (only min-max rescaling is reproduced)")
        return None
    return {"op": "scale_intensity", "minv": args["minv"], "maxv": args["maxv"], "channel_wise": bool(args["channel_wise"])}


def _normalize_intensity(walker: ConfigWalker, component: dict[str, Any], name: str, where: str) -> dict[str, Any] | None:
    allowed = {"subtrahend": None, "divisor": None, "nonzero": False, "channel_wise": False, "dtype": "float32"}
    args = walker.arguments(component, name, where, allowed)
    if args is None:
        return None
    walker.float32_dtype(name, where, args["dtype"])
    for key in ("subtrahend", "divisor"):
        if isinstance(args[key], list) and not args["channel_wise"]:
            walker.problem(where, f"{name}: a per-channel {key} without channel_wise")
            return None
    return {
        "op": "normalize_intensity",
        "subtrahend": args["subtrahend"],
        "divisor": args["divisor"],
        "nonzero": bool(args["nonzero"]),
        "channel_wise": bool(args["channel_wise"]),
    }


def _scale_intensity_range_percentiles(
    walker: ConfigWalker, component: dict[str, Any], name: str, where: str
) -> dict[str, Any] | None:
    allowed = {
        "lower": None,
        "upper": None,
        "b_min": None,
        "b_max": None,
        "clip": False,
        "relative": False,
        "channel_wise": False,
        "dtype": "float32",
    }
    args = walker.arguments(component, name, where, allowed)
    if args is None:
        return None
    walker.float32_dtype(name, where, args["dtype"])
    return {"op": "scale_intensity_range_percentiles", **{k: args[k] for k in allowed if k != "dtype"}}


def _crop_foreground(walker: ConfigWalker, component: dict[str, Any], name: str, where: str) -> dict[str, Any] | None:
    allowed = {
        "source_key": None,
        "select_fn": None,
        "channel_indices": None,
        "margin": 0,
        "allow_smaller": False,  # MONAI >= 1.5's default
        "k_divisible": 1,
        "mode": "constant",
        "start_coord_key": "foreground_start_coord",
        "end_coord_key": "foreground_end_coord",
        "lazy": False,
    }
    args = walker.arguments(component, name, where, allowed)
    if args is None:
        return None
    margin = args["margin"]
    margin = [margin] * 3 if isinstance(margin, int) else margin
    checks = [
        (args["source_key"] == walker.image_key, f"source_key {args['source_key']!r} (only the image itself)"),
        (args["select_fn"] is None, "a custom select_fn"),
        (args["channel_indices"] is None, "channel_indices"),
        (args["k_divisible"] in (1, [1, 1, 1]), f"k_divisible {args['k_divisible']!r}"),
        (
            isinstance(margin, list) and len(margin) == 3 and all(isinstance(m, int) and m >= 0 for m in margin),
            f"margin {margin!r}",
        ),
        (not args["lazy"], "lazy resampling"),
    ]
    # padding beyond the image happens only with a margin and allow_smaller=False; then only zeros are reproduced
    may_pad = not args["allow_smaller"] and isinstance(margin, list) and any(margin)
    checks.append((not may_pad or args["mode"] == "constant", f"padding mode {args['mode']!r} beyond the image"))
    for ok, text in checks:
        if not ok:
            walker.problem(where, f"{name}: {text}")
    if not all(ok for ok, _ in checks):
        return None
    return {"op": "crop_foreground", "margin_xyz": [int(m) for m in margin], "allow_smaller": bool(args["allow_smaller"])}


#: MONAI transform name -> handler ``(walker, component, name, where) -> step or None``.
HANDLERS: dict[str, Callable[[ConfigWalker, dict[str, Any], str, str], dict[str, Any] | None]] = {
    "LoadImaged": _load_image,
    "EnsureChannelFirstd": _ensure_channel_first,
    "EnsureTyped": _ensure_type,
    "ToTensord": _to_tensor,
    "CastToTyped": _cast_to_type,
    "Orientationd": _orientation,
    "Spacingd": _spacing,
    "ScaleIntensityRanged": _scale_intensity_range,
    "ScaleIntensityd": _scale_intensity,
    "NormalizeIntensityd": _normalize_intensity,
    "ScaleIntensityRangePercentilesd": _scale_intensity_range_percentiles,
    "CropForegroundd": _crop_foreground,
}
