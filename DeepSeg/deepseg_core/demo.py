"""The README's main job: segment the bundled sample with the bundled default model.

Writes ``sample_ct.seg.nrrd`` (segments named and coloured from the model card, lesions as separate
instances), ``sample_ct_preview.png`` (axial, coronal, sagittal slices with the overlay) and returns
a summary: segments, voxels, millilitres, instances, and Dice against the phantom's ground truth.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from . import io, metrics, phantoms
from .errors import DeepSegError
from .fileutil import staged_commit

BUNDLED = Path(__file__).with_name("bundled")
SAMPLE_VOLUME = BUNDLED / "sample_ct.nrrd"
SAMPLE_TRUTH = BUNDLED / "sample_ct_truth.seg.nrrd"
DEFAULT_MODEL = BUNDLED / "models" / "phantom-liver"

#: How the bundled sample was generated (scripts/train_default_model.py writes it).
SAMPLE_SEED = 2026
SAMPLE_SHAPE_ZYX = (48, 112, 112)
SAMPLE_SPACING_XYZ_MM = (1.5, 1.5, 2.5)


def sample_case() -> phantoms.Phantom:
    """The deterministic phantom behind the bundled sample volume (CT, scanner profile A)."""
    return phantoms.generate_phantom(
        seed=SAMPLE_SEED, profile="ct-A", shape_zyx=SAMPLE_SHAPE_ZYX, spacing_xyz_mm=SAMPLE_SPACING_XYZ_MM, n_lesions=5
    )


@dataclass
class DemoSummary:
    """What the demo wrote and measured."""

    output: Path
    model: str
    device: str
    seconds: float
    files: dict[str, Path]
    segments: list[dict] = field(default_factory=list)
    domain_check: str = ""

    def as_text(self) -> str:
        lines = [f"DeepSeg demo: model {self.model} on {self.device}, {self.seconds:.1f} s -> {self.output}"]
        lines += [f"  {kind:<13} {path}" for kind, path in self.files.items()]
        if self.domain_check:
            lines.append(f"  {self.domain_check}")
        lines.append(f"  {'segment':<14}{'voxels':>9}{'ml':>9}{'instances':>11}{'Dice vs truth':>15}")
        for seg in self.segments:
            lines.append(f"  {seg['name']:<14}{seg['voxels']:>9}{seg['ml']:>9.2f}{seg['instances']:>11}{seg['dice']:>15.3f}")
        return "\n".join(lines)


def run_demo(output: Path, device: str = "auto") -> DemoSummary:
    """Segment the bundled sample with the bundled model; write .seg.nrrd + PNG; summarise.

    The three files replace earlier ones together (:func:`~deepseg_core.fileutil.staged_commit`).

    Raises:
        DeepSegError: ``output`` is an existing file, not a folder (checked before any work).
    """
    if output.exists() and not output.is_dir():
        raise DeepSegError(
            "the demo's output is not a folder",
            subject=output,
            expected="a folder for the segmentation, preview and table (created when missing)",
            found="an existing file",
            hint="Give another --output folder name.",
        )
    output.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    # The engine is imported here, not at module level: the Slicer panels read the sample's paths
    # from this module before torch is installed.
    from .inference import Segmenter, SegmentOptions
    from .outputs import write_measurements, write_segmentation_result
    from .preview import write_preview

    segmenter = Segmenter.load(DEFAULT_MODEL, device=device)
    image = io.read_image(SAMPLE_VOLUME)
    result = segmenter.segment([image], SegmentOptions(instances=True, min_instance_mm3=20.0), subjects=[str(SAMPLE_VOLUME)])
    seconds = time.perf_counter() - started
    card = segmenter.card
    files = {
        "segmentation": output / "sample_ct.seg.nrrd",
        "preview": output / "sample_ct_preview.png",
        "measurements": output / "sample_ct_stats.csv",
    }
    colors = {label.value: label.color for label in card.labels}
    with staged_commit(list(files.values())) as commit:
        write_segmentation_result(commit.stage(files["segmentation"]), result)
        write_preview(commit.stage(files["preview"]), image, result.labels.array_zyx, colors, window=(-160, 240))
        write_measurements(commit.stage(files["measurements"]), result, image)
    truth = io.read_segmentation(SAMPLE_TRUTH).to_labelmap().array_zyx
    summary = DemoSummary(
        output=output,
        model=card.ref,
        device=str(segmenter.device),
        seconds=seconds,
        files=files,
        domain_check=result.domain_check.summary() if result.domain_check else "",
    )
    labels = result.labels.array_zyx
    for label in card.labels:
        mask = labels == label.value
        count = sum(1 for inst in result.instances if inst.label == label.value) if label.thing else int(mask.any())
        summary.segments.append(
            {
                "name": label.name,
                "voxels": int(mask.sum()),
                "ml": float(mask.sum() * image.voxel_volume_ml),
                "instances": count,
                "dice": metrics.dice(mask, truth == label.value),
            }
        )
    return summary
