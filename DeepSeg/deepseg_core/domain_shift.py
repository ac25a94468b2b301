"""Is this input like the model's training data? A graded warning before inference, never a block.

The model card's ``fingerprint`` describes the training data (:func:`training_fingerprint`):
spacing range, array orientation, modality, channels, and the distribution of *normalised* body
intensities. :func:`check_input` compares one input with it and returns a :class:`DomainReport`
with a verdict ``ok`` / ``caution`` / ``out_of_distribution`` and the reasons in plain words.

Checks and thresholds (the verdict is the worst level found):

- **channels**: fewer or more images than the card's channels -> out of distribution.
- **modality**: a CT model given an image without CT air (0.5th percentile above -500 HU, or no
  voxel below 0) -> out of distribution; an MR model given an image whose 0.5th percentile is below
  -500 (CT air) -> out of distribution.
- **spacing**, per axis against the training range ``[min, max]``: coarser than ``max`` by a factor
  > 1.5 -> caution, > 3 -> out of distribution (detail is missing that the model relied on); finer
  than ``min`` by a factor > 4 -> caution (different noise and partial-volume texture).
- **orientation**: the array axes run along different anatomical axes than in training (e.g. a
  sagittal acquisition for a model trained on axial ones) -> caution.
- **field of view** (when the caller gives the network grid and tile, as
  :meth:`~deepseg_core.inference.Segmenter.check_inputs` does): along an axis where the image on the
  model's grid is shorter than one tile, the sliding window pads every tile, and the network sees
  padding where it was trained on anatomy. The image fills less than half a tile -> caution, less
  than a quarter -> out of distribution (a few slices cut from a volume, a small box around a lesion).
- **intensity**: the body voxels (CT: above -500 HU; MR: above 20 % of the 99th percentile) are
  normalised as the card says but not clipped (CT: ``(HU - mean) / std`` of the training
  foreground, so one unit is one training-foreground standard deviation; MR: the per-image
  z-score). The distance is the 1-Wasserstein distance between the input's and the training data's
  distributions, from their 1st..99th percentiles: ``d = mean_p |q_input(p) - q_train(p)|``.
  ``d >= 1.0`` -> caution, ``d >= 2.5`` -> out of distribution. For a fine-tuned model the distance
  to the closest of its training domains (its own and its ancestors') counts.

The thresholds are stated in the README next to the table that measures them (verdict against
Dice on phantom scanner profiles of increasing shift).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .io import Volume
from .model_card import ModelCard, Normalization
from .preprocessing import intensity_fingerprint, normalize

VERDICTS = ("ok", "caution", "out_of_distribution")
QUANTILE_LEVELS = tuple(float(p) for p in range(1, 100))
INTENSITY_CAUTION = 1.0
INTENSITY_OOD = 2.5
SPACING_COARSER_CAUTION = 1.5
SPACING_COARSER_OOD = 3.0
SPACING_FINER_CAUTION = 4.0
FIELD_OF_VIEW_CAUTION = 0.5
FIELD_OF_VIEW_OOD = 0.25
CT_BODY_HU = -500.0
MR_BODY_FRACTION_OF_P99 = 0.2
_MAX_SAMPLES = 400_000
_MAX_VOXELS_SCANNED = 4_000_000
_AXIS_LETTERS = (("L", "R"), ("P", "A"), ("S", "I"))


@dataclass(frozen=True)
class Finding:
    """One check's outcome.

    Attributes:
        check: ``channels``, ``modality``, ``field_of_view``, ``spacing``, ``orientation``, ``intensity``
            or ``fingerprint``.
        level: ``ok``, ``caution`` or ``out_of_distribution``.
        message: plain-words explanation for the user.
        value: the measured quantity (e.g. the intensity distance), when there is one.
        threshold: the limit it was compared with, when there is one.
    """

    check: str
    level: str
    message: str
    value: float | None = None
    threshold: float | None = None


@dataclass(frozen=True)
class DomainReport:
    """The verdict and every finding; ``reasons`` are the findings above ``ok``."""

    verdict: str
    findings: tuple[Finding, ...] = field(default_factory=tuple)
    intensity_distance: float | None = None

    @property
    def reasons(self) -> list[str]:
        return [f.message for f in self.findings if f.level != "ok"]

    def summary(self) -> str:
        """One line for a terminal or a status label."""
        words = {"ok": "input looks like the training data", "caution": "caution", "out_of_distribution": "OUT OF DISTRIBUTION"}
        if self.verdict == "ok":
            return f"Domain check: {words['ok']}."
        return f"Domain check: {words[self.verdict]}: " + " ".join(self.reasons)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (``verdict``, ``reasons``, ``intensity_distance``, ``findings``)."""
        return {
            "verdict": self.verdict,
            "reasons": self.reasons,
            "intensity_distance": self.intensity_distance,
            "findings": [asdict(f) for f in self.findings],
        }


# ------------------------------------------------------------------------------------------------
# fingerprint (training side)


def axis_codes(direction_lps: np.ndarray) -> str:
    """Anatomical direction of each array axis i, j, k, e.g. ``"LPS"`` for an identity direction matrix."""
    direction = np.asarray(direction_lps, dtype=float).reshape(3, 3)
    letters = []
    for column in direction.T:
        axis = int(np.argmax(np.abs(column)))
        letters.append(_AXIS_LETTERS[axis][0 if column[axis] > 0 else 1])
    return "".join(letters)


def _plane_key(codes: str) -> str:
    """Axis codes without sign: which anatomical axis each array axis runs along (``LPS`` and ``RAS`` match)."""
    canonical = {"L": "x", "R": "x", "P": "y", "A": "y", "S": "z", "I": "z"}
    return "".join(canonical[c] for c in codes)


def body_mask(array_zyx: np.ndarray, modality: str) -> np.ndarray:
    """Voxels inside the body: CT above -500 HU; MR above 20 % of the image's 99th percentile."""
    if modality.upper() == "CT":
        return array_zyx > CT_BODY_HU
    return array_zyx > MR_BODY_FRACTION_OF_P99 * float(np.percentile(array_zyx, 99.0))


def distance_normalisation(array_zyx: np.ndarray, norm: Normalization) -> np.ndarray:
    """The card's normalisation without its clip (CT), so a shift past the window still counts."""
    if norm.scheme == "ct" and norm.mean is not None and norm.std is not None:
        return (np.asarray(array_zyx, dtype=np.float32) - np.float32(norm.mean)) / np.float32(norm.std)
    return normalize(array_zyx, norm)


def _subsample(values: np.ndarray) -> np.ndarray:
    return values[:: values.size // _MAX_SAMPLES + 1] if values.size > _MAX_SAMPLES else values


def voxel_sample(array_zyx: np.ndarray) -> np.ndarray:
    """A regular 1-D sample of at most ~4 M voxels (a view), so a 512 x 512 x 300 CT costs no full-size copy."""
    flat = np.asarray(array_zyx).reshape(-1)
    return flat[:: flat.size // _MAX_VOXELS_SCANNED + 1]


def body_values(array_zyx: np.ndarray, modality: str, norm: Normalization) -> np.ndarray:
    """Normalised (unclipped) intensities of the body voxels of :func:`voxel_sample`."""
    sample = voxel_sample(array_zyx)
    return distance_normalisation(sample, norm)[body_mask(sample, modality)]


def body_quantiles(array_zyx: np.ndarray, modality: str, norm: Normalization) -> np.ndarray:
    """1st..99th percentiles of the normalised body voxels of one image (NaN when no body voxel)."""
    return _quantiles(_subsample(body_values(array_zyx, modality, norm)))


def _quantiles(values: np.ndarray) -> np.ndarray:
    if values.size == 0:
        return np.full(len(QUANTILE_LEVELS), np.nan)
    return np.percentile(values, QUANTILE_LEVELS)


def wasserstein_from_quantiles(a: Sequence[float], b: Sequence[float]) -> float:
    """1-Wasserstein distance of two distributions given at the same percentile levels."""
    return float(np.mean(np.abs(np.asarray(a, dtype=float) - np.asarray(b, dtype=float))))


def training_fingerprint(
    cases: Sequence[Sequence[Volume]],
    labels: Sequence[np.ndarray],
    modality: str,
    channel_names: Sequence[str],
    normalization: Normalization,
    profiles: Sequence[str] = (),
) -> dict[str, Any]:
    """The card's ``fingerprint`` for training cases (one :class:`Volume` per channel per case).

    ``labels``: each case's label array ``(Z, Y, X)`` (foreground = label > 0), on the case grid.
    """
    first = [channels[0] for channels in cases]
    spacings = np.array([v.spacing_xyz_mm for v in first])
    body = []
    for c in range(len(channel_names)):
        values = [_subsample(body_values(channels[c].array_zyx, modality, normalization)) for channels in cases]
        per_case = [_quantiles(v) for v in values]
        pooled = _quantiles(np.concatenate(values).astype(np.float64))
        spread = max((wasserstein_from_quantiles(q, pooled) for q in per_case), default=0.0)
        body.append(
            {
                "channel": channel_names[c],
                "levels": list(QUANTILE_LEVELS),
                "quantiles": [float(v) for v in pooled],
                "case_distance_max": float(spread),
            }
        )
    return {
        "num_cases": len(cases),
        "modality": modality,
        "channels": list(channel_names),
        "spacing_xyz_mm": {
            "min": spacings.min(0).tolist(),
            "median": np.median(spacings, 0).tolist(),
            "max": spacings.max(0).tolist(),
        },
        "shape_zyx_median": np.median([v.shape_zyx for v in first], 0).tolist(),
        "orientation": sorted({axis_codes(v.direction_lps) for v in first}),
        "intensity_foreground": intensity_fingerprint([v.array_zyx for v in first], [lab > 0 for lab in labels]),
        "intensity_all": intensity_fingerprint([v.array_zyx for v in first]),
        "intensity_body": body,
        "profiles": sorted(set(profiles)),
    }


def merge_with_parent(fingerprint: dict[str, Any], parent: dict[str, Any], limit: int = 5) -> dict[str, Any]:
    """A fine-tuned version's fingerprint: its own data plus its ancestors' domains (spacing range widened).

    The ancestors' body-intensity distributions go to ``previous_domains`` (at most ``limit``, newest
    first), so a fine-tuned model still counts its original domain as known.
    """
    out = dict(fingerprint)
    if not parent:
        return out
    previous = []
    if parent.get("intensity_body"):
        previous.append({"profiles": parent.get("profiles", []), "intensity_body": parent["intensity_body"]})
    previous.extend(parent.get("previous_domains", []))
    out["previous_domains"] = previous[:limit]
    own, old = fingerprint.get("spacing_xyz_mm"), parent.get("spacing_xyz_mm")
    if own and old:
        out["spacing_xyz_mm"] = {
            "min": np.minimum(own["min"], old["min"]).tolist(),
            "median": own["median"],
            "max": np.maximum(own["max"], old["max"]).tolist(),
        }
    out["orientation"] = sorted(set(fingerprint.get("orientation", [])) | set(parent.get("orientation", [])))
    return out


# ------------------------------------------------------------------------------------------------
# check (inference side)


def _worst(levels: Sequence[str]) -> str:
    return max(levels, key=VERDICTS.index, default="ok")


def _check_modality(card: ModelCard, image: np.ndarray, name: str) -> Finding:
    low = float(np.percentile(voxel_sample(image), 0.5))
    if card.inputs.modality == "CT":
        if float(image.min()) >= 0 or low > CT_BODY_HU:
            return Finding(
                "modality",
                "out_of_distribution",
                f"The image for the model's {name} channel does not look like a CT in Hounsfield units "
                f"(0.5th percentile {low:.0f}, no air near -1000 HU); the model was trained on CT.",
                value=low,
                threshold=CT_BODY_HU,
            )
        return Finding("modality", "ok", f"{name}: CT air present (0.5th percentile {low:.0f} HU).", value=low)
    if card.inputs.modality == "MR" and low < CT_BODY_HU:
        return Finding(
            "modality",
            "out_of_distribution",
            f"The image for the model's {name} channel looks like a CT (0.5th percentile {low:.0f}, like air in HU); "
            "the model was trained on MR.",
            value=low,
            threshold=CT_BODY_HU,
        )
    return Finding("modality", "ok", f"{name}: intensities plausible for {card.inputs.modality}.", value=low)


def _check_spacing(spacing_xyz: Sequence[float], trained: dict[str, Any]) -> list[Finding]:
    findings = []
    for axis, value, low, high in zip("xyz", spacing_xyz, trained["min"], trained["max"], strict=True):
        coarser = value / high if high > 0 else 1.0
        finer = low / value if value > 0 else 1.0
        if coarser > SPACING_COARSER_OOD:
            level = "out_of_distribution"
        elif coarser > SPACING_COARSER_CAUTION or finer > SPACING_FINER_CAUTION:
            level = "caution"
        else:
            level = "ok"
        if level == "ok":
            continue
        if coarser > 1:
            message = (
                f"Voxels are {coarser:.1f}x coarser along {axis} ({value:.2f} mm) than in training ({low:.2f}-{high:.2f} mm); "
                "small structures may be missed."
            )
            ratio, limit = coarser, SPACING_COARSER_OOD if level == "out_of_distribution" else SPACING_COARSER_CAUTION
        else:
            message = (
                f"Voxels are {finer:.1f}x finer along {axis} ({value:.2f} mm) than in training ({low:.2f}-{high:.2f} mm); "
                "noise and texture differ from what the model saw."
            )
            ratio, limit = finer, SPACING_FINER_CAUTION
        findings.append(Finding("spacing", level, message, value=float(ratio), threshold=limit))
    if not findings:
        findings.append(Finding("spacing", "ok", "Voxel spacing within the trained range (or close)."))
    return findings


def check_field_of_view(
    network_shape_zyx: Sequence[int],
    network_spacing_zyx_mm: Sequence[float],
    patch_size_zyx: Sequence[int],
    axis_names: Sequence[str] = ("z", "y", "x"),
) -> list[Finding]:
    """How much of each tile the image fills, per axis of the network grid.

    Args:
        network_shape_zyx: the image's size on the model's grid, in the network's axis order.
        network_spacing_zyx_mm: that grid's spacing (mm), same order.
        patch_size_zyx: the voxels one network input covers: the sliding window's tile (2D models:
            1 along z; 2.5D models: the k slices stacked as channels).
        axis_names: the input image's axis each network axis runs along (the message names it).

    Returns one finding per axis the image does not fill at least half of (the image's share of a
    tile: below :data:`FIELD_OF_VIEW_CAUTION` caution, below :data:`FIELD_OF_VIEW_OOD` out of
    distribution), or one ``ok`` finding.
    """
    findings = []
    for axis, size, spacing, tile in zip(axis_names, network_shape_zyx, network_spacing_zyx_mm, patch_size_zyx, strict=True):
        fill = size / tile
        if fill >= FIELD_OF_VIEW_CAUTION:
            continue
        level = "out_of_distribution" if fill < FIELD_OF_VIEW_OOD else "caution"
        findings.append(
            Finding(
                "field_of_view",
                level,
                f"Along {axis} the image spans {size * spacing:.1f} mm, {size} of the {tile} voxels of a network tile "
                f"({tile * spacing:.0f} mm): along {axis} {100 * fill:.0f} % of each tile is image and the rest padding, "
                "where the model expects anatomy. Segment a larger field of view "
                f"(at least {FIELD_OF_VIEW_CAUTION * tile * spacing:.0f} mm along {axis}) and crop the result afterwards.",
                value=float(fill),
                threshold=FIELD_OF_VIEW_OOD if level == "out_of_distribution" else FIELD_OF_VIEW_CAUTION,
            )
        )
    if not findings:
        findings.append(Finding("field_of_view", "ok", "The image fills at least half of a network tile along every axis."))
    return findings


def _intensity_domains(fingerprint: dict[str, Any]) -> list[tuple[str, list[dict[str, Any]]]]:
    domains = []
    if fingerprint.get("intensity_body"):
        domains.append((", ".join(fingerprint.get("profiles", [])) or "training data", fingerprint["intensity_body"]))
    for old in fingerprint.get("previous_domains", []):
        domains.append((", ".join(old.get("profiles", [])) or "earlier training data", old["intensity_body"]))
    return domains


def check_input(
    card: ModelCard,
    channels: Sequence[Volume],
    *,
    network_shape_zyx: Sequence[int] | None = None,
    network_spacing_zyx_mm: Sequence[float] | None = None,
    patch_size_zyx: Sequence[int] | None = None,
    network_axis_names: Sequence[str] = ("z", "y", "x"),
) -> DomainReport:
    """Compare input channels (one :class:`Volume` each, same grid) with the card's training fingerprint.

    With ``network_shape_zyx``, ``network_spacing_zyx_mm`` and ``patch_size_zyx`` (the first channel
    on the model's grid, the tile, and which image axis each network axis is: see
    :func:`check_field_of_view`) the field of view is checked too.
    """
    fp = card.fingerprint or {}
    findings: list[Finding] = []
    expected = list(card.inputs.channels)
    if len(channels) != len(expected):
        findings.append(
            Finding(
                "channels",
                "out_of_distribution",
                f"The model needs {len(expected)} image(s) ({', '.join(expected)}); {len(channels)} given.",
                value=float(len(channels)),
                threshold=float(len(expected)),
            )
        )
        return DomainReport("out_of_distribution", tuple(findings))
    for volume, name in zip(channels, expected, strict=True):
        findings.append(_check_modality(card, volume.array_zyx, name))
    if network_shape_zyx is not None and network_spacing_zyx_mm is not None and patch_size_zyx is not None:
        findings.extend(check_field_of_view(network_shape_zyx, network_spacing_zyx_mm, patch_size_zyx, network_axis_names))
    if not fp.get("spacing_xyz_mm") and not fp.get("intensity_body"):
        findings.append(
            Finding(
                "fingerprint",
                "caution",
                f"Model {card.ref} carries no training-data fingerprint, so the input cannot be compared with its training data.",
            )
        )
        return DomainReport(_worst([f.level for f in findings]), tuple(findings))
    reference = channels[0]
    if fp.get("spacing_xyz_mm"):
        findings.extend(_check_spacing(reference.spacing_xyz_mm, fp["spacing_xyz_mm"]))
    trained_orientations = fp.get("orientation") or []
    codes = axis_codes(reference.direction_lps)
    if trained_orientations:
        if _plane_key(codes) in {_plane_key(c) for c in trained_orientations}:
            trained = ", ".join(trained_orientations)
            findings.append(Finding("orientation", "ok", f"Array axes {codes} run as in training ({trained})."))
        else:
            findings.append(
                Finding(
                    "orientation",
                    "caution",
                    f"The image axes run {codes}, the training images ran {', '.join(trained_orientations)}: "
                    "a different acquisition plane, so the model sees the anatomy rotated.",
                )
            )
    distance = None
    domains = _intensity_domains(fp)
    if domains:
        per_channel = []
        for c, (volume, name) in enumerate(zip(channels, expected, strict=True)):
            q = body_quantiles(volume.array_zyx, card.inputs.modality, card.preprocessing.normalization)
            if np.isnan(q).any():
                findings.append(Finding("intensity", "out_of_distribution", f"{name}: no body voxels found."))
                continue
            best_name, best = min(
                ((dname, wasserstein_from_quantiles(q, body[c]["quantiles"])) for dname, body in domains if c < len(body)),
                key=lambda item: item[1],
            )
            per_channel.append(best)
            if best >= INTENSITY_OOD:
                level = "out_of_distribution"
            elif best >= INTENSITY_CAUTION:
                level = "caution"
            else:
                level = "ok"
            unit = "training-foreground SDs" if card.preprocessing.normalization.scheme == "ct" else "image SDs"
            if level == "ok":
                message = f"{name}: intensities close to the training data ({best_name}); distance {best:.2f} {unit}."
            else:
                message = (
                    f"{name}: intensities differ from the training data ({best_name}) by {best:.2f} {unit} "
                    f"(caution from {INTENSITY_CAUTION:g}, out of distribution from {INTENSITY_OOD:g}): "
                    "another scanner, protocol or contrast phase?"
                )
            findings.append(
                Finding(
                    "intensity",
                    level,
                    message,
                    value=best,
                    threshold=INTENSITY_OOD if level == "out_of_distribution" else INTENSITY_CAUTION,
                )
            )
        distance = max(per_channel) if per_channel else None
    return DomainReport(
        _worst([f.level for f in findings]),
        tuple(findings),
        intensity_distance=None if distance is None or math.isnan(distance) else float(distance),
    )
