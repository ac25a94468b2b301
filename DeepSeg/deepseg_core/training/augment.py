"""Patch augmentation: spatial (flips, in-plane rotation, scaling) and intensity (contrast, gamma,
noise, blur, bias field). The intensity ones imitate what differs between scanners, which is what
makes a model hold up on another site's data.

All randomness comes from the generator passed in, so a seeded run is reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges (per patch).

    Attributes:
        flip_axes: spatial axes (0 = z, 1 = y, 2 = x) mirrored with probability 1/2 each.
        p_rotate_scale: probability of an in-plane rotation (``rotation_deg``) plus isotropic
            in-plane scaling (``scale_range``), linear for images and nearest for labels.
        p_contrast: multiply around the patch mean by a factor from ``contrast_range``.
        p_gamma: gamma from ``gamma_range`` on the patch rescaled to [0, 1].
        p_noise: add Gaussian noise, sigma up to ``noise_std`` (units of the normalised image).
        p_blur: Gaussian blur with sigma from ``blur_sigma`` voxels (in-plane).
        p_bias: multiply by a smooth field exp(linear + quadratic terms) up to ``bias_strength``.
    """

    flip_axes: tuple[int, ...] = (1, 2)
    p_rotate_scale: float = 0.2
    rotation_deg: float = 15.0
    scale_range: tuple[float, float] = (0.85, 1.15)
    p_contrast: float = 0.3
    contrast_range: tuple[float, float] = (0.75, 1.25)
    p_gamma: float = 0.3
    gamma_range: tuple[float, float] = (0.7, 1.5)
    p_noise: float = 0.2
    noise_std: float = 0.1
    p_blur: float = 0.2
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    p_bias: float = 0.2
    bias_strength: float = 0.3

    @classmethod
    def none(cls) -> AugmentConfig:
        """No augmentation at all."""
        return cls(flip_axes=(), p_rotate_scale=0, p_contrast=0, p_gamma=0, p_noise=0, p_blur=0, p_bias=0)


def augment_patch(
    rng: np.random.Generator, image_czyx: np.ndarray, labels_zyx: np.ndarray, config: AugmentConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Augment one patch: image ``(C, Z, Y, X)`` float32, labels ``(Z, Y, X)``; shapes are kept."""
    image, labels = image_czyx, labels_zyx
    for axis in config.flip_axes:
        if rng.random() < 0.5:
            image, labels = np.flip(image, axis + 1), np.flip(labels, axis)
    if rng.random() < config.p_rotate_scale:
        image, labels = _rotate_scale(rng, np.ascontiguousarray(image), np.ascontiguousarray(labels), config)
    image = np.array(image, dtype=np.float32)
    if rng.random() < config.p_contrast:
        factor = rng.uniform(*config.contrast_range)
        mean = image.mean(axis=(1, 2, 3), keepdims=True)
        image = (image - mean) * np.float32(factor) + mean
    if rng.random() < config.p_gamma:
        gamma = rng.uniform(*config.gamma_range)
        lo = image.min(axis=(1, 2, 3), keepdims=True)
        span = np.maximum(image.max(axis=(1, 2, 3), keepdims=True) - lo, 1e-6)
        image = np.power((image - lo) / span, gamma).astype(np.float32) * span + lo
    if rng.random() < config.p_blur:
        sigma = rng.uniform(*config.blur_sigma)
        image = np.stack([ndimage.gaussian_filter(c, sigma=(0.0, sigma, sigma)) for c in image])
    if rng.random() < config.p_bias:
        image = image * _bias_field(rng, image.shape[1:], config.bias_strength)[None]
    if rng.random() < config.p_noise:
        image = image + rng.normal(0.0, rng.uniform(0, config.noise_std), size=image.shape).astype(np.float32)
    return np.ascontiguousarray(image, dtype=np.float32), np.ascontiguousarray(labels)


def _rotate_scale(
    rng: np.random.Generator, image: np.ndarray, labels: np.ndarray, config: AugmentConfig
) -> tuple[np.ndarray, np.ndarray]:
    angle = np.deg2rad(rng.uniform(-config.rotation_deg, config.rotation_deg))
    scale = rng.uniform(*config.scale_range)
    c, s = np.cos(angle) / scale, np.sin(angle) / scale
    matrix = np.array([[1.0, 0, 0], [0, c, -s], [0, s, c]])
    centre = (np.array(labels.shape) - 1) / 2.0
    offset = centre - matrix @ centre
    # Both extended the same way beyond the patch (its edge voxels repeated): labels filled with background there
    # called the repeated organ texture of an image background.
    out_image = np.stack([ndimage.affine_transform(ch, matrix, offset, order=1, mode="nearest") for ch in image])
    out_labels = ndimage.affine_transform(labels, matrix, offset, order=0, mode="nearest")
    return out_image.astype(np.float32), out_labels.astype(labels.dtype)


def _bias_field(rng: np.random.Generator, shape: tuple[int, ...], strength: float) -> np.ndarray:
    axes = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    log_field = sum(rng.uniform(-1, 1) * a + 0.5 * rng.uniform(-1, 1) * a * a for a in axes)
    log_field = log_field / max(float(np.abs(log_field).max()), 1e-6) * rng.uniform(0, strength)
    return np.exp(log_field).astype(np.float32)
