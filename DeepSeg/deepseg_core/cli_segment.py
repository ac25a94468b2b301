"""``deepseg segment``: one case or a batch, the model loaded once, bad cases reported and skipped.

A batch may run under ``torchrun`` (``torchrun --nproc_per_node N -m deepseg_core segment in/ --output
out/``): the cases are sharded over the ranks, one device per rank, and a rerun skips cases whose
outputs are complete (see :mod:`.batch`).
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import distributed, io, uncertainty
from .batch import SUMMARY_JSON, read_record, record_path, record_text, shard, write_failures, write_summary
from .errors import DeepSegError, ImageError
from .events import EventSink
from .fileutil import RecoveryReport, check_not_a_folder, outputs_complete, recover_commits, staged_commit
from .host_memory import check_probabilities_fit
from .inference import SegmentationResult, Segmenter, SegmentOptions
from .inference.sliding_window import Cancelled
from .io import LABELMAP_SUFFIXES
from .model_card import ModelError
from .model_store import ModelStore
from .outputs import instances_path, write_measurements, write_probabilities, write_segmentation_result

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
    """Expand the INPUT arguments: files, DICOM folders, folders of image files, ``a,b`` channel lists.

    A folder's ``.seg.nrrd`` files are segmentations (earlier results, corrections), not images: skipped.

    Raises:
        ImageError: two cases with one name (``a.nrrd`` and ``a.nii.gz``): their outputs would be one file.
    """
    cases: list[Case] = []
    for item in inputs:
        if "," in item:
            paths = tuple(Path(p) for p in item.split(","))
            cases.append(Case(_case_name(paths[0]), paths))
            continue
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and p.name.lower().endswith(io.IMAGE_SUFFIXES))
            segmentations = [p for p in files if io.is_segmentation_file(p)]
            if segmentations:
                log.info("%s: %d .seg.nrrd file(s) are segmentations, not images: skipped", path, len(segmentations))
                files = [p for p in files if p not in segmentations]
            if files:
                cases.extend(Case(_case_name(f), (f,)) for f in files)
                continue
            if segmentations and not any(p.is_file() and p not in segmentations for p in path.iterdir()):
                raise ImageError(
                    "the folder holds segmentations only, no image to segment",
                    subject=path,
                    expected="image files (" + ", ".join(io.IMAGE_SUFFIXES) + ") or a DICOM series",
                    found=f"{len(segmentations)} .seg.nrrd file(s)",
                    hint="Give the folder of the images these segmentations belong to.",
                )
        cases.append(Case(_case_name(path), (path,)))
    unique: dict[tuple[Path, ...], Case] = {}
    for case in cases:  # the same file given twice is one case
        unique.setdefault(tuple(p.resolve() for p in case.channels), case)
    cases = list(unique.values())
    named: dict[str, Case] = {}
    for case in cases:
        first = named.setdefault(case.name, case)
        if first is not case:
            raise ImageError(
                f"two inputs make the same case name {case.name!r}",
                expected="one input per case name (the outputs are named after it)",
                found=f"{first.channels[0]} and {case.channels[0]}",
                hint="Rename one of them, or segment them in separate runs.",
            )
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
        uncertainty=args.uncertainty_method if args.uncertainty else None,
        backend=args.backend,
        precision=args.precision,
    )


def side_output(value: str | None, case: Case, batch: bool, suffix: str) -> Path | None:
    """Where an extra output goes: the given file for one case, ``FOLDER/<case><suffix>`` for a batch."""
    if value is None:
        return None
    return Path(value) / f"{case.name}{suffix}" if batch else Path(value)


def _check_side_output(value: str | None, batch: bool, suffixes: tuple[str, ...], option: str) -> None:
    if value is None:
        return
    path = Path(value)
    if batch:
        if path.exists() and not path.is_dir():
            raise ImageError(f"{option} needs a folder when several cases are segmented", subject=path, found="a file")
        path.mkdir(parents=True, exist_ok=True)
        return
    if not path.name.lower().endswith(suffixes):
        raise ImageError(f"unsupported {option} file type", subject=path, expected=" or ".join(suffixes), found=path.name)
    if not path.parent.is_dir():
        raise ImageError("the output folder does not exist", subject=path.parent, hint="Create it first.")
    check_not_a_folder(path)


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
    check_not_a_folder(out)


def _check_inputs_kept(args: argparse.Namespace, cases: list[Case], batch: bool) -> None:
    """Refuse a run that would write an output over one of its input images (the user's CT, lost)."""
    inputs = {path.resolve(): case.name for case in cases for path in case.channels}
    written: dict[Path, str] = {}  # two cases must not write one file either (a's a_instances map, a_instances's labels)
    for case in cases:
        for out in case_outputs(args, case, batch):
            resolved = out.resolve()
            if resolved in inputs:
                raise ImageError(
                    "would overwrite an input image",
                    subject=out,
                    expected="output files other than the images being segmented",
                    found=f"it is an input of case {inputs[resolved]}",
                    hint="Choose another output name (e.g. CASE.seg.nrrd) or another output folder.",
                )
            other = written.setdefault(resolved, case.name)
            if other != case.name:
                raise ImageError(
                    "two cases would write the same output file",
                    subject=out,
                    expected="one output file per case and kind",
                    found=f"cases {other} and {case.name} both write it",
                    hint="Rename one of the inputs, or segment them in separate runs.",
                )


def case_outputs(args: argparse.Namespace, case: Case, batch: bool) -> list[Path]:
    """Every file a case's run writes, the segmentation first: they are committed together."""
    out = output_path(args, case, batch)
    paths = [out]
    instances = instances_path(out) if args.instances else None
    if instances is not None:
        paths.append(instances)
    if args.probabilities:
        paths.append(Path(args.probabilities))
    for value, suffix in ((args.uncertainty, "_uncertainty.nrrd"), (args.stats, "_stats.csv")):
        side = side_output(value, case, batch, suffix)
        if side is not None:
            paths.append(side)
    if batch:
        paths.append(record_path(out.parent, case.name))
    return paths


def case_complete(args: argparse.Namespace, case: Case, batch: bool) -> bool:
    """Whether a case's outputs are complete on disk: all exist and no unfinished commit names one.

    A rerun of a batch can skip such a case: its outputs were committed together by an earlier run.
    """
    return outputs_complete(case_outputs(args, case, batch))


def recover_outputs(args: argparse.Namespace, cases: list[Case], batch: bool) -> RecoveryReport:
    """Finish or discard the writes a killed earlier run left in the output folders of ``cases``."""
    report = recover_commits(path for case in cases for path in case_outputs(args, case, batch))
    if report:
        log.warning("output folder(s) had an interrupted earlier run: %s", report.summary())
    return report


def write_case_outputs(
    args: argparse.Namespace,
    case: Case,
    batch: bool,
    result: SegmentationResult,
    channels: Sequence[io.Volume],
    record: dict | None = None,
) -> list[Path]:
    """Write a case's segmentation, probabilities, uncertainty map and table so they appear together or not at all.

    Each file is written into a staging folder beside its target, then all are renamed into place
    under a journal (see :func:`deepseg_core.fileutil.staged_commit`); a kill or cancel at any
    point leaves the old files or, once the next run has recovered, all the new ones.
    """
    targets = case_outputs(args, case, batch)
    out = targets[0]
    with staged_commit(targets) as commit:
        write_segmentation_result(commit.stage(out), result)
        if args.probabilities:
            write_probabilities(commit.stage(Path(args.probabilities)), result)
        uncertainty_path = side_output(args.uncertainty, case, batch, "_uncertainty.nrrd")
        if uncertainty_path is not None and result.uncertainty is not None:
            io.write_image(result.uncertainty, commit.stage(uncertainty_path))
        stats_path = side_output(args.stats, case, batch, "_stats.csv")
        if stats_path is not None:
            write_measurements(commit.stage(stats_path), result, channels)
        if batch:
            commit.stage(record_path(out.parent, case.name)).write_text(record_text(record or {}), encoding="utf-8")
    return targets


def segment_summaries(result: SegmentationResult, options: SegmentOptions) -> list[dict]:
    """Per label: voxels, ml, instance count (thing labels), and uncertainty when it was computed; then each
    multi-value region of a region-based nnU-Net model (``"region": true``, its ``values``, voxels, ml)."""
    grid = result.labels
    per_segment_uncertainty = (
        {
            u.label_value: u
            for u in uncertainty.segment_uncertainty(
                grid, result.uncertainty.array_zyx, [label.segment_info() for label in result.card.labels]
            )
        }
        if result.uncertainty is not None
        else {}
    )
    rows = []
    # one pass for every label's count (a comparison per label was a pass over the whole image each)
    counts = np.bincount(grid.array_zyx.ravel(), minlength=max((label.value for label in result.card.labels), default=0) + 1)
    for label in result.card.labels:
        voxels = int(counts[label.value])
        row: dict = {"name": label.name, "value": label.value, "voxels": voxels, "ml": float(voxels * grid.voxel_volume_ml)}
        if label.thing and options.instances:
            row["instances"] = sum(1 for i in result.instances if i.label == label.value)
        if per_segment_uncertainty:
            row["mean_entropy"] = per_segment_uncertainty[label.value].mean_entropy
            row["uncertain_ml"] = per_segment_uncertainty[label.value].uncertain_ml
        rows.append(row)
    # an nnU-Net region (BraTS' "whole tumor": [1, 2, 3]) is the union of its values in the label map, as
    # nnU-Net evaluates it; a one-value region is its label's row already
    for region in result.card.regions:
        if len(region.values) > 1:
            voxels = int(sum(int(counts[v]) for v in region.values if v < len(counts)))
            rows.append(
                {
                    "name": region.row_name,
                    "values": list(region.values),
                    "region": True,
                    "voxels": voxels,
                    "ml": float(voxels * grid.voxel_volume_ml),
                }
            )
    return rows


def run_segment(args: argparse.Namespace, sink: EventSink) -> tuple[int, int]:
    """Segment every case; returns (succeeded, failed). Model problems raise ModelError at once.

    Under ``torchrun`` each rank segments its share of the cases on its own device; a batch skips
    cases whose outputs are complete, and rank 0 writes the run's summary (:mod:`.batch`).
    """
    all_cases = collect_cases(args.inputs)
    dicom_folders = [path for case in all_cases for path in case.channels if path.is_dir()]
    if args.series_uid is not None and len(dicom_folders) != 1:
        raise ImageError(
            "--series-uid picks a series of one DICOM folder"
            + (", and no input is a DICOM folder" if not dicom_folders else ": a series UID is in one folder only"),
            found=f"{len(dicom_folders)} DICOM folder inputs",
            hint="Leave out --series-uid, or segment the DICOM folder that holds the series on its own.",
        )
    batch = len(all_cases) > 1 or args.batch
    rank, world = distributed.rank_world()
    cases = shard(all_cases, rank, world)
    if world > 1 and not batch:
        raise ImageError("torchrun segmentation needs several cases and an output folder", found=f"{len(all_cases)} input")
    _check_output(args, batch)
    if args.probabilities and batch:
        raise ImageError("--probabilities takes one file and needs a single input", found=f"{len(all_cases)} inputs")
    _check_side_output(args.uncertainty, batch, (".nrrd", ".nii.gz", ".nii", ".mha"), "--uncertainty")
    _check_side_output(args.stats, batch, (".csv",), "--stats")
    _check_side_output(args.probabilities, False, (".nii.gz", ".nii", ".nrrd", ".mha"), "--probabilities")
    _check_inputs_kept(args, all_cases, batch)
    recover_outputs(args, cases, batch)
    store = ModelStore(args.models_dir) if args.models_dir else None
    segmenter = Segmenter.load(args.model, device=distributed.rank_device(args.device, world), store=store)
    options = options_from(args)
    segmenter.build_networks_runs_need(options)  # a model that cannot be built fails here, on every rank alike
    ranked = {"rank": rank} if world > 1 else {}
    sink.emit(
        {
            "event": "start",
            "model": segmenter.card.ref,
            "device": str(segmenter.device),
            "cases": len(cases),
            "pid": os.getpid(),
            **ranked,
        }
    )
    ok = failed = 0
    failures: list[dict] = []
    for index, case in enumerate(cases, start=1):
        if batch and case_complete(args, case, batch) and read_record(Path(args.output), case.name) is not None:
            sink.emit({"event": "case_skipped", "case": case.name, "index": index, "reason": "outputs complete", **ranked})
            ok += 1
            continue
        started = time.perf_counter()
        try:
            for path in case_outputs(args, case, batch):  # before the work: a folder in the way would fail its commit
                check_not_a_folder(path)
            channels = [io.read_image(p, series_uid=args.series_uid) for p in case.channels]
            if args.probabilities:  # before minutes of work that the out-of-memory killer would end silently
                check_probabilities_fit(segmenter.pipeline.output_channels, channels[0].array_zyx.shape, args.probabilities)

            def progress(done: int, total: int, eta: float, case_name: str = case.name) -> None:
                sink.emit({"event": "progress", "case": case_name, "done": done, "total": total, "eta_s": round(eta, 2)})

            def status(message: str, case_name: str = case.name) -> None:
                sink.emit({"event": "status", "case": case_name, "message": message, **ranked})

            report = segmenter.check_inputs(channels)
            sink.emit({"event": "domain_check", "case": case.name, "index": index, **report.to_json()})
            if report.verdict != "ok":
                log.warning("%s: %s", case.name, report.summary())
            result = segmenter.segment(
                channels,
                options,
                subjects=[str(p) for p in case.channels],
                on_progress=progress,
                domain_check=report,
                on_status=status,
            )
            segments = segment_summaries(result, options)
            record = {
                "case": case.name,
                "status": "done",
                "rank": rank,
                "inputs": [str(p) for p in case.channels],
                "seconds": round(time.perf_counter() - started, 3),
                "domain_check": report.verdict,
                "backend": result.backend,
                "precision": result.precision,
                **({"first_stage": result.first_stage} if result.first_stage is not None else {}),
                "model": segmenter.card.ref,
                "segments": segments,
            }
            write_case_outputs(args, case, batch, result, channels, record)
        except (Cancelled, KeyboardInterrupt):
            raise
        except ModelError:
            raise
        except DeepSegError as exc:
            failed += 1
            failures.append({"case": case.name, "rank": rank, "error": str(exc)})
            sink.emit({"event": "case_failed", "case": case.name, "index": index, "error": str(exc), **ranked})
            log.error("%s", exc)
            continue
        ok += 1
        _report_case(args, case, batch, index, started, result, report, segments, sink, ranked)
    if batch:
        write_failures(Path(args.output), rank, failures)
        distributed.barrier(world)
        if rank == 0:
            summary = write_summary(Path(args.output), [c.name for c in all_cases], world, segmenter.card.ref)
            sink.emit(
                {
                    "event": "summary",
                    "path": str(Path(args.output) / SUMMARY_JSON),
                    **{k: summary[k] for k in ("cases", "done", "failed", "missing")},
                }
            )
        distributed.barrier(world)
        distributed.finish(world)
    sink.emit({"event": "done", "ok": ok, "failed": failed, **ranked})
    return ok, failed


def _report_case(
    args: argparse.Namespace,
    case: Case,
    batch: bool,
    index: int,
    started: float,
    result: SegmentationResult,
    report: object,
    segments: list[dict],
    sink: EventSink,
    ranked: dict,
) -> None:
    """The ``case_done`` event, and the lines a person reads in text mode."""
    out = output_path(args, case, batch)
    uncertainty_path = side_output(args.uncertainty, case, batch, "_uncertainty.nrrd")
    stats_path = side_output(args.stats, case, batch, "_stats.csv")
    extra_outputs = {
        **({"uncertainty": str(uncertainty_path)} if uncertainty_path is not None else {}),
        **({"stats": str(stats_path)} if stats_path is not None else {}),
    }
    sink.emit(
        {
            "event": "case_done",
            "case": case.name,
            "index": index,
            "output": str(out),
            "seconds": round(time.perf_counter() - started, 3),
            "timings_s": {k: round(v, 3) for k, v in result.timings_s.items()},
            "backend": result.backend,
            "precision": result.precision,
            "tiles": result.window_stats.get("tiles"),
            # a cascade: its first stage's backend, precision and tiles ("tiles" above are the second's)
            **({"first_stage": result.first_stage} if result.first_stage is not None else {}),
            "segments": segments,
            "domain_check": report.verdict,
            **extra_outputs,
            **ranked,
        }
    )
    if not sink.json_mode:
        print(f"{case.name}: {out} ({time.perf_counter() - started:.1f} s)")
        print(f"  {report.summary()}")
        for seg in segments:
            extra = f", {seg['instances']} instance(s)" if "instances" in seg else ""
            if "mean_entropy" in seg:
                extra += f", mean uncertainty {seg['mean_entropy']:.3f}, uncertain {seg['uncertain_ml']:.2f} ml"
            print(f"  {seg['name']:<20} {seg['voxels']:>9} voxels {seg['ml']:>9.2f} ml{extra}")
        for name, path in extra_outputs.items():
            print(f"  {name}: {path}")


def add_segment_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("segment", help="segment volumes with a model (one case, several, or a folder)")
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="image file, DICOM folder, folder of image files, or CHANNEL1,CHANNEL2 for multi-channel models",
    )
    p.add_argument("--model", required=True, help="NAME[:VERSION] in the store, a bundled model name, or a model folder")
    p.add_argument(
        "--series-uid", default=None, metavar="UID", help="the series to read from a DICOM folder input that holds several"
    )
    p.add_argument("--output", required=True, help="OUT.seg.nrrd / OUT.nii.gz for one case; a folder for several")
    p.add_argument("--format", default=".seg.nrrd", choices=[".seg.nrrd", *LABELMAP_SUFFIXES], help="file type of batch outputs")
    p.add_argument("--batch", action="store_true", help="treat a single input as a batch (output is a folder)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N")
    p.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "torch", "openvino", "onnxruntime"],
        help="who computes the network: auto = OpenVINO or ONNX Runtime on a CPU when installed (deepseg[cpu-fast]), else torch",
    )
    p.add_argument(
        "--precision",
        default="float32",
        choices=["float32", "bfloat16"],
        help="CPU arithmetic: bfloat16 is several times faster on CPUs with AMX/AVX512-BF16 (OpenVINO or torch), "
        "probabilities move by up to a few percent (README: Performance); ignored on CUDA",
    )
    p.add_argument("--overlap", type=float, default=None, help="sliding-window overlap (default: the model card's)")
    p.add_argument("--batch-size", type=int, default=None, help="tiles per network call (default: the model card's)")
    p.add_argument("--tta", action="store_true", help="mirror test-time augmentation (8 passes in 3D)")
    p.add_argument("--instances", action="store_true", help="separate lesions ('thing' labels) into numbered segments")
    p.add_argument("--min-instance-mm3", type=float, default=10.0, help="drop instances smaller than this")
    p.add_argument("--largest-component", action="store_true", help="keep only the largest component of organ labels")
    p.add_argument("--fill-holes", action="store_true", help="fill enclosed holes of organ labels")
    p.add_argument("--probabilities", default=None, metavar="FILE", help="also write class probabilities (4D, float32)")
    p.add_argument(
        "--uncertainty",
        default=None,
        metavar="OUT.nrrd",
        help="also write voxel-wise uncertainty (normalised predictive entropy, 0..1); a folder for a batch",
    )
    p.add_argument(
        "--uncertainty-method",
        default="tta",
        choices=["tta", "mc_dropout"],
        help="tta: mirrors + intensity perturbations (any model); mc_dropout: needs a model trained with dropout",
    )
    p.add_argument(
        "--stats",
        default=None,
        metavar="OUT.csv",
        help="per-segment and per-instance measurements (volume, surface, diameter, intensities); a folder for a batch",
    )
    p.add_argument(
        "--skip-modality-check", action="store_true", help="segment even if the image does not look like the model's modality"
    )
    p.add_argument("--models-dir", default=None, help="model store folder (default $DEEPSEG_MODELS or ~/.deepseg/models)")
    p.add_argument("--json", action="store_true", help="JSON-lines events on stdout instead of text and a progress bar")
