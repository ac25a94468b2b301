"""A bundle's ``postprocessing``, mapped onto how the pipeline turns logits into labels on the input grid.

Reproduced: an activation (``Activationsd``: softmax or sigmoid), ``Invertd`` of the preprocessing
(which must be there: DeepSeg writes labels on the input grid), and the labels by argmax or a 0.5
threshold (``AsDiscreted``), before or after the inversion. Transforms that only write files or
convert types are ignored; label post-processing (connected components, fill holes, ...) is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .walker import ConfigWalker, transform_name

PRED_KEY = "pred"
#: transforms that write files or only convert types: no effect on the labels.
IGNORED_POSTPROCESSING = frozenset({"SaveImaged", "SaveImage", "EnsureTyped", "ToTensord", "ToNumpyd", "CopyItemsd"})
#: Invertd's arguments and MONAI's defaults (``transform`` is checked on its own: it must be ``@preprocessing``).
INVERTD_ARGS: dict[str, Any] = {
    "transform": None,
    "orig_keys": None,
    "orig_meta_keys": None,
    "nearest_interp": True,
    "to_tensor": True,
    "device": None,
    "post_func": None,
}
#: AsDiscreted's arguments and MONAI's defaults.
ASDISCRETED_ARGS: dict[str, Any] = {
    "argmax": False,
    "to_onehot": None,
    "threshold": None,
    "rounding": None,
    "dim": 0,
    "keepdim": True,
    "dtype": None,
}


@dataclass
class _Found:
    """What the postprocessing transforms do, and where (their index in the Compose)."""

    activation: str | None = None
    argmax_at: int | None = None
    threshold_at: int | None = None
    invert_at: int | None = None
    nearest: bool = True
    argmax_with_threshold: bool = False


def map_postprocessing(walker: ConfigWalker, steps: list[dict[str, Any]] | None = None) -> dict[str, Any] | None:
    """The pipeline's ``postprocessing`` settings (activation, argmax position, inversion), or None.

    ``steps``: the mapped preprocessing (:func:`.preprocessing.map_preprocessing`); ``Invertd`` undoes a
    ``Spacingd`` with the mode of the forward pass unless ``nearest_interp`` asks for nearest.
    """
    compose = walker.component(walker.config.get("postprocessing"), "postprocessing")
    if compose is None:
        return None
    transforms = compose.get("transforms", []) if transform_name(compose.get("_target_")) == "Compose" else [compose]
    while isinstance(transforms, str) and transforms.startswith("@"):
        transforms = walker.raw(transforms[1:])
    if not isinstance(transforms, list):
        walker.problem("postprocessing", "transforms must be a list")
        return None
    found = _Found()
    for index, item in enumerate(transforms):
        where = f"postprocessing[{index}]"
        component = walker.component(item, where)
        if component is None:
            continue
        name = transform_name(component.get("_target_"))
        if name in IGNORED_POSTPROCESSING:
            continue
        if "keys" in component and not walker.touches(component, where, PRED_KEY):
            continue  # e.g. an AsDiscreted of the "label" key kept from the evaluation config
        handler = HANDLERS.get(name) if name is not None else None
        if handler is None:
            walker.problem(where, f"{name or component.get('_target_')!r} (label post-processing is not reproduced)")
            continue
        handler(walker, found, index, item, component)
    return _settings(walker, found, steps or [])


def _activation(walker: ConfigWalker, found: _Found, index: int, item: Any, component: dict[str, Any]) -> None:
    where, name = f"postprocessing[{index}]", "Activationsd"
    args = walker.arguments(component, name, where, {"softmax": False, "sigmoid": False, "other": None})
    if args is None:
        return
    if args["other"] is not None or args["softmax"] == args["sigmoid"]:
        walker.problem(where, f"{name}: exactly one of softmax / sigmoid (no 'other' function)")
        return
    if found.invert_at is not None:
        walker.problem(where, f"{name} after Invertd (the activation must come before the inversion)")
    found.activation = "softmax" if args["softmax"] else "sigmoid"


def _invert(walker: ConfigWalker, found: _Found, index: int, item: Any, component: dict[str, Any]) -> None:
    where, name = f"postprocessing[{index}]", "Invertd"
    # the transform as written: its "@preprocessing" reference names what is inverted
    raw = item if isinstance(item, Mapping) else component
    inverted = raw.get("transform")
    if inverted != "@preprocessing":
        walker.problem(where, f"{name}: transform {str(inverted)[:40]!r} (only '@preprocessing' is reproduced)")
    args = walker.arguments({k: v for k, v in component.items() if k != "transform"}, name, where, INVERTD_ARGS)
    if args is None:
        return
    orig = args["orig_keys"]
    if (orig[0] if isinstance(orig, list) else orig) != walker.image_key:
        walker.problem(where, f"{name}: orig_keys {orig!r} (expected the image key {walker.image_key!r})")
    if args["post_func"] is not None:
        walker.problem(where, f"{name}: post_func")
    nearest_value = args["nearest_interp"]
    found.nearest = bool(nearest_value[0] if isinstance(nearest_value, list) else nearest_value)
    found.invert_at = index


def _as_discrete(walker: ConfigWalker, found: _Found, index: int, item: Any, component: dict[str, Any]) -> None:
    where, name = f"postprocessing[{index}]", "AsDiscreted"
    args = walker.arguments(component, name, where, ASDISCRETED_ARGS)
    if args is None:
        return
    if args["to_onehot"] is not None or args["rounding"] is not None or args["dim"] != 0:
        walker.problem(where, f"{name}: to_onehot / rounding / dim (only argmax or a 0.5 threshold)")
    elif args["argmax"]:
        found.argmax_at = index
        # MONAI thresholds the argmax's labels: every foreground label becomes 1
        found.argmax_with_threshold = args["threshold"] is not None
    elif args["threshold"] == 0.5:
        found.threshold_at = index
    else:
        walker.problem(where, f"{name}: threshold {args['threshold']!r} (only 0.5 after a sigmoid)")


#: MONAI transform name -> handler ``(walker, found, index, item as written, component)``.
HANDLERS: dict[str, Callable[[ConfigWalker, _Found, int, Any, dict[str, Any]], None]] = {
    "Activationsd": _activation,
    "Invertd": _invert,
    "AsDiscreted": _as_discrete,
}


def _settings(walker: ConfigWalker, found: _Found, steps: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The settings once every transform was seen; None (with a problem) without an Invertd."""
    if found.invert_at is None:
        walker.problem(
            "postprocessing", "no Invertd: the bundle writes labels on its own resampled grid, DeepSeg on the input grid"
        )
        return None
    decided_at = found.argmax_at if found.argmax_at is not None else found.threshold_at
    if found.activation == "sigmoid" and found.argmax_at is not None:
        walker.problem("postprocessing", "argmax after a sigmoid (multi-label outputs are not reproduced)")
    if found.argmax_with_threshold:
        walker.problem("postprocessing", "AsDiscreted: argmax with a threshold (MONAI merges every label into 1)")
    if found.threshold_at is not None and found.argmax_at is None and found.activation != "sigmoid":
        walker.problem(
            "postprocessing",
            f"AsDiscreted: a 0.5 threshold after {found.activation or 'no'} activation (per-channel masks; only a"
            " 0.5 threshold of one sigmoid output is reproduced)",
        )
    # Invertd(nearest_interp=False) resamples back with the mode its Spacingd used going forward; without a
    # Spacingd nothing is interpolated
    spacing_modes = [step.get("mode") for step in steps if step.get("op") == "spacing"]
    if not found.nearest and all(mode == "nearest" for mode in spacing_modes):
        found.nearest = True
    before = decided_at is not None and decided_at < found.invert_at
    if before and not found.nearest:
        walker.problem(
            "postprocessing",
            "labels taken before Invertd(nearest_interp=False) are interpolated linearly (fractional label values)",
        )
    return {
        "activation": found.activation or "none",
        "argmax_before_invert": bool(before),
        "invert_interpolation": "nearest" if found.nearest else "linear",
    }
