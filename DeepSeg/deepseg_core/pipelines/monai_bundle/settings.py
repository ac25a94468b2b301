"""The ``monai_bundle`` pipeline config (``card.pipeline["config"]``), parsed and checked.

The importer (:mod:`deepseg_core.importers.monai_bundle`) writes it; it is never edited by hand:

- ``steps``: the preprocessing, in the bundle's order, each ``{"op": ..., <fields of STEP_FIELDS>}``
  (``orientation`` and ``spacing``: :mod:`.geometry`; intensity ops: :mod:`.intensity`;
  ``crop_foreground``: :mod:`.crop`);
- ``inferer``: ``SlidingWindowInferer``'s settings in MONAI's axis order x, y, z (:mod:`.tiling`);
- ``postprocessing``: activation, argmax before or after ``Invertd``, and the inversion's
  interpolation (:mod:`.collector`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ...errors import ConfigError
from .geometry import AXIS_CODES
from .tiling import PAD_FOR_MONAI

STEP_FIELDS: dict[str, tuple[str, ...]] = {
    "orientation": ("axcodes",),
    "spacing": ("pixdim_xyz_mm", "mode"),
    "scale_intensity_range": ("a_min", "a_max", "b_min", "b_max", "clip"),
    "scale_intensity": ("minv", "maxv", "channel_wise"),
    "normalize_intensity": ("subtrahend", "divisor", "nonzero", "channel_wise"),
    "scale_intensity_range_percentiles": ("lower", "upper", "b_min", "b_max", "clip", "relative", "channel_wise"),
    "crop_foreground": ("margin_xyz", "allow_smaller"),
}
INTENSITY_OPS = ("scale_intensity_range", "scale_intensity", "normalize_intensity", "scale_intensity_range_percentiles")
ACTIVATIONS = ("softmax", "sigmoid", "none")
INVERT_INTERPOLATIONS = ("linear", "nearest")


@dataclass(frozen=True)
class InfererSettings:
    """``SlidingWindowInferer`` settings (MONAI's axis order x, y, z)."""

    roi_size_xyz: tuple[int, int, int]
    overlap: float = 0.25
    mode: str = "constant"
    sigma_scale: float = 0.125
    sw_batch_size: int = 1
    padding_mode: str = "constant"


@dataclass(frozen=True)
class PostprocessingSettings:
    """How the stitched logits become labels on the input grid.

    Attributes:
        activation: ``softmax``, ``sigmoid`` (one logit; the network returns ``[0, logit]``, whose
            softmax is the sigmoid) or ``none``.
        argmax_before_invert: labels are taken on the model grid and resampled back (nearest).
        invert_interpolation: ``linear`` or ``nearest`` (Invertd's ``nearest_interp``).
    """

    activation: str = "softmax"
    argmax_before_invert: bool = False
    invert_interpolation: str = "linear"


@dataclass(frozen=True)
class BundleSettings:
    """The parsed, checked pipeline config (see the module docstring)."""

    steps: tuple[dict[str, Any], ...]
    inferer: InfererSettings
    postprocessing: PostprocessingSettings = field(default_factory=PostprocessingSettings)

    @property
    def target_spacing_xyz_mm(self) -> tuple[float, float, float] | None:
        """The Spacingd pixdim (x, y, z) mm, or None when the bundle does not resample."""
        for step in self.steps:
            if step["op"] == "spacing":
                return tuple(float(v) for v in step["pixdim_xyz_mm"])  # type: ignore[return-value]
        return None


def parse_config(config: dict[str, Any]) -> BundleSettings:
    """Check a pipeline config (``card.pipeline["config"]``) and return its settings.

    Raises:
        ConfigError: listing every problem (unknown step, missing or unknown field, bad value,
            steps in an order the pipeline cannot reproduce).
    """
    problems: list[str] = []
    steps = _parse_steps(config, problems)
    inferer = _parse_inferer(config, problems)
    post = _parse_postprocessing(config, problems)
    if problems or inferer is None:
        raise ConfigError(
            "the MONAI bundle pipeline config is invalid",
            found="; ".join(problems),
            hint="Re-import the bundle with `deepseg models import`; model cards must not be edited by hand.",
        )
    return BundleSettings(tuple(dict(s) for s in steps), inferer, post)


def _parse_steps(config: dict[str, Any], problems: list[str]) -> list[Any]:
    """``config["steps"]`` (``[]`` when not a list), with its problems appended to ``problems``."""
    steps = config.get("steps")
    if not isinstance(steps, list):
        problems.append("'steps' must be a list")
        steps = []
    seen: list[str] = []
    for index, step in enumerate(steps):
        where = f"steps[{index}]"
        if not isinstance(step, dict) or step.get("op") not in STEP_FIELDS:
            problems.append(f"{where}: unknown step {step.get('op') if isinstance(step, dict) else step!r}")
            continue
        op = step["op"]
        expected = set(STEP_FIELDS[op])
        missing, unknown = sorted(expected - set(step)), sorted(set(step) - expected - {"op"})
        if missing or unknown:
            problems.append(f"{where} ({op}): missing {missing}, unknown {unknown}")
            continue
        problems.extend(f"{where} ({op}): {p}" for p in _step_value_problems(step))
        if op in seen and op in ("orientation", "spacing", "crop_foreground"):
            problems.append(f"{where}: a second {op} step")
        later = [s.get("op") for s in steps[index + 1 :] if isinstance(s, dict)]
        if op == "spacing" and "orientation" not in seen and "orientation" in later:
            problems.append(f"{where}: spacing before orientation is not reproduced (MONAI bundles orient first)")
        if op == "crop_foreground":
            # the box is taken on the grid as it is then: a later resampling or reorientation would move it
            problems.extend(
                f"{where}: crop_foreground before {later_op} is not reproduced"
                for later_op in ("spacing", "orientation")
                if later_op not in seen and later_op in later
            )
        seen.append(op)
    return steps


def _parse_inferer(config: dict[str, Any], problems: list[str]) -> InfererSettings | None:
    """``config["inferer"]``, or None; its problems appended to ``problems``."""
    inferer_data = config.get("inferer")
    inferer = None
    if not isinstance(inferer_data, dict):
        problems.append("'inferer' must be an object")
        return None
    try:
        roi = tuple(int(v) for v in inferer_data["roi_size_xyz"])
        inferer = InfererSettings(
            roi_size_xyz=roi,  # type: ignore[arg-type]
            overlap=float(inferer_data.get("overlap", 0.25)),
            mode=str(inferer_data.get("mode", "constant")),
            sigma_scale=float(inferer_data.get("sigma_scale", 0.125)),
            sw_batch_size=int(inferer_data.get("sw_batch_size", 1)),
            padding_mode=str(inferer_data.get("padding_mode", "constant")),
        )
    except (KeyError, TypeError, ValueError) as exc:
        problems.append(f"inferer: {exc!r}")
    if inferer is not None:
        if len(inferer.roi_size_xyz) != 3 or min(inferer.roi_size_xyz) < 1:
            problems.append(f"inferer: roi_size_xyz must be 3 positive sizes, found {list(inferer.roi_size_xyz)}")
        if not 0.0 <= inferer.overlap < 1.0:
            problems.append(f"inferer: overlap must be in [0, 1), found {inferer.overlap}")
        if inferer.mode not in ("constant", "gaussian"):
            problems.append(f"inferer: mode must be constant or gaussian, found {inferer.mode!r}")
        if inferer.padding_mode not in PAD_FOR_MONAI:
            problems.append(f"inferer: padding_mode must be one of {sorted(PAD_FOR_MONAI)}, found {inferer.padding_mode!r}")
        if inferer.sw_batch_size < 1 or inferer.sigma_scale <= 0:
            problems.append("inferer: sw_batch_size must be >= 1 and sigma_scale > 0")
    return inferer


def _parse_postprocessing(config: dict[str, Any], problems: list[str]) -> PostprocessingSettings:
    """``config["postprocessing"]`` (defaults when absent); its problems appended to ``problems``."""
    post_data = config.get("postprocessing", {})
    post = PostprocessingSettings(
        activation=str(post_data.get("activation", "softmax")),
        argmax_before_invert=bool(post_data.get("argmax_before_invert", False)),
        invert_interpolation=str(post_data.get("invert_interpolation", "linear")),
    )
    if post.activation not in ACTIVATIONS:
        problems.append(f"postprocessing: activation must be one of {list(ACTIVATIONS)}, found {post.activation!r}")
    if post.invert_interpolation not in INVERT_INTERPOLATIONS:
        problems.append(f"postprocessing: invert_interpolation must be linear or nearest, found {post.invert_interpolation!r}")
    if post.argmax_before_invert and post.invert_interpolation != "nearest":
        problems.append("postprocessing: labels taken before Invertd can only be resampled back with nearest interpolation")
    return post


def _step_value_problems(step: dict[str, Any]) -> list[str]:
    """Values a step cannot take (types and ranges)."""
    op = step["op"]
    problems = []

    def number(name: str, optional: bool = False) -> None:
        value = step[name]
        if value is None and optional:
            return
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            problems.append(f"{name} must be a number, found {value!r}")

    if op == "orientation":
        codes = step["axcodes"]
        if not (isinstance(codes, str) and len(codes) == 3 and {AXIS_CODES.get(c, (9, 0))[0] for c in codes} == {0, 1, 2}):
            problems.append(f"axcodes must name one direction of each axis (e.g. RAS), found {codes!r}")
    elif op == "spacing":
        pixdim = step["pixdim_xyz_mm"]
        if not (isinstance(pixdim, list) and len(pixdim) == 3 and all(isinstance(v, int | float) and v > 0 for v in pixdim)):
            problems.append(f"pixdim_xyz_mm must be 3 positive spacings, found {pixdim!r}")
        if step["mode"] not in ("bilinear", "nearest"):
            problems.append(f"mode must be bilinear or nearest, found {step['mode']!r}")
    elif op == "scale_intensity_range":
        for name in ("a_min", "a_max"):
            number(name)
        for name in ("b_min", "b_max"):
            number(name, optional=True)
    elif op == "scale_intensity":
        number("minv")
        number("maxv")
    elif op == "normalize_intensity":
        for name in ("subtrahend", "divisor"):
            value = step[name]
            if value is not None and not isinstance(value, int | float | list):
                problems.append(f"{name} must be a number, a list per channel or null, found {value!r}")
    elif op == "scale_intensity_range_percentiles":
        for name in ("lower", "upper"):
            number(name)
            if not 0 <= step[name] <= 100:
                problems.append(f"{name} must be a percentile in [0, 100], found {step[name]!r}")
        for name in ("b_min", "b_max"):
            number(name, optional=True)
    elif op == "crop_foreground":
        margin = step["margin_xyz"]
        if not (isinstance(margin, list) and len(margin) == 3 and all(isinstance(m, int) and m >= 0 for m in margin)):
            problems.append(f"margin_xyz must be 3 non-negative integers, found {margin!r}")
    return problems
