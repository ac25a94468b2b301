"""nnU-Net's intensity normalisations, per channel, in float32, *before* resampling.

``CTNormalization`` (clip to the training foreground's 0.5-99.5 percentiles, subtract its mean,
divide by its std), ``ZScoreNormalization`` (the image's own mean/std, inside the non-zero mask when
``use_mask_for_norm``), ``RescaleTo01Normalization``, ``RGBTo01Normalization``, ``NoNormalization``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ...errors import ConfigError, ImageError

NORMALIZATION_SCHEMES = (
    "CTNormalization",
    "ZScoreNormalization",
    "NoNormalization",
    "RescaleTo01Normalization",
    "RGBTo01Normalization",
)
_EPS = 1e-8


def normalise_channels(
    data_czyx: np.ndarray,
    inside_zyx: np.ndarray,
    schemes: Sequence[str],
    use_mask: Sequence[bool],
    properties: dict[str, dict[str, float]],
) -> None:
    """nnU-Net's normalisation of each channel, in place, float32 (see the module docstring).

    ``inside_zyx``: where the mask-based z-score is computed (nnU-Net's ``seg >= 0``: the filled
    non-zero mask, plus labelled voxels in training).
    """
    for c, scheme in enumerate(schemes):
        image = data_czyx[c]
        if scheme == "CTNormalization":
            stats = properties[str(c)]
            np.clip(image, stats["percentile_00_5"], stats["percentile_99_5"], out=image)
            image -= stats["mean"]
            image /= max(stats["std"], _EPS)
        elif scheme == "ZScoreNormalization":
            if use_mask[c]:
                mean, std = image[inside_zyx].mean(), image[inside_zyx].std()
                image[inside_zyx] = (image[inside_zyx] - mean) / max(std, _EPS)
            else:
                mean, std = image.mean(), image.std()
                image -= mean
                image /= max(std, _EPS)
        elif scheme == "RescaleTo01Normalization":
            image -= image.min()
            image /= np.clip(image.max(), a_min=_EPS, a_max=None)
        elif scheme == "RGBTo01Normalization":
            if image.min() < 0 or image.max() > 255:
                raise ImageError(
                    f"channel {c} is not an 8-bit RGB channel",
                    expected="values 0..255 (the model normalises with RGBTo01Normalization)",
                    found=f"range {float(image.min()):g}..{float(image.max()):g}",
                )
            image /= 255.0
        elif scheme != "NoNormalization":
            raise ConfigError(f"unknown nnU-Net normalisation {scheme!r}", expected=f"one of {list(NORMALIZATION_SCHEMES)}")
