"""The README's main job: the sample case, its segmentation, a PNG preview and a summary."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from . import io, phantoms
from .preview import write_preview

#: The bundled sample: a CT-like phantom from scanner profile A.
SAMPLE_SEED = 2026
SAMPLE_SHAPE_ZYX = (48, 112, 112)
SAMPLE_SPACING_XYZ_MM = (1.5, 1.5, 2.5)


@dataclass
class DemoSummary:
    """What the demo wrote and measured."""

    output: Path
    files: dict[str, Path]
    segments: list[dict] = field(default_factory=list)

    def as_text(self) -> str:
        lines = [f"DeepSeg demo -> {self.output}"]
        lines += [f"  {kind:<13} {path}" for kind, path in self.files.items()]
        lines.append(f"  {'segment':<14}{'voxels':>9}{'ml':>9}{'instances':>11}")
        for seg in self.segments:
            lines.append(f"  {seg['name']:<14}{seg['voxels']:>9}{seg['ml']:>9.2f}{seg['instances']:>11}")
        return "\n".join(lines)


def sample_case() -> phantoms.Phantom:
    """The deterministic sample case the demo and the self-tests use."""
    return phantoms.generate_phantom(
        seed=SAMPLE_SEED, profile="ct-A", shape_zyx=SAMPLE_SHAPE_ZYX, spacing_xyz_mm=SAMPLE_SPACING_XYZ_MM, n_lesions=5
    )


def run_demo(output: Path) -> DemoSummary:
    """Write the sample volume, its segmentation (.seg.nrrd) and a PNG preview; summarise the segments."""
    from .cli import _phantom_segments

    output.mkdir(parents=True, exist_ok=True)
    case = sample_case()
    segments = _phantom_segments()
    files = {
        "volume": io.write_image(case.image, output / "sample_ct.nrrd"),
        "segmentation": io.write_segmentation(output / "sample_ct.seg.nrrd", case.labels, segments),
    }
    colors = {s.label_value: s.color_rgb for s in segments}
    files["preview"] = write_preview(
        output / "sample_ct_preview.png", case.image, case.labels.array_zyx, colors, window=(-160, 240)
    )
    seg = io.read_segmentation(files["segmentation"])
    summary = DemoSummary(output=output, files=files)
    for info in seg.segments:
        mask = seg.mask(info.name)
        _, count = ndimage.label(mask, structure=np.ones((3, 3, 3)))
        summary.segments.append(
            {
                "name": info.name,
                "voxels": int(mask.sum()),
                "ml": float(mask.sum() * seg.grid.voxel_volume_ml),
                "instances": int(count),
            }
        )
    return summary
