"""Synthetic CT-like and MR-like volumes with ground truth, and "scanner" profiles for domain shift.

A phantom is a body (elliptic cylinder along z) holding an organ (a smoothly deformed ellipsoid,
liver-like) that holds several lesions of varied size and contrast. The anatomy is drawn in
millimetres, so anisotropic spacing changes the sampling, not the anatomy. A
:class:`ScannerProfile` turns the anatomy into intensities: tissue values, lesion contrast,
partial-volume blur, a smooth bias field, noise, and a global gain/offset. Profiles that differ
model different scanners and protocols (domain shift). Everything is deterministic under ``seed``.

Labels: 0 background, 1 organ (lesion voxels excluded), 2 lesion. Instances: 0 outside lesions,
1..N one id per lesion.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .errors import ConfigError
from .io import Volume
from .model_card import LabelSpec, TerminologyCode

#: Label values, names, colours (Slicer's liver / lesion colours) and SNOMED CT codes of the phantom.
PHANTOM_LABELS: tuple[LabelSpec, ...] = (
    LabelSpec(1, "liver", (221 / 255, 130 / 255, 101 / 255), TerminologyCode("SCT", "10200004", "Liver")),
    LabelSpec(
        2,
        "liver lesion",
        (144 / 255, 238 / 255, 144 / 255),
        TerminologyCode("SCT", "52988006", "Lesion"),
        category=TerminologyCode("SCT", "49755003", "Morphologically Altered Structure"),
        thing=True,
    ),
)
ORGAN_LABEL = 1
LESION_LABEL = 2


@dataclass(frozen=True)
class ScannerProfile:
    """How one (simulated) scanner and protocol renders tissue.

    Intensities are in HU for CT profiles and arbitrary units for MR profiles.

    Attributes:
        name: profile name, e.g. ``"ct-A"``.
        modality: ``"CT"`` or ``"MR"``.
        outside: value outside the body (air).
        body: soft tissue around the organ.
        organ: organ parenchyma.
        lesion_contrast: (min, max) lesion-minus-organ difference of a typical lesion; each lesion
            draws one value.
        flip_fraction: fraction of lesions whose contrast has the opposite sign (e.g. the few
            hyperdense lesions among hypodense ones).
        noise_sigma: standard deviation of additive Gaussian noise.
        blur_sigma_mm: partial-volume / reconstruction-kernel blur.
        bias_strength: relative amplitude of the smooth multiplicative bias field (MR) or, for CT,
            of an additive low-frequency offset relative to ``organ - body``.
        gain: global intensity scale applied last.
        offset: global intensity offset applied last.
    """

    name: str
    modality: str
    outside: float
    body: float
    organ: float
    lesion_contrast: tuple[float, float]
    flip_fraction: float
    noise_sigma: float
    blur_sigma_mm: float
    bias_strength: float
    gain: float = 1.0
    offset: float = 0.0


PROFILES: dict[str, ScannerProfile] = {
    p.name: p
    for p in (
        ScannerProfile("ct-A", "CT", -1000.0, 40.0, 100.0, (-60.0, -30.0), 0.25, 12.0, 0.6, 0.0),
        ScannerProfile("ct-B", "CT", -1000.0, 55.0, 80.0, (-35.0, -15.0), 0.25, 22.0, 1.2, 0.15, gain=1.1, offset=25.0),
        ScannerProfile("ct-C", "CT", -1000.0, 70.0, 60.0, (-25.0, -10.0), 0.25, 30.0, 1.6, 0.3, gain=1.25, offset=60.0),
        ScannerProfile("mr-A", "MR", 0.0, 300.0, 500.0, (180.0, 300.0), 0.2, 25.0, 0.6, 0.15),
        ScannerProfile("mr-B", "MR", 0.0, 380.0, 460.0, (100.0, 200.0), 0.2, 45.0, 1.0, 0.35, gain=1.6),
        ScannerProfile("mr-C", "MR", 0.0, 420.0, 430.0, (60.0, 140.0), 0.2, 60.0, 1.4, 0.5, gain=2.5),
    )
}


def interpolate_profiles(a: ScannerProfile, b: ScannerProfile, t: float, name: str | None = None) -> ScannerProfile:
    """A profile ``t`` of the way from ``a`` (t=0) to ``b`` (t=1): graded domain shift.

    ``t`` may exceed 1 to extrapolate past ``b``. Both profiles must share a modality.
    """
    if a.modality != b.modality:
        raise ConfigError("cannot interpolate profiles of different modalities", found=f"{a.modality} vs {b.modality}")
    mix = {}
    for f in dataclasses.fields(ScannerProfile):
        va, vb = getattr(a, f.name), getattr(b, f.name)
        if f.name in ("name", "modality"):
            continue
        if isinstance(va, tuple):
            mix[f.name] = tuple(x + t * (y - x) for x, y in zip(va, vb, strict=True))
        else:
            mix[f.name] = va + t * (vb - va)
    mix["noise_sigma"] = max(mix["noise_sigma"], 0.0)
    mix["blur_sigma_mm"] = max(mix["blur_sigma_mm"], 0.0)
    mix["flip_fraction"] = float(np.clip(mix["flip_fraction"], 0.0, 1.0))
    return ScannerProfile(name=name or f"{a.name}->{b.name}@{t:g}", modality=a.modality, **mix)


def get_profile(name: str | ScannerProfile) -> ScannerProfile:
    """Look a profile up by name; the error lists the valid names."""
    if isinstance(name, ScannerProfile):
        return name
    try:
        return PROFILES[name]
    except KeyError:
        raise ConfigError(f"unknown scanner profile {name!r}", expected=f"one of {sorted(PROFILES)}", found=name) from None


@dataclass(frozen=True, eq=False)
class Phantom:
    """One generated case.

    Attributes:
        image: the intensity volume (float32).
        labels: semantic labels on the same grid (uint8; 0 background, 1 organ, 2 lesion).
        instances: lesion instance ids, shape ``(Z, Y, X)`` (int16; 0 = no lesion).
        lesion_radii_mm: nominal radius of each lesion, index ``i`` is instance ``i + 1``.
        lesion_contrasts: lesion-minus-organ intensity of each lesion (before gain).
        profile: the scanner profile that rendered it.
        seed: the seed that reproduces it.
    """

    image: Volume
    labels: Volume
    instances: np.ndarray
    lesion_radii_mm: tuple[float, ...]
    lesion_contrasts: tuple[float, ...]
    profile: ScannerProfile
    seed: int


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], coarse: int = 4) -> np.ndarray:
    """Smooth random field in [-1, 1]: cubic upsampling of a coarse random grid."""
    grid = rng.uniform(-1.0, 1.0, size=(coarse,) * len(shape))
    field = ndimage.zoom(grid, [s / coarse for s in shape], order=3, mode="nearest")
    field = field[tuple(slice(0, s) for s in shape)]
    peak = float(np.abs(field).max()) or 1.0
    return field / peak


def generate_phantom(
    seed: int = 0,
    profile: str | ScannerProfile = "ct-A",
    shape_zyx: tuple[int, int, int] = (40, 96, 96),
    spacing_xyz_mm: tuple[float, float, float] = (1.5, 1.5, 2.5),
    n_lesions: int | tuple[int, int] = (3, 6),
    lesion_radius_mm: tuple[float, float] = (3.0, 10.0),
    origin_lps: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> Phantom:
    """Generate one phantom case.

    Args:
        seed: random seed; the same arguments and seed give identical output.
        profile: scanner profile name (see :data:`PROFILES`) or a :class:`ScannerProfile`.
        shape_zyx: array shape ``(Z, Y, X)``.
        spacing_xyz_mm: voxel size ``(x, y, z)`` in mm (anisotropic allowed).
        n_lesions: exact count, or an inclusive (min, max) range drawn from.
        lesion_radius_mm: (min, max) lesion radius in mm, drawn log-uniformly.
        origin_lps: physical position of voxel [0, 0, 0].

    Returns:
        The :class:`Phantom`. Lesions that do not fit in the organ are dropped, so the count may
        be lower than asked for a small organ; ``lesion_radii_mm`` reports what was placed.
    """
    prof = get_profile(profile)
    if any(s < 8 for s in shape_zyx):
        raise ConfigError("phantom too small", expected="at least 8 voxels per axis", found=str(shape_zyx))
    rng = np.random.default_rng(seed)
    spacing_zyx = np.array(spacing_xyz_mm[::-1], dtype=float)
    extent_mm = np.array(shape_zyx) * spacing_zyx
    coords = [(np.arange(n) + 0.5) * s - e / 2 for n, s, e in zip(shape_zyx, spacing_zyx, extent_mm, strict=True)]
    zz, yy, xx = np.meshgrid(*coords, indexing="ij")

    body_r = extent_mm[1:] * rng.uniform(0.40, 0.46, size=2)
    body = (yy / body_r[0]) ** 2 + (xx / body_r[1]) ** 2 <= 1.0

    organ_r = np.array(
        [extent_mm[0] * rng.uniform(0.32, 0.42), body_r[0] * rng.uniform(0.55, 0.7), body_r[1] * rng.uniform(0.5, 0.65)]
    )
    organ_c = np.array([0.0, rng.uniform(-0.1, 0.1) * body_r[0], rng.uniform(-0.15, 0.15) * body_r[1]])
    radial = np.sqrt(
        ((zz - organ_c[0]) / organ_r[0]) ** 2 + ((yy - organ_c[1]) / organ_r[1]) ** 2 + ((xx - organ_c[2]) / organ_r[2]) ** 2
    )
    organ = (radial + 0.18 * _smooth_field(rng, shape_zyx)) <= 1.0
    organ &= body

    instances = np.zeros(shape_zyx, dtype=np.int16)
    count = int(n_lesions) if isinstance(n_lesions, int) else int(rng.integers(n_lesions[0], n_lesions[1] + 1))
    radii, contrasts = _place_lesions(rng, organ, instances, (zz, yy, xx), spacing_zyx, count, lesion_radius_mm, prof)

    labels = np.zeros(shape_zyx, dtype=np.uint8)
    labels[organ] = ORGAN_LABEL
    labels[instances > 0] = LESION_LABEL

    image = _render(rng, prof, body, organ, instances, contrasts, spacing_zyx)
    geometry = Volume(image, spacing_xyz_mm=spacing_xyz_mm, origin_lps=origin_lps)
    return Phantom(
        image=geometry,
        labels=geometry.with_array(labels),
        instances=instances,
        lesion_radii_mm=tuple(radii),
        lesion_contrasts=tuple(contrasts),
        profile=prof,
        seed=seed,
    )


def _place_lesions(
    rng: np.random.Generator,
    organ: np.ndarray,
    instances: np.ndarray,
    coords: tuple[np.ndarray, np.ndarray, np.ndarray],
    spacing_zyx: np.ndarray,
    count: int,
    radius_range: tuple[float, float],
    prof: ScannerProfile,
) -> tuple[list[float], list[float]]:
    """Draw non-touching ellipsoidal lesions inside the organ; fills ``instances`` in place."""
    zz, yy, xx = coords
    inside_depth_mm = ndimage.distance_transform_edt(organ, sampling=spacing_zyx)
    gap_mm = 2.0 * float(spacing_zyx.max())
    radii: list[float] = []
    contrasts: list[float] = []
    centres: list[np.ndarray] = []
    for _ in range(count):
        radius = float(np.exp(rng.uniform(np.log(radius_range[0]), np.log(radius_range[1]))))
        axes = radius * rng.uniform(0.8, 1.2, size=3)
        candidates = np.argwhere(inside_depth_mm > axes.max() + 1.0)
        placed = False
        for _attempt in range(30):
            if len(candidates) == 0:
                break
            idx = candidates[rng.integers(len(candidates))]
            centre = np.array([zz[tuple(idx)], yy[tuple(idx)], xx[tuple(idx)]])
            if all(np.linalg.norm(centre - c) > r + axes.max() + gap_mm for c, r in zip(centres, radii, strict=True)):
                placed = True
                break
        if not placed:
            continue
        shape = ((zz - centre[0]) / axes[0]) ** 2 + ((yy - centre[1]) / axes[1]) ** 2 + ((xx - centre[2]) / axes[2]) ** 2
        mask = (shape <= 1.0) & organ & (instances == 0)
        if not mask.any():
            continue
        instances[mask] = len(radii) + 1
        centres.append(centre)
        radii.append(float(axes.max()))
        contrast = float(rng.uniform(*prof.lesion_contrast))
        contrasts.append(-contrast if rng.uniform() < prof.flip_fraction else contrast)
    return radii, contrasts


def _render(
    rng: np.random.Generator,
    prof: ScannerProfile,
    body: np.ndarray,
    organ: np.ndarray,
    instances: np.ndarray,
    contrasts: list[float],
    spacing_zyx: np.ndarray,
) -> np.ndarray:
    """Intensities from anatomy: tissue values, blur, bias field, noise, gain/offset (float32)."""
    image = np.full(body.shape, prof.outside, dtype=np.float32)
    image[body] = prof.body
    image[organ] = prof.organ
    for lesion_id, contrast in enumerate(contrasts, start=1):
        image[instances == lesion_id] = prof.organ + contrast
    if prof.blur_sigma_mm > 0:
        image = ndimage.gaussian_filter(image, sigma=prof.blur_sigma_mm / spacing_zyx, mode="nearest")
    bias = _smooth_field(rng, body.shape, coarse=3)
    if prof.modality == "MR":
        image = image * (1.0 + prof.bias_strength * bias).astype(np.float32)
    else:
        image = image + (prof.bias_strength * (prof.organ - prof.body) * bias * body).astype(np.float32)
    image = image + rng.normal(0.0, prof.noise_sigma, size=body.shape).astype(np.float32)
    if prof.modality == "MR":
        image = np.maximum(image, 0.0)
    return (image * prof.gain + prof.offset).astype(np.float32)
