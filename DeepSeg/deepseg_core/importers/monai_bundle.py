"""Import a MONAI bundle (``configs/metadata.json``, ``configs/inference.json``, ``models/model.pt``).

The bundle's configs are read as *data*: nothing in them is evaluated. What DeepSeg needs is
mapped onto its own pieces:

- the network: ``network_def`` with its ``@`` references resolved to literals, checked (only
  classes of ``monai.networks.nets``, no ``$`` expressions, macros or weight-fetching arguments;
  :mod:`deepseg_core.nets.monai_network`) and rebuilt by MONAI's ConfigParser;
- the weights: ``models/model.pt`` loaded with ``torch.load(weights_only=True)`` only (a state dict,
  or a checkpoint holding one under ``"model"``, as MONAI's CheckpointLoader reads it) and stored as
  safetensors; the pickle is never kept. A bundle with only ``models/model.ts`` (TorchScript, which
  carries code) is refused;
- ``preprocessing``, ``inferer`` and ``postprocessing``: mapped transform by transform onto the
  ``monai_bundle`` pipeline (:mod:`deepseg_core.pipelines.monai_bundle`, which reproduces MONAI's
  semantics exactly). Anything the mapping does not reproduce exactly (random transforms, custom
  ``scripts.*`` code, ``Lambdad``, label post-processing, other inferers, unsupported arguments)
  is refused with ONE error that lists every such item;
- the card: labels from the output ``channel_def`` of ``network_data_format`` (colours from a
  fixed palette, Slicer terminology codes where :mod:`deepseg_core.terminology` knows the name),
  inputs, the closest DeepSeg normalisation (for the domain check only), the sliding-window
  defaults, and ``source`` with the SHA-256 of every file read.

Importing the same files again returns the version already stored.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import io
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import to_dict
from ..errors import ConfigError
from ..model_card import (
    Architecture,
    InferenceDefaults,
    Inputs,
    LabelSpec,
    ModelCard,
    ModelError,
    Normalization,
    Preprocessing,
    TerminologyCode,
)
from ..nets.monai_network import (
    MonaiNetConfig,
    MonaiNetwork,
    check_network_def,
    lookup_id,
    require_monai,
    resolve_references,
)

log = logging.getLogger(__name__)

FORMAT = "monai_bundle"
METADATA = "configs/metadata.json"
INFERENCE_CANDIDATES = ("configs/inference.json", "configs/inference.yaml", "configs/inference.yml")
WEIGHTS = "models/model.pt"
TORCHSCRIPT = "models/model.ts"
PRED_KEY = "pred"

#: label colours (RGB 0..1), by label value - 1; repeats after the last.
PALETTE: tuple[tuple[float, float, float], ...] = (
    (0.863, 0.078, 0.235),
    (0.118, 0.565, 1.000),
    (0.196, 0.804, 0.196),
    (1.000, 0.647, 0.000),
    (0.576, 0.439, 0.859),
    (0.000, 0.808, 0.820),
    (1.000, 0.843, 0.000),
    (0.780, 0.082, 0.522),
    (0.545, 0.271, 0.075),
    (0.498, 1.000, 0.831),
    (0.275, 0.510, 0.706),
    (0.933, 0.510, 0.933),
)

#: dtype spellings accepted as plain values (the ``$`` forms are the only expressions allowed, and only here).
FLOAT_DTYPES = {
    "float32": "float32",
    "np.float32": "float32",
    "numpy.float32": "float32",
    "torch.float32": "float32",
    "float64": "float64",
    "np.float64": "float64",
    "numpy.float64": "float64",
    "torch.float64": "float64",
}
DTYPE_ARGS = ("dtype", "output_dtype")
#: arguments that only name keys, metadata bookkeeping or I/O details; they never change the result.
COMMON_ARGS = frozenset({"keys", "allow_missing_keys", "meta_keys", "meta_key_postfix", "_desc_"})
#: transforms that write files or only convert types: no effect on the labels.
IGNORED_POSTPROCESSING = frozenset({"SaveImaged", "SaveImage", "EnsureTyped", "ToTensord", "ToNumpyd", "CopyItemsd"})
#: inferers whose result equals SlidingWindowInferer's (Adapt only changes devices and buffering on OOM).
SLIDING_WINDOW_INFERERS = frozenset({"SlidingWindowInferer", "SlidingWindowInfererAdapt"})


@dataclass
class BundleSource:
    """What was read from a bundle folder.

    Attributes:
        folder: the bundle folder.
        files: relative path -> SHA-256 of every file read.
        metadata: ``configs/metadata.json``.
        config: the inference config (JSON or YAML) with the metadata under ``_meta_``.
        config_file: relative path of the inference config.
        weights: the bytes of ``models/model.pt``.
    """

    folder: Path
    files: dict[str, str]
    metadata: dict[str, Any]
    config: dict[str, Any]
    config_file: str
    weights: bytes


@dataclass
class BundleMapping:
    """The DeepSeg side of a bundle, before the weights are loaded."""

    network: MonaiNetConfig
    pipeline_config: dict[str, Any]
    labels: tuple[LabelSpec, ...]
    inputs: Inputs
    normalization: Normalization
    target_spacing_xyz_mm: tuple[float, float, float]
    inference: InferenceDefaults


# ------------------------------------------------------------------------------------------------
# reading


def _read(folder: Path, relative: str, files: dict[str, str]) -> bytes:
    data = (folder / relative).read_bytes()
    files[relative] = hashlib.sha256(data).hexdigest()
    return data


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise ValueError(f"duplicate keys {duplicates}")
    return dict(pairs)


def _parse_config(data: bytes, relative: str, folder: Path) -> dict[str, Any]:
    subject = folder / relative
    if relative.endswith((".yaml", ".yml")):
        if importlib.util.find_spec("yaml") is None:
            raise ModelError(
                "this bundle's inference config is YAML, and reading YAML needs PyYAML",
                subject=subject,
                expected="the pyyaml package",
                hint="pip install pyyaml, then import again.",
            )
        import yaml

        try:
            parsed = yaml.safe_load(data.decode("utf-8"))  # safe_load builds plain data only, never objects
        except yaml.YAMLError as exc:
            raise ModelError(f"not valid YAML ({exc})", subject=subject) from None
    else:
        try:
            parsed = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as exc:
            raise ModelError(f"not valid JSON ({exc})", subject=subject) from None
    if not isinstance(parsed, dict):
        raise ModelError("a bundle config must be a JSON object / YAML mapping", subject=subject, found=type(parsed).__name__)
    return parsed


def read_bundle(folder: str | Path) -> BundleSource:
    """Read a bundle's metadata, inference config and weights (bytes), hashing each file.

    Raises:
        ModelError: a file is missing or unreadable, or the bundle has only a TorchScript export.
    """
    folder = Path(folder)
    files: dict[str, str] = {}
    if not (folder / METADATA).is_file():
        raise ModelError("not a MONAI bundle: configs/metadata.json is missing", subject=folder)
    metadata = _parse_config(_read(folder, METADATA, files), METADATA, folder)
    config_file = next((c for c in INFERENCE_CANDIDATES if (folder / c).is_file()), None)
    if config_file is None:
        raise ModelError(
            "not a MONAI bundle with an inference config",
            subject=folder / "configs",
            expected="configs/inference.json (or .yaml)",
            found=", ".join(sorted(p.name for p in (folder / "configs").iterdir())),
        )
    config = _parse_config(_read(folder, config_file, files), config_file, folder)
    if not (folder / WEIGHTS).is_file():
        if (folder / TORCHSCRIPT).is_file():
            raise ModelError(
                "this bundle has only a TorchScript export (models/model.ts), which DeepSeg does not import",
                subject=folder / TORCHSCRIPT,
                expected="the weights as a state dict in models/model.pt",
                found="models/model.ts only",
                hint="A TorchScript archive carries code as well as weights. Get the bundle's models/model.pt (the "
                "model zoo's large_files.yml lists it), or save the state dict where you trust the archive: "
                "torch.save(torch.jit.load('model.ts').state_dict(), 'models/model.pt').",
            )
        raise ModelError("the bundle's weights are missing", subject=folder / WEIGHTS, expected="models/model.pt")
    weights = _read(folder, WEIGHTS, files)
    return BundleSource(folder, files, metadata, {**config, "_meta_": metadata}, config_file, weights)


# ------------------------------------------------------------------------------------------------
# mapping


def _transform_name(target: Any) -> str | None:
    """``Spacingd`` for ``Spacingd`` / ``monai.transforms.Spacingd`` / ``monai.transforms.spatial.dictionary.Spacingd``."""
    if not isinstance(target, str) or not target or target[0] in "$@%":
        return None
    if "." not in target:
        return target
    module, _, name = target.rpartition(".")
    if (
        module == "monai.transforms"
        or module.startswith("monai.transforms.")
        or module in ("monai.inferers", "monai.inferers.inferer")
    ):
        return name
    return None


class _Mapper:
    """Walks one bundle config; records every unsupported item instead of stopping at the first."""

    def __init__(self, source: BundleSource) -> None:
        self.source = source
        self.config = source.config
        self.problems: list[str] = []
        key = self.config.get("image_key", "image")
        self.image_key = key if isinstance(key, str) and key[:1] not in "$@%" else "image"

    # ---------------------------------------------------------------- helpers
    def problem(self, where: str, text: str) -> None:
        self.problems.append(f"{where}: {text}")

    def raw(self, ref_id: str) -> Any:
        try:
            return lookup_id(self.config, ref_id)
        except KeyError:
            return None

    def value(self, value: Any, where: str) -> Any:
        """``value`` with references resolved; ``$`` / ``%`` strings become problems."""
        return resolve_references(value, self.config, where, self.problems)

    def component(self, value: Any, where: str) -> dict[str, Any] | None:
        """A component dict (``@`` references followed), or None with a problem."""
        seen = 0
        while isinstance(value, str) and value.startswith("@") and seen < 16:
            value = self.raw(value[1:])
            seen += 1
        if isinstance(value, str) and value.startswith("$"):
            self.problem(where, f"built by a Python expression {value[:60]!r} (DeepSeg evaluates no bundle code)")
            return None
        if not isinstance(value, Mapping) or "_target_" not in value:
            self.problem(where, f"expected a MONAI component with a _target_, found {type(value).__name__}")
            return None
        return dict(value)

    def arguments(self, component: dict[str, Any], name: str, where: str, allowed: dict[str, Any]) -> dict[str, Any] | None:
        """The component's arguments with defaults from ``allowed``; unknown ones are problems."""
        ok = True
        for reserved in ("_requires_", "_disabled_", "_mode_"):
            if reserved in component:
                self.problem(where, f"{name}: {reserved} is not supported")
                ok = False
        unknown = sorted(set(component) - set(allowed) - COMMON_ARGS - {"_target_", "_requires_", "_disabled_", "_mode_"})
        if unknown:
            self.problem(where, f"{name}: argument(s) {unknown} are not supported")
            ok = False
        args: dict[str, Any] = {}
        for key, default in allowed.items():
            raw = component.get(key, default)
            if key in DTYPE_ARGS and isinstance(raw, str) and raw.lstrip("$") in FLOAT_DTYPES:
                args[key] = FLOAT_DTYPES[raw.lstrip("$")]
                continue
            before = len(self.problems)
            args[key] = self.value(raw, f"{where} {name}.{key}")
            ok = ok and len(self.problems) == before
        return args if ok else None

    def for_image(self, component: dict[str, Any], where: str) -> bool:
        """True when the transform touches the image key."""
        keys = self.value(component.get("keys", []), f"{where} keys")
        keys = [keys] if isinstance(keys, str) else list(keys or [])
        return self.image_key in keys

    def per_key(self, value: Any, component: dict[str, Any], where: str) -> Any:
        """The image key's entry of a per-key argument (``mode=["bilinear", "nearest"]``)."""
        if isinstance(value, list | tuple):
            keys = resolve_references(component.get("keys", []), self.config, where, [])  # reported by for_image
            keys = [keys] if isinstance(keys, str) else list(keys)
            return value[keys.index(self.image_key)] if self.image_key in keys and len(value) == len(keys) else value[0]
        return value

    def float32_dtype(self, name: str, where: str, value: Any, accept_float64: bool = False) -> None:
        if value is None or value == "float32" or (accept_float64 and value == "float64"):
            return
        self.problem(where, f"{name}: dtype {value!r} changes the values (only float32 is reproduced)")

    # ---------------------------------------------------------------- preprocessing
    def preprocessing(self) -> list[dict[str, Any]]:
        compose = self.component(self.config.get("preprocessing"), "preprocessing")
        if compose is None:
            return []
        if _transform_name(compose.get("_target_")) != "Compose":
            self.problem("preprocessing", f"expected a Compose of transforms, found {compose.get('_target_')!r}")
            return []
        extra = sorted(set(compose) - {"_target_", "transforms", "_desc_", "map_items", "unpack_items", "log_stats"})
        if extra:
            self.problem("preprocessing", f"Compose argument(s) {extra} are not supported (e.g. lazy resampling)")
        transforms = compose.get("transforms", [])
        while isinstance(transforms, str) and transforms.startswith("@"):
            transforms = self.raw(transforms[1:])
        if not isinstance(transforms, list):
            self.problem("preprocessing", f"transforms must be a list, found {str(transforms)[:60]!r}")
            return []
        steps: list[dict[str, Any]] = []
        for index, item in enumerate(transforms):
            where = f"preprocessing[{index}]"
            component = self.component(item, where)
            if component is None:
                continue
            name = _transform_name(component.get("_target_"))
            if name is None:
                self.problem(where, f"{component.get('_target_')!r} is not a MONAI transform (custom code is not run)")
                continue
            handler = getattr(self, f"_pre_{name}", None)
            if handler is None:
                if name.startswith("Rand"):
                    why = "a random transform"
                elif name.startswith("Lambda"):
                    why = "runs a Python function from the config"
                else:
                    why = "not reproduced by DeepSeg"
                self.problem(where, f"{name} ({why})")
                continue
            if not self.for_image(component, where) and name != "LoadImaged":
                continue
            step = handler(component, name, where)
            if step is not None:
                steps.append(step)
        return steps

    def _pre_LoadImaged(self, component: dict[str, Any], name: str, where: str) -> None:  # noqa: N802
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
        args = self.arguments(component, name, where, allowed)
        if args is None:
            return None
        if args["reader"] not in (None, "NibabelReader", "ITKReader", "nibabelreader", "itkreader"):
            self.problem(where, f"{name}: reader {args['reader']!r} (DeepSeg reads images itself; NIfTI/ITK geometry only)")
        self.float32_dtype(name, where, args["dtype"])
        return None

    def _noop(self, component: dict[str, Any], name: str, where: str, allowed: dict[str, Any]) -> None:
        args = self.arguments(component, name, where, allowed)
        if args is not None and "dtype" in args:
            self.float32_dtype(name, where, args["dtype"])
        return None

    def _pre_EnsureChannelFirstd(self, component: dict[str, Any], name: str, where: str) -> None:  # noqa: N802
        return self._noop(component, name, where, {"channel_dim": None, "strict_check": True})

    def _pre_EnsureTyped(self, component: dict[str, Any], name: str, where: str) -> None:  # noqa: N802
        allowed = {"data_type": "tensor", "dtype": None, "device": None, "wrap_sequence": False, "track_meta": None}
        return self._noop(component, name, where, allowed)

    def _pre_ToTensord(self, component: dict[str, Any], name: str, where: str) -> None:  # noqa: N802
        return self._noop(component, name, where, {"dtype": None, "device": None, "wrap_sequence": True, "track_meta": None})

    def _pre_CastToTyped(self, component: dict[str, Any], name: str, where: str) -> None:  # noqa: N802
        return self._noop(component, name, where, {"dtype": "float32"})

    def _pre_Orientationd(self, component: dict[str, Any], name: str, where: str) -> dict[str, Any] | None:  # noqa: N802
        args = self.arguments(
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
            self.problem(where, f"{name}: axcodes {codes!r} (expected one letter of L/R, P/A, I/S each)")
        if args["labels"] not in (None, [["L", "R"], ["P", "A"], ["I", "S"]]):
            self.problem(where, f"{name}: labels {args['labels']!r} (only nibabel's default L-R, P-A, I-S)")
        if args["lazy"]:
            self.problem(where, f"{name}: lazy resampling (fuses orientation and spacing into one resampling)")
        return {"op": "orientation", "axcodes": codes.upper()} if ok else None

    def _pre_Spacingd(self, component: dict[str, Any], name: str, where: str) -> dict[str, Any] | None:  # noqa: N802
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
        args = self.arguments(component, name, where, allowed)
        if args is None:
            return None
        pixdim = args["pixdim"]
        pixdim = [pixdim] if isinstance(pixdim, int | float) else pixdim
        if isinstance(pixdim, list) and 0 < len(pixdim) < 3:
            pixdim = pixdim + [pixdim[-1]] * (3 - len(pixdim))  # MONAI repeats the last value
        valid = isinstance(pixdim, list) and len(pixdim) == 3 and all(isinstance(v, int | float) and v > 0 for v in pixdim)
        if not valid:
            self.problem(
                where, f"{name}: pixdim {args['pixdim']!r} (3 positive spacings; 'keep the input spacing' is not reproduced)"
            )
        mode = self.per_key(args["mode"], component, where)
        padding = self.per_key(args["padding_mode"], component, where)
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
                self.problem(where, f"{name}: {text}")
        self.float32_dtype(name, where, args["dtype"], accept_float64=True)
        if not valid or not all(ok for ok, _ in checks):
            return None
        return {"op": "spacing", "pixdim_xyz_mm": [float(v) for v in pixdim], "mode": mode}

    def _pre_ScaleIntensityRanged(self, component: dict[str, Any], name: str, where: str) -> dict[str, Any] | None:  # noqa: N802
        allowed = {"a_min": None, "a_max": None, "b_min": None, "b_max": None, "clip": False, "dtype": "float32"}
        args = self.arguments(component, name, where, allowed)
        if args is None:
            return None
        self.float32_dtype(name, where, args["dtype"])
        if not all(isinstance(args[k], int | float) and not isinstance(args[k], bool) for k in ("a_min", "a_max")):
            self.problem(where, f"{name}: a_min / a_max must be numbers, found {args['a_min']!r} / {args['a_max']!r}")
            return None
        return {
            "op": "scale_intensity_range",
            **{k: args[k] for k in ("a_min", "a_max", "b_min", "b_max")},
            "clip": bool(args["clip"]),
        }

    def _pre_ScaleIntensityd(self, component: dict[str, Any], name: str, where: str) -> dict[str, Any] | None:  # noqa: N802
        allowed = {"minv": 0.0, "maxv": 1.0, "factor": None, "channel_wise": False, "dtype": "float32"}
        args = self.arguments(component, name, where, allowed)
        if args is None:
            return None
        self.float32_dtype(name, where, args["dtype"])
        if args["factor"] is not None or args["minv"] is None or args["maxv"] is None:
            self.problem(where, f"{name}: factor / minv=None / maxv=None (only min-max rescaling is reproduced)")
            return None
        return {"op": "scale_intensity", "minv": args["minv"], "maxv": args["maxv"], "channel_wise": bool(args["channel_wise"])}

    def _pre_NormalizeIntensityd(self, component: dict[str, Any], name: str, where: str) -> dict[str, Any] | None:  # noqa: N802
        allowed = {"subtrahend": None, "divisor": None, "nonzero": False, "channel_wise": False, "dtype": "float32"}
        args = self.arguments(component, name, where, allowed)
        if args is None:
            return None
        self.float32_dtype(name, where, args["dtype"])
        for key in ("subtrahend", "divisor"):
            if isinstance(args[key], list) and not args["channel_wise"]:
                self.problem(where, f"{name}: a per-channel {key} without channel_wise")
                return None
        return {
            "op": "normalize_intensity",
            "subtrahend": args["subtrahend"],
            "divisor": args["divisor"],
            "nonzero": bool(args["nonzero"]),
            "channel_wise": bool(args["channel_wise"]),
        }

    def _pre_ScaleIntensityRangePercentilesd(self, component: dict[str, Any], name: str, where: str) -> dict[str, Any] | None:  # noqa: N802
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
        args = self.arguments(component, name, where, allowed)
        if args is None:
            return None
        self.float32_dtype(name, where, args["dtype"])
        return {"op": "scale_intensity_range_percentiles", **{k: args[k] for k in allowed if k != "dtype"}}

    def _pre_CropForegroundd(self, component: dict[str, Any], name: str, where: str) -> dict[str, Any] | None:  # noqa: N802
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
        args = self.arguments(component, name, where, allowed)
        if args is None:
            return None
        margin = args["margin"]
        margin = [margin] * 3 if isinstance(margin, int) else margin
        checks = [
            (args["source_key"] == self.image_key, f"source_key {args['source_key']!r} (only the image itself)"),
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
                self.problem(where, f"{name}: {text}")
        if not all(ok for ok, _ in checks):
            return None
        return {"op": "crop_foreground", "margin_xyz": [int(m) for m in margin], "allow_smaller": bool(args["allow_smaller"])}

    # ---------------------------------------------------------------- inferer
    def inferer(self) -> dict[str, Any] | None:
        component = self.component(self.config.get("inferer"), "inferer")
        if component is None:
            return None
        name = _transform_name(component.get("_target_"))
        if name not in SLIDING_WINDOW_INFERERS:
            self.problem("inferer", f"{component.get('_target_')!r} (only SlidingWindowInferer is reproduced)")
            return None
        allowed = {
            "roi_size": None,
            "sw_batch_size": 1,
            "overlap": 0.25,
            "mode": "constant",
            "sigma_scale": 0.125,
            "padding_mode": "constant",
            "cval": 0.0,
            "sw_device": None,
            "device": None,
            "progress": False,
            "cache_roi_weight_map": False,
            "cpu_thresh": None,
            "buffer_steps": None,
            "buffer_dim": -1,
            "with_coord": False,
        }
        args = self.arguments(component, name, "inferer", allowed)
        if args is None:
            return None
        roi = args["roi_size"]
        roi = [roi] * 3 if isinstance(roi, int) else roi
        uniform = {}
        for key in ("overlap", "sigma_scale"):
            value = args[key]
            if isinstance(value, list) and len(set(value)) == 1:
                value = value[0]
            uniform[key] = value
        checks = [
            (
                isinstance(roi, list) and len(roi) == 3 and all(isinstance(r, int) and r > 0 for r in roi),
                f"roi_size {args['roi_size']!r}",
            ),
            (isinstance(uniform["overlap"], int | float) and 0 <= uniform["overlap"] < 1, f"overlap {args['overlap']!r}"),
            (args["mode"] in ("constant", "gaussian"), f"mode {args['mode']!r}"),
            (
                isinstance(uniform["sigma_scale"], int | float) and uniform["sigma_scale"] > 0,
                f"sigma_scale {args['sigma_scale']!r}",
            ),
            (args["padding_mode"] in ("constant", "replicate", "reflect"), f"padding_mode {args['padding_mode']!r}"),
            (args["cval"] in (0, 0.0) or args["padding_mode"] != "constant", f"cval {args['cval']!r} (only 0)"),
            (not args["with_coord"], "with_coord=True"),
            (isinstance(args["sw_batch_size"], int) and args["sw_batch_size"] >= 1, f"sw_batch_size {args['sw_batch_size']!r}"),
        ]
        for ok, text in checks:
            if not ok:
                self.problem("inferer", f"{name}: {text}")
        if not all(ok for ok, _ in checks):
            return None
        return {
            "roi_size_xyz": [int(r) for r in roi],
            "overlap": float(uniform["overlap"]),
            "mode": args["mode"],
            "sigma_scale": float(uniform["sigma_scale"]),
            "sw_batch_size": int(args["sw_batch_size"]),
            "padding_mode": args["padding_mode"],
        }

    # ---------------------------------------------------------------- postprocessing
    def postprocessing(self) -> dict[str, Any] | None:
        compose = self.component(self.config.get("postprocessing"), "postprocessing")
        if compose is None:
            return None
        transforms = compose.get("transforms", []) if _transform_name(compose.get("_target_")) == "Compose" else [compose]
        while isinstance(transforms, str) and transforms.startswith("@"):
            transforms = self.raw(transforms[1:])
        if not isinstance(transforms, list):
            self.problem("postprocessing", "transforms must be a list")
            return None
        activation, argmax_at, threshold_at, invert_at, nearest = None, None, None, None, True
        for index, item in enumerate(transforms):
            where = f"postprocessing[{index}]"
            raw_transform = item
            component = self.component(item, where)
            if component is None:
                continue
            name = _transform_name(component.get("_target_"))
            if name in IGNORED_POSTPROCESSING:
                continue
            if name == "Activationsd":
                args = self.arguments(component, name, where, {"softmax": False, "sigmoid": False, "other": None})
                if args is None:
                    continue
                if args["other"] is not None or args["softmax"] == args["sigmoid"]:
                    self.problem(where, f"{name}: exactly one of softmax / sigmoid (no 'other' function)")
                    continue
                if invert_at is not None:
                    self.problem(where, f"{name} after Invertd (the activation must come before the inversion)")
                activation = "softmax" if args["softmax"] else "sigmoid"
            elif name == "Invertd":
                allowed = {
                    "transform": None,
                    "orig_keys": None,
                    "orig_meta_keys": None,
                    "nearest_interp": True,
                    "to_tensor": True,
                    "device": None,
                    "post_func": None,
                }
                raw = raw_transform if isinstance(raw_transform, Mapping) else component
                inverted = raw.get("transform")
                if inverted != "@preprocessing":
                    self.problem(where, f"{name}: transform {str(inverted)[:40]!r} (only '@preprocessing' is reproduced)")
                args = self.arguments({k: v for k, v in component.items() if k != "transform"}, name, where, allowed)
                if args is None:
                    continue
                orig = args["orig_keys"]
                if (orig[0] if isinstance(orig, list) else orig) != self.image_key:
                    self.problem(where, f"{name}: orig_keys {orig!r} (expected the image key {self.image_key!r})")
                if args["post_func"] is not None:
                    self.problem(where, f"{name}: post_func")
                nearest_value = args["nearest_interp"]
                nearest = bool(nearest_value[0] if isinstance(nearest_value, list) else nearest_value)
                invert_at = index
            elif name == "AsDiscreted":
                allowed = {
                    "argmax": False,
                    "to_onehot": None,
                    "threshold": None,
                    "rounding": None,
                    "dim": 0,
                    "keepdim": True,
                    "dtype": None,
                }
                args = self.arguments(component, name, where, allowed)
                if args is None:
                    continue
                if args["to_onehot"] is not None or args["rounding"] is not None or args["dim"] != 0:
                    self.problem(where, f"{name}: to_onehot / rounding / dim (only argmax or a 0.5 threshold)")
                elif args["argmax"]:
                    argmax_at = index
                elif args["threshold"] == 0.5:
                    threshold_at = index
                else:
                    self.problem(where, f"{name}: threshold {args['threshold']!r} (only 0.5 after a sigmoid)")
            else:
                self.problem(where, f"{name or component.get('_target_')!r} (label post-processing is not reproduced)")
        if invert_at is None:
            self.problem(
                "postprocessing", "no Invertd: the bundle writes labels on its own resampled grid, DeepSeg on the input grid"
            )
            return None
        decided_at = argmax_at if argmax_at is not None else threshold_at
        if activation == "sigmoid" and argmax_at is not None:
            self.problem("postprocessing", "argmax after a sigmoid (multi-label outputs are not reproduced)")
        before = decided_at is not None and decided_at < invert_at
        if before and not nearest:
            self.problem(
                "postprocessing",
                "labels taken before Invertd(nearest_interp=False) are interpolated linearly (fractional label values)",
            )
        return {
            "activation": activation or "none",
            "argmax_before_invert": bool(before),
            "invert_interpolation": "nearest" if nearest else "linear",
        }

    # ---------------------------------------------------------------- network and labels
    def network(self, post: dict[str, Any] | None) -> MonaiNetConfig | None:
        raw = self.config.get("network_def")
        if raw is None:
            self.problem("network_def", "missing (the bundle must define its network as a config component)")
            return None
        before = len(self.problems)
        resolved = self.value(raw, "network_def")
        # resolve_references already named every $ / % string and every unresolved reference
        checked, problems = check_network_def(resolved, report_strings=False)
        self.problems.extend(problems)
        if len(self.problems) > before:
            return None
        spatial = checked.get("spatial_dims", 3)
        fmt = self.source.metadata.get("network_data_format", {}) if isinstance(self.source.metadata, Mapping) else {}
        inputs, outputs = _first(fmt.get("inputs")), _first(fmt.get("outputs"))
        in_channels = checked.get("in_channels", inputs.get("num_channels"))
        out_channels = checked.get("out_channels", outputs.get("num_channels"))
        if spatial != 3:
            self.problem("network_def", f"spatial_dims {spatial!r} (only 3D networks)")
        if not isinstance(in_channels, int) or not isinstance(out_channels, int) or in_channels < 1 or out_channels < 1:
            self.problem("network_def", f"in_channels / out_channels not known as integers ({in_channels!r} / {out_channels!r})")
            return None
        activation = (post or {}).get("activation", "softmax")
        if out_channels == 1 and activation != "sigmoid":
            self.problem("postprocessing", "one output channel needs a sigmoid and a 0.5 threshold")
        if out_channels > 1 and activation == "sigmoid":
            self.problem("postprocessing", f"sigmoid over {out_channels} channels (overlapping labels are not reproduced)")
        return MonaiNetConfig(
            network_def=checked,
            spatial_dims=3,
            in_channels=in_channels,
            out_channels=out_channels,
            single_logit=out_channels == 1,
        )


def _first(section: Any) -> dict[str, Any]:
    if isinstance(section, Mapping) and section:
        first = next(iter(section.values()))
        return dict(first) if isinstance(first, Mapping) else {}
    return {}


def sanitize_name(text: str) -> str:
    """A store name (``^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$``) from free text: lower case, runs of other characters -> ``-``."""
    cleaned = re.sub(r"[^a-z0-9._-]+", "-", text.strip().lower()).strip("-._")
    return cleaned[:64].rstrip("-._")


def _terminology(name: str) -> tuple[TerminologyCode | None, TerminologyCode | None]:
    """``(type code, category)`` from :mod:`deepseg_core.terminology` when that module exists."""
    if importlib.util.find_spec("deepseg_core.terminology") is None:
        return None, None
    module = importlib.import_module("deepseg_core.terminology")
    found = module.code_for_name(name)
    if isinstance(found, TerminologyCode):
        return found, None
    if isinstance(found, tuple) and len(found) == 2 and all(isinstance(c, TerminologyCode | None) for c in found):
        return found[0], found[1]
    return None, None


def _labels(metadata: Mapping[str, Any], network: MonaiNetConfig) -> tuple[LabelSpec, ...]:
    fmt = metadata.get("network_data_format", {})
    channel_def = _first(fmt.get("outputs") if isinstance(fmt, Mapping) else None).get("channel_def", {}) or {}
    names: dict[int, str] = {}
    for key, value in channel_def.items():
        if str(key).isdigit() and isinstance(value, str) and value.strip():
            names[int(key)] = value.strip()
    if network.single_logit:  # one sigmoid channel: its name, unless the metadata calls channel 0 background
        named = [n for _, n in sorted(names.items()) if n.lower() != "background"]
        wanted = {1: named[0] if named else "foreground"}
    else:
        wanted = {c: names.get(c) or f"label {c}" for c in range(1, network.out_channels)}
    labels, used = [], set()
    for value, name in wanted.items():
        if name in used:
            name = f"{name} (channel {value})"
        used.add(name)
        code, category = _terminology(name)
        color = PALETTE[(value - 1) % len(PALETTE)]
        labels.append(LabelSpec(value=value, name=name, color=color, code=code, category=category))
    return tuple(labels)


def _inputs(metadata: Mapping[str, Any], network: MonaiNetConfig, steps: list[dict[str, Any]]) -> Inputs:
    fmt = metadata.get("network_data_format", {})
    first_input = _first(fmt.get("inputs") if isinstance(fmt, Mapping) else None)
    window = next((s for s in steps if s["op"] == "scale_intensity_range"), None)
    hu_window = window is not None and float(window["a_min"]) < 0
    declared = str(first_input.get("modality", "")).upper()
    modality = "CT" if hu_window or declared == "CT" else "MR"
    channel_def = first_input.get("channel_def", {}) or {}
    names = [str(channel_def.get(str(c), "")).strip() for c in range(network.in_channels)]
    if network.in_channels == 1 and names[0].lower() in ("", "image"):
        names = [modality]
    names = [n or f"channel {c}" for c, n in enumerate(names)]
    return Inputs(modality, tuple(names))


def _normalization(steps: list[dict[str, Any]], modality: str) -> Normalization:
    """The DeepSeg scheme closest to the bundle's intensity mapping (used only by the domain check)."""
    for step in steps:
        if step["op"] == "scale_intensity_range" and step["b_min"] is not None and step["b_max"] is not None:
            a_min, a_max, b_min, b_max = (float(step[k]) for k in ("a_min", "a_max", "b_min", "b_max"))
            if a_max > a_min and b_max != b_min and modality == "CT":
                scale = (a_max - a_min) / (b_max - b_min)
                return Normalization("ct", window=(a_min, a_max), mean=a_min - b_min * scale, std=abs(scale))
        if step["op"] == "scale_intensity_range_percentiles":
            return Normalization("percentile", percentiles=(float(step["lower"]), float(step["upper"])))
    return Normalization("zscore")


def map_bundle(source: BundleSource) -> BundleMapping:
    """Map a read bundle onto DeepSeg's network, pipeline and card sections.

    Raises:
        ModelError: one error listing every unsupported or unsafe item found.
    """
    from ..pipelines.monai_bundle import parse_config

    mapper = _Mapper(source)
    steps = mapper.preprocessing()
    inferer = mapper.inferer()
    post = mapper.postprocessing()
    network = mapper.network(post)
    pipeline_config: dict[str, Any] = {"steps": steps, "inferer": inferer, "postprocessing": post, "image_key": mapper.image_key}
    if not mapper.problems and inferer is not None and post is not None:
        try:
            parse_config(pipeline_config)
        except ConfigError as exc:
            mapper.problems.append(f"pipeline: {exc.found}")
    if mapper.problems or network is None or inferer is None or post is None:
        numbered = "; ".join(f"({i}) {p}" for i, p in enumerate(mapper.problems, 1)) or "an incomplete inference config"
        raise ModelError(
            f"the bundle cannot be imported: {len(mapper.problems)} item(s) DeepSeg does not reproduce exactly or will not run",
            subject=source.folder / source.config_file,
            expected="Orientationd / Spacingd / intensity transforms, a SlidingWindowInferer, softmax/sigmoid + Invertd + "
            "argmax, and a network_def of monai.networks.nets classes with plain arguments",
            found=numbered,
            hint="DeepSeg never evaluates bundle code ($ expressions, custom _target_s). Run such a bundle with MONAI "
            "itself (python -m monai.bundle run), or simplify its inference config.",
        )
    pipeline_config.pop("image_key")
    inputs = _inputs(source.metadata, network, steps)
    pixdim = next((s["pixdim_xyz_mm"] for s in steps if s["op"] == "spacing"), None)
    return BundleMapping(
        network=network,
        pipeline_config=pipeline_config,
        labels=_labels(source.metadata, network),
        inputs=inputs,
        normalization=_normalization(steps, inputs.modality),
        target_spacing_xyz_mm=tuple(float(v) for v in pixdim) if pixdim else (1.0, 1.0, 1.0),  # type: ignore[arg-type]
        inference=InferenceDefaults(
            patch_size_zyx=tuple(inferer["roi_size_xyz"][::-1]),  # type: ignore[arg-type]
            overlap=inferer["overlap"],
            batch_size=inferer["sw_batch_size"],
        ),
    )


# ------------------------------------------------------------------------------------------------
# weights


def load_state_dict(data: bytes, subject: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in a ``model.pt``, read with ``torch.load(weights_only=True)`` only.

    A plain state dict, or a checkpoint dict holding it under ``"model"`` (what MONAI's
    CheckpointLoader accepts). ``weights_only=True`` unpickles tensors and plain containers only and
    never runs code from the file.

    Raises:
        ModelError: the file needs more than that (custom classes, code, a TorchScript archive), or
            holds no state dict.
    """
    try:
        checkpoint = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, ... for what weights_only refuses
        raise ModelError(
            "the checkpoint cannot be read as plain tensors (torch.load(weights_only=True) refused it)",
            subject=subject,
            expected="a state dict saved with torch.save(net.state_dict(), ...)",
            found=_why_refused(exc),
            hint="DeepSeg never unpickles code or custom classes from a checkpoint. If you trust the file, load it in "
            "MONAI and save net.state_dict() again.",
        ) from None
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else checkpoint
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(
            "the checkpoint holds no state dict",
            subject=subject,
            expected="a mapping of parameter names to tensors (or one under 'model')",
            found=type(state).__name__ if not isinstance(state, Mapping) else f"keys {sorted(map(str, state))[:5]}",
        )
    return {str(k): v for k, v in state.items()}


def _why_refused(exc: Exception) -> str:
    """The line of torch's long weights_only message that names what the file needs."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    found = re.search(r"Unsupported global: GLOBAL [\w.]+", text)
    if found:
        return f"{found.group(0)} (code or a class, not a tensor or a plain container)"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:300]


def _loaded_network(config: MonaiNetConfig, state: dict[str, torch.Tensor], subject: Path) -> MonaiNetwork:
    net = MonaiNetwork(config)
    expected = net.net.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise ModelError(
            "the weights do not fit the bundle's network_def",
            subject=subject,
            found=f"missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape {wrong[:3]}",
            hint="models/model.pt and configs/inference.json come from different models.",
        )
    net.net.load_state_dict(state, strict=True)
    return net.eval()


# ------------------------------------------------------------------------------------------------
# the importer


def bundle_name(source: BundleSource) -> str:
    """The store name: metadata ``name``, else the folder's name, sanitised."""
    for candidate in (source.metadata.get("name"), source.folder.resolve().name):
        if isinstance(candidate, str) and sanitize_name(candidate):
            return sanitize_name(candidate)
    return "monai-bundle"


def import_bundle(folder: str | Path, store: Any, name: str | None = None, activate: bool = True, **options: Any) -> ModelCard:
    """Import the MONAI bundle in ``folder`` into ``store`` as a new model version; returns its card.

    Args:
        folder: the bundle folder (``configs/``, ``models/``).
        store: a :class:`~deepseg_core.model_store.ModelStore`.
        name: the model's name (default: the bundle metadata's ``name``, sanitised).
        activate: make the new version active.
        options: none are accepted (nnU-Net's folds / configuration do not apply).

    Raises:
        ModelError: unreadable or incomplete bundle, unsupported or unsafe content (all listed at
            once), weights that need more than ``torch.load(weights_only=True)``.
        ConfigError: MONAI is not installed.
    """
    folder = Path(folder)
    if options:
        raise ModelError("a MONAI bundle takes no import options", subject=folder, found=f"{sorted(options)}")
    require_monai("Importing a MONAI bundle")
    source = read_bundle(folder)
    mapping = map_bundle(source)
    state = load_state_dict(source.weights, folder / WEIGHTS)
    net = _loaded_network(mapping.network, state, folder / WEIGHTS)
    model_name = name or bundle_name(source)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", model_name):
        raise ModelError("invalid model name", expected="letters, digits, '.', '_', '-' (64 at most)", found=model_name)
    for version in reversed(store.versions(model_name)) if model_name in store.names() else []:
        card = store.card(f"{model_name}:{version}")
        if card.source.get("format") == FORMAT and card.source.get("files") == source.files:
            log.info("bundle %s is already stored as %s", folder, card.ref)
            return card
    import monai

    metadata = source.metadata
    description = str(metadata.get("description") or metadata.get("task") or "").strip()
    card = ModelCard(
        name=model_name,
        version=1,
        architecture=Architecture("monai_network", to_dict(mapping.network)),
        inputs=mapping.inputs,
        labels=mapping.labels,
        preprocessing=Preprocessing(target_spacing_xyz_mm=mapping.target_spacing_xyz_mm, normalization=mapping.normalization),
        inference=mapping.inference,
        weights_sha256="0" * 64,
        description=(description + " " if description else "") + f"(imported from MONAI bundle {folder.resolve().name})",
        source={
            "format": FORMAT,
            "path": str(folder.resolve()),
            "files": dict(sorted(source.files.items())),
            "bundle_name": str(metadata.get("name", "")),
            "bundle_version": str(metadata.get("version", "")),
            "bundle_monai_version": str(metadata.get("monai_version", "")),
            "imported_with_monai": monai.__version__,
            "inference_config": source.config_file,
            "eval_metrics": metadata.get("eval_metrics", {}) if isinstance(metadata.get("eval_metrics"), dict) else {},
        },
        pipeline={"name": FORMAT, "config": mapping.pipeline_config},
    )
    stored = store.add_version(card, net, activate=activate)
    log.info("imported MONAI bundle %s as %s", folder, stored.ref)
    return stored


__all__ = ["BundleMapping", "BundleSource", "import_bundle", "load_state_dict", "map_bundle", "read_bundle", "sanitize_name"]
