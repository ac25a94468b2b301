"""The bundle's intensity steps, in float32 torch with MONAI's order of operations.

``scale_intensity_range`` (``ScaleIntensityRanged``), ``scale_intensity`` (``ScaleIntensityd``,
min-max), ``normalize_intensity`` (``NormalizeIntensityd``: population std, optionally over
non-zero voxels only and per channel), ``scale_intensity_range_percentiles``
(``ScaleIntensityRangePercentilesd``), each on the image as it is at that point (statistics after
resampling when the bundle resamples first). Images are ``(C, Z, Y, X)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def _as_float(value: Any) -> float | None:
    return None if value is None else float(value)


def scale_intensity_range(x: torch.Tensor, step: dict[str, Any]) -> torch.Tensor:
    """``(x - a_min) / (a_max - a_min) * (b_max - b_min) + b_min``, clipped to ``[b_min, b_max]`` when asked."""
    a_min, a_max = float(step["a_min"]), float(step["a_max"])
    b_min, b_max = _as_float(step["b_min"]), _as_float(step["b_max"])
    if a_max - a_min == 0.0:
        return x - a_min if b_min is None else x - a_min + b_min
    x = (x - a_min) / (a_max - a_min)
    if b_min is not None and b_max is not None:
        x = x * (b_max - b_min) + b_min
    if step["clip"] and (b_min is not None or b_max is not None):
        x = torch.clamp(x, b_min, b_max)  # one bound set clips that side only, as MONAI does
    return x


def _min_max(x: torch.Tensor, minv: float, maxv: float) -> torch.Tensor:
    low, high = x.min(), x.max()
    if low == high:
        return x * minv
    return (x - low) / (high - low) * (maxv - minv) + minv


def scale_intensity(x: torch.Tensor, step: dict[str, Any]) -> torch.Tensor:
    """Min-max rescaling of the whole image (or each channel) to ``[minv, maxv]``."""
    minv, maxv = float(step["minv"]), float(step["maxv"])
    if step["channel_wise"]:
        return torch.stack([_min_max(c, minv, maxv) for c in x])
    return _min_max(x, minv, maxv)


def _normalize(x: torch.Tensor, nonzero: bool, subtrahend: float | None, divisor: float | None) -> torch.Tensor:
    x = x.clone()
    if nonzero:
        mask = x != 0
        if not mask.any():
            return x
        values = x[mask]
    else:
        mask, values = None, x
    mean = subtrahend if subtrahend is not None else torch.mean(values.float()).item()
    std = divisor if divisor is not None else torch.std(values.float(), unbiased=False).item()
    if std == 0.0:
        std = 1.0
    if mask is not None:
        x[mask] = (values - mean) / std
        return x
    return (x - mean) / std


def normalize_intensity(x: torch.Tensor, step: dict[str, Any]) -> torch.Tensor:
    """``(x - mean) / std`` (population std; 0 becomes 1), over non-zero voxels only when ``nonzero``."""
    subtrahend, divisor = step["subtrahend"], step["divisor"]
    if step["channel_wise"]:
        channels = []
        for c, channel in enumerate(x):
            sub = subtrahend[c] if isinstance(subtrahend, list) else subtrahend
            div = divisor[c] if isinstance(divisor, list) else divisor
            channels.append(_normalize(channel, step["nonzero"], _as_float(sub), _as_float(div)))
        return torch.stack(channels)
    return _normalize(x, step["nonzero"], _as_float(subtrahend), _as_float(divisor))


def _percentile(x: torch.Tensor, q: float) -> float:
    # MONAI uses numpy's percentile above 1e6 voxels and torch.quantile below (same linear rule).
    if x.numel() > 1_000_000:
        return float(np.percentile(x.numpy(), q))
    return float(torch.quantile(x.flatten(), q / 100.0))


def scale_intensity_range_percentiles(x: torch.Tensor, step: dict[str, Any]) -> torch.Tensor:
    """ScaleIntensityRange with ``a_min`` / ``a_max`` the image's ``lower`` / ``upper`` percentiles."""

    def one(values: torch.Tensor) -> torch.Tensor:
        lower, upper = float(step["lower"]), float(step["upper"])
        b_min, b_max = _as_float(step["b_min"]), _as_float(step["b_max"])
        if step["relative"] and b_min is not None and b_max is not None:
            b_min, b_max = (b_max - b_min) * (lower / 100.0) + b_min, (b_max - b_min) * (upper / 100.0) + b_min
        scaled = {"a_min": _percentile(values, lower), "a_max": _percentile(values, upper), "b_min": b_min, "b_max": b_max}
        return scale_intensity_range(values, {**scaled, "clip": step["clip"]})

    if step["channel_wise"]:
        return torch.stack([one(c) for c in x])
    return one(x)


#: step ``op`` -> function ``(image (C, Z, Y, X), step) -> image``.
INTENSITY_FUNCTIONS = {
    "scale_intensity_range": scale_intensity_range,
    "scale_intensity": scale_intensity,
    "normalize_intensity": normalize_intensity,
    "scale_intensity_range_percentiles": scale_intensity_range_percentiles,
}
