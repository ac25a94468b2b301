"""``deepseg segment``: one case or a batch, the model loaded once, bad cases reported and skipped."""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from . import io
from .errors import DeepSegError, ImageError
from .events import EventSink
from .inference import Segmenter, SegmentOptions
from .inference.sliding_window import Cancelled
from .model_card import ModelError
from .model_store import ModelStore
from .outputs import LABELMAP_SUFFIXES, write_probabilities, write_segmentation_result

log = logging.getLogger("deepseg")


@dataclass(frozen=True)
class Case:
    """One case: its name and one input path per channel."""

    name: str
    channels: tuple[Path, ...]


def _case_name(path: Path) -> str:
    name = path.name
    for suffix in (".seg.nrrd", *io.IMAGE_SUFFIXES):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def collect_cases(inputs: list[str]) -> list[Case]:
    """Expand the INPUT arguments: files, DICOM folders, folders of image files, ``a,b`` channel lists."""
    cases: list[Case] = []
    for item in inputs:
        if "," in item:
            paths = tuple(Path(p) for p in item.split(","))
            cases.append(Case(_case_name(paths[0]), paths))
            continue
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and p.name.lower().endswith(io.IMAGE_SUFFIXES))
            if files:
                cases.extend(Case(_case_name(f), (f,)) for f in files)
                continue
        cases.append(Case(_case_name(path), (path,)))
    return cases


def output_path(args: argparse.Namespace, case: Case, batch: bool) -> Path:
    """Where a case's result goes: OUT itself for one case, OUT/<case>.<format> for a batch."""
    out = Path(args.output)
    if not batch:
        return out
    return out / f"{case.name}{args.format}"


def options_from(args: argparse.Namespace) -> SegmentOptions:
    return SegmentOptions(
        device=args.device,
        overlap=args.overlap,
        batch_size=args.batch_size,
        tta=args.tta,
        instances=args.instances,
        min_instance_mm3=args.min_instance_mm3,
        largest_component=args.largest_component,
        fill_holes=args.fill_holes,
        keep_probabilities=args.probabilities is not None,
        check_modality=not args.skip_modality_check,
    )


def _check_output(args: argparse.Namespace, batch: bool) -> None:
    out = Path(args.output)
    if batch:
        if out.exists() and not out.is_dir():
            raise ImageError("several inputs need an output folder", subject=out, found="an existing file")
        out.mkdir(parents=True, exist_ok=True)
        return
    if not out.name.lower().endswith((".seg.nrrd", *LABELMAP_SUFFIXES)):
        raise ImageError(
            "unsupported output file type", subject=out, expected=".seg.nrrd, .nii.gz, .nii, .nrrd or .mha", found=out.name
        )
    if not out.parent.is_dir():
        raise ImageError("the output folder does not exist", subject=out.parent, hint="Create it first.")


def run_segment(args: argparse.Namespace, sink: EventSink) -> tuple[int, int]:
    """Segment every case; returns (succeeded, failed). Model problems raise ModelError at once."""
    cases = collect_cases(args.inputs)
    batch = len(cases) > 1 or args.batch
    _check_output(args, batch)
    if args.probabilities and batch:
        raise ImageError("--probabilities takes one file and needs a single input", found=f"{len(cases)} inputs")
    store = ModelStore(args.models_dir) if args.models_dir else None
    segmenter = Segmenter.load(args.model, device=args.device, store=store)
    options = options_from(args)
    sink.emit({"event": "start", "model": segmenter.card.ref, "device": str(segmenter.device), "cases": len(cases)})
    ok = failed = 0
    for index, case in enumerate(cases, start=1):
        started = time.perf_counter()
        try:
            channels = [io.read_image(p) for p in case.channels]

            def progress(done: int, total: int, eta: float, case_name: str = case.name) -> None:
                sink.emit({"event": "progress", "case": case_name, "done": done, "total": total, "eta_s": round(eta, 2)})

            result = segmenter.segment(channels, options, subjects=[str(p) for p in case.channels], on_progress=progress)
            out = write_segmentation_result(output_path(args, case, batch), result)
            if args.probabilities:
                write_probabilities(args.probabilities, result)
        except (Cancelled, KeyboardInterrupt):
            raise
        except ModelError:
            raise
        except DeepSegError as exc:
            failed += 1
            sink.emit({"event": "case_failed", "case": case.name, "index": index, "error": str(exc)})
            log.error("%s", exc)
            continue
        ok += 1
        grid = result.labels
        segments = [
            {
                "name": label.name,
                "value": label.value,
                "voxels": int((grid.array_zyx == label.value).sum()),
                "ml": float((grid.array_zyx == label.value).sum() * grid.voxel_volume_ml),
                **(
                    {"instances": sum(1 for i in result.instances if i.label == label.value)}
                    if label.thing and options.instances
                    else {}
                ),
            }
            for label in result.card.labels
        ]
        sink.emit(
            {
                "event": "case_done",
                "case": case.name,
                "index": index,
                "output": str(out),
                "seconds": round(time.perf_counter() - started, 3),
                "timings_s": {k: round(v, 3) for k, v in result.timings_s.items()},
                "segments": segments,
            }
        )
        if not sink.json_mode:
            print(f"{case.name}: {out} ({time.perf_counter() - started:.1f} s)")
            for seg in segments:
                extra = f", {seg['instances']} instance(s)" if "instances" in seg else ""
                print(f"  {seg['name']:<20} {seg['voxels']:>9} voxels {seg['ml']:>9.2f} ml{extra}")
    sink.emit({"event": "done", "ok": ok, "failed": failed})
    return ok, failed


def add_segment_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("segment", help="segment volumes with a model (one case, several, or a folder)")
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="image file, DICOM folder, folder of image files, or CHANNEL1,CHANNEL2 for multi-channel models",
    )
    p.add_argument("--model", required=True, help="NAME[:VERSION] in the store, a bundled model name, or a model folder")
    p.add_argument("--output", required=True, help="OUT.seg.nrrd / OUT.nii.gz for one case; a folder for several")
    p.add_argument("--format", default=".seg.nrrd", choices=[".seg.nrrd", *LABELMAP_SUFFIXES], help="file type of batch outputs")
    p.add_argument("--batch", action="store_true", help="treat a single input as a batch (output is a folder)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    p.add_argument("--overlap", type=float, default=None, help="sliding-window overlap (default: the model card's)")
    p.add_argument("--batch-size", type=int, default=None, help="tiles per network call (default: the model card's)")
    p.add_argument("--tta", action="store_true", help="mirror test-time augmentation (8 passes in 3D)")
    p.add_argument("--instances", action="store_true", help="separate lesions ('thing' labels) into numbered segments")
    p.add_argument("--min-instance-mm3", type=float, default=10.0, help="drop instances smaller than this")
    p.add_argument("--largest-component", action="store_true", help="keep only the largest component of organ labels")
    p.add_argument("--fill-holes", action="store_true", help="fill enclosed holes of organ labels")
    p.add_argument("--probabilities", default=None, metavar="FILE", help="also write class probabilities (4D, float32)")
    p.add_argument(
        "--skip-modality-check", action="store_true", help="segment even if the image does not look like the model's modality"
    )
    p.add_argument("--models-dir", default=None, help="model store folder (default $DEEPSEG_MODELS or ~/.deepseg/models)")
    p.add_argument("--json", action="store_true", help="JSON-lines events on stdout instead of text and a progress bar")
