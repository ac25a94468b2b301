"""The ``deepseg`` command line (also ``python -m deepseg_core``).

Exit codes: 0 success, 2 bad input or usage, 3 model problem, 130 cancelled.
Human-readable results go to stdout; diagnostics go through :mod:`logging` to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from . import __version__
from .errors import DeepSegError
from .model_card import ModelError

EXIT_OK, EXIT_INPUT, EXIT_MODEL, EXIT_CANCELLED = 0, 2, 3, 130
if TYPE_CHECKING:
    from .model_store import ModelStore

log = logging.getLogger("deepseg")


def print_json(data: object) -> None:
    """Print ``data`` as indented strict JSON (inf/nan as strings)."""
    from .events import strict_json

    print(json.dumps(strict_json(data), indent=2))


def cmd_info(args: argparse.Namespace) -> int:
    from . import io
    from .errors import ImageError

    if args.series_uid is not None and not Path(args.image).is_dir():
        raise ImageError(
            "--series-uid picks a series of a DICOM folder, and the input is not a folder",
            subject=args.image,
            hint="Leave out --series-uid, or give the DICOM folder that holds the series.",
        )
    volume = io.read_image(args.image, series_uid=args.series_uid)
    array = volume.array_zyx
    print_json(
        {
            "path": str(args.image),
            "shape_zyx": list(volume.shape_zyx),
            "spacing_xyz_mm": list(volume.spacing_xyz_mm),
            "origin_lps": list(volume.origin_lps),
            "direction_lps": volume.direction_lps.round(6).tolist(),
            "dtype": str(array.dtype),
            "intensity": {"min": float(array.min()), "max": float(array.max()), "mean": float(array.mean())},
        }
    )
    return EXIT_OK


def cmd_phantom(args: argparse.Namespace) -> int:
    from . import io, phantoms

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(args.count):
        seed = args.seed + i
        case = phantoms.generate_phantom(
            seed=seed, profile=args.profile, shape_zyx=tuple(args.shape), spacing_xyz_mm=tuple(args.spacing)
        )
        stem = f"phantom_{args.profile}_{seed:04d}"
        io.write_image(case.image, out / f"{stem}.nrrd")
        io.write_segmentation(out / f"{stem}.seg.nrrd", case.labels, [lab.segment_info() for lab in phantoms.PHANTOM_LABELS])
        written.append({"case": stem, "lesions": len(case.lesion_radii_mm)})
    print_json({"output": str(out), "cases": written})
    return EXIT_OK


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import compare_files, compare_folders

    folders = [Path(args.prediction).is_dir(), Path(args.reference).is_dir()]
    if folders[0] != folders[1]:
        raise DeepSegError(
            "compare takes two files or two folders",
            expected="PREDICTION and REFERENCE both files, or both folders of case files",
            found=f"{'a folder' if folders[0] else 'a file'} and {'a folder' if folders[1] else 'a file'}",
        )
    if all(folders):
        result = compare_folders(
            args.prediction, args.reference, labels_json=args.labels, tolerance_mm=args.tolerance_mm, workers=args.workers
        )
        print_json(result)
    else:
        print_json(compare_files(args.prediction, args.reference, labels_json=args.labels, tolerance_mm=args.tolerance_mm))
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    summary = run_demo(Path(args.output), device=args.device)
    print(summary.as_text())
    return EXIT_OK


def cmd_segment(args: argparse.Namespace) -> int:
    from .cli_segment import run_segment
    from .events import EventSink

    ok, failed = run_segment(args, EventSink(json_mode=args.json))
    if failed:
        print(f"{failed} of {ok + failed} case(s) failed; see the messages above", file=sys.stderr)
        return EXIT_INPUT
    return EXIT_OK


def prepare_for_this_computer(ref: str, store: ModelStore, json_mode: bool, origin: str) -> int:
    """Export and compile a newly stored model's network for this computer's default backend, so that its
    first segmentation does not; returns the command's exit code.

    ``deepseg models import`` and ``deepseg train`` call this once the version is in the store (``origin``,
    ``"imported"`` or ``"stored"``, says so in messages). The version stands whatever happens here: a failure is
    logged and left to the first run (exit 0), and a Cancel (KeyboardInterrupt) gives ``EXIT_CANCELLED`` with
    what was left undone, or exit 0 when it landed once the network was prepared.
    """
    done: list[str] = []
    try:
        _prepare(ref, store, json_mode, done, origin)
    except KeyboardInterrupt:  # Cancel in a panel: the version itself is stored and stays
        if "prepared" in done:  # it landed after the work: nothing was left undone
            print(f"cancelled after {ref} was {origin} and prepared: nothing was left undone", file=sys.stderr)
            return EXIT_OK
        return cancelled_before_preparing(ref, origin)
    return EXIT_OK


def cancelled_before_preparing(ref: str, origin: str) -> int:
    """Say that a cancel kept the stored version ``ref`` but left its network unprepared; the exit code."""
    print(f"cancelled: {ref} is {origin}; its network was not prepared (its first run will)", file=sys.stderr)
    return EXIT_CANCELLED


def _prepare(ref: str, store: ModelStore, json_mode: bool, done: list[str], origin: str) -> None:
    """:func:`prepare_for_this_computer`'s work (nothing to do where PyTorch runs the network, as on CUDA). A
    failure is logged, never raised; ``done`` gets ``"prepared"`` once nothing is left to do, so that a cancel
    landing after that is not reported as an unprepared network."""
    from .events import to_json_line
    from .inference import Segmenter, SegmentOptions, choose_device
    from .inference.backends import choose_backend
    from .inference.predictor import preparing_message

    def say(event: dict) -> None:
        print(to_json_line(event) if json_mode else event["message"], flush=True)

    try:
        chosen = choose_backend("auto", choose_device("auto")).name
        if chosen == "torch":  # CUDA, or no CPU runtime installed: nothing to export (and no GPU load for nothing)
            return
        segmenter = Segmenter.load(ref, device="cpu", store=store)
        if segmenter.needs_preparing(SegmentOptions(device="cpu")):  # not for weights prepared already
            say({"event": "status", "message": preparing_message(chosen)})
        stages = segmenter.prepare_backend(SegmentOptions(device="cpu"))
        done.append("prepared")
    except Exception as exc:  # the version stands; the first run exports the network instead
        log.warning("%s is %s, but its network could not be prepared here (%s): the first run will", ref, origin, exc)
        return
    seconds = sum(float(stage["seconds"]) for stage in stages)
    fell_back = [stage for stage in stages if stage["backend"] != chosen]
    if fell_back:
        reason = fell_back[0].get("reason", "")
        message = f"{ref} is {origin}, but {chosen} could not run its network; it runs on PyTorch ({reason})"
        log.warning("%s", message)
    else:
        message = f"prepared {ref} for {chosen} on this computer in {seconds:.1f} s"
    say({"event": "prepared", "model": ref, "stages": stages, "message": message})


def cmd_models(args: argparse.Namespace) -> int:
    from .model_store import ModelStore, bundled_models, read_model_folder, resolve_model

    store = ModelStore(args.models_dir)
    if args.action == "list":
        rows = store.list()
        stored = {r["name"] for r in rows}
        for name, folder in bundled_models().items():
            if name not in stored:
                card = read_model_folder(folder)
                rows.append(
                    {
                        "name": name,
                        "version": card.version,
                        "parent_version": card.parent_version,
                        "active": True,
                        "created": card.created,
                        "labels": [lab.name for lab in card.labels],
                        "description": card.description,
                        "bundled": True,
                    }
                )
        if args.json:
            print_json(rows)
        else:
            print(f"store: {store.root}")
            for row in rows:
                flag = "*" if row["active"] else " "
                origin = " (bundled)" if row.get("bundled") else ""
                print(f" {flag} {row['name']}:{row['version']}{origin}  parent={row['parent_version']}  labels={row['labels']}")
        return EXIT_OK
    if args.action == "show":
        card = read_model_folder(resolve_model(args.ref, store))
        print_json(card.to_json_dict())
        return EXIT_OK
    if args.action == "import":
        from .importers import import_model

        options = {
            key: value
            for key, value in (
                ("folds", args.folds),
                ("configuration", args.configuration),
                ("checkpoint", args.checkpoint),
                ("reorient", args.reorient),
            )
            if value is not None
        }
        card = import_model(args.ref, store, name=args.name, activate=not args.no_activate, **options)
        if args.json:  # JSON-lines events, as the Slicer panel reads them
            from .events import to_json_line

            event = {"event": "imported", "model": card.ref, "source": card.source, "labels": [x.name for x in card.labels]}
            print(to_json_line(event), flush=True)
        else:
            origin = f" from {card.source['format']}" if card.source.get("format") else ""
            print(f"imported {card.ref}{origin} into {store.root}", flush=True)
        return EXIT_OK if args.no_prepare else prepare_for_this_computer(card.ref, store, args.json, "imported")
    if args.action == "activate":
        version = store.activate(args.ref)
        print(f"{args.ref.split(':')[0]}: active version is now {version}")
        return EXIT_OK
    version = store.rollback(args.ref)
    print(f"{args.ref}: rolled back to version {version}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepseg", description="Deep-learning segmentation of CT and MR volumes.")
    parser.add_argument("--version", action="version", version=f"deepseg {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages to stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="show an image's geometry and intensity range")
    p.add_argument("image", help="NRRD / NIfTI / MHA file or DICOM folder")
    p.add_argument("--series-uid", default=None, metavar="UID", help="the series to read from a DICOM folder of several")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("phantom", help="generate synthetic cases with ground truth")
    p.add_argument("--output", required=True, help="folder to write <case>.nrrd and <case>.seg.nrrd into")
    p.add_argument("--profile", default="ct-A", help="scanner profile (ct-A, ct-B, ct-C, mr-A, mr-B, mr-C)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--shape", type=int, nargs=3, default=(40, 96, 96), metavar=("Z", "Y", "X"))
    p.add_argument("--spacing", type=float, nargs=3, default=(1.5, 1.5, 2.5), metavar=("X_MM", "Y_MM", "Z_MM"))
    p.set_defaults(func=cmd_phantom)

    p = sub.add_parser("compare", help="metrics per segment of a prediction against a reference (.seg.nrrd or label map)")
    p.add_argument("prediction", help=".seg.nrrd, or a label map image (.nii.gz, .nii, .nrrd, .mha); or a folder of them")
    p.add_argument(
        "reference",
        help=".seg.nrrd, or a label map image such as a dataset's labelsTr/CASE.nii.gz; or a folder of them "
        "(cases matched by file name, a mean per segment)",
    )
    p.add_argument(
        "--labels",
        metavar="DATASET_JSON",
        help="names of a label map's values: an nnU-Net / DeepSeg dataset.json, labels or nnU-Net regions "
        "(default: the dataset.json beside the labelsTr / labelsTs folder holding the label map)",
    )
    p.add_argument("--tolerance-mm", type=float, default=2.0, help="surface Dice tolerance")
    p.add_argument(
        "--workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="folders: cases scored at once (default: up to 4, one per core; each holds its two label maps)",
    )
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("demo", help="the README's main job: segment the bundled sample with the bundled model")
    p.add_argument("--output", default="deepseg_demo", help="folder for the results")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.set_defaults(func=cmd_demo)

    from .cli_segment import add_segment_parser

    add_segment_parser(sub)
    sub.choices["segment"].set_defaults(func=cmd_segment)

    from .cli_dataset import add_dataset_parser
    from .cli_train import add_train_parsers

    add_dataset_parser(sub)
    add_train_parsers(sub)

    p = sub.add_parser(
        "models",
        help="the versioned model store: list, show, import (DeepSeg, nnU-Net v2, MONAI bundle), activate, rollback",
    )
    p.add_argument("action", choices=["list", "show", "import", "activate", "rollback"])
    p.add_argument("ref", nargs="?", help="NAME[:VERSION] (show, activate), a model FOLDER (import), NAME (rollback)")
    p.add_argument("--models-dir", default=None, help="model store folder (default $DEEPSEG_MODELS or ~/.deepseg/models)")
    p.add_argument("--no-activate", action="store_true", help="import without making it the active version")
    p.add_argument(
        "--no-prepare",
        action="store_true",
        help="import: do not export and compile the network for this computer's CPU runtime now (the first run will)",
    )
    p.add_argument("--name", default=None, help="import: the model's name in the store (default: from the source)")
    p.add_argument("--folds", nargs="+", default=None, help="import (nnU-Net): folds to ensemble (default: every fold found)")
    p.add_argument(
        "--configuration", default=None, help="import (nnU-Net): 2d, 3d_fullres or 3d_lowres when the folder is ambiguous"
    )
    p.add_argument("--checkpoint", default=None, help="import (nnU-Net): checkpoint_final.pth (default) or checkpoint_best.pth")
    p.add_argument(
        "--reorient",
        default=None,
        metavar="{none,ras}",
        help="import (nnU-Net): ras = reorient to the closest RAS orientation before nnU-Net and back after, as "
        "TotalSegmentator does (use it for its models); none (default) = the voxels as read, as nnU-Net itself",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output (list, import)")
    p.set_defaults(func=cmd_models)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    import signal

    from .inference.sliding_window import Cancelled

    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is cmd_models and args.action != "list" and not args.ref:
        parser.error(f"models {args.action} needs a NAME[:VERSION] or FOLDER argument")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, terminate)  # the Slicer module's Cancel terminates us
    try:
        return int(args.func(args))
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_MODEL
    except (Cancelled, KeyboardInterrupt):
        print("cancelled: nothing was written for the unfinished case", file=sys.stderr)
        return EXIT_CANCELLED
    except DeepSegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(argv: Sequence[str] | None = None) -> NoReturn:
    """The ``deepseg`` program (``python -m deepseg_core`` and the console script): :func:`main`, then exit
    without tearing the interpreter down object by object.

    That teardown freed torch's and OpenVINO's modules for 0.7 to 1 s after a run's last output, and the
    Slicer panel waits for the process to exit before it applies a result or an import
    (``Testing/Benchmarks/bench_engine_exit.py``). The steps of Python's own exit that matter still happen,
    in its order: threads that are not daemons are joined, the ``atexit`` callbacks run (logging's flush),
    and the standard streams are flushed (a failure other than a closed pipe gives exit code 120, as
    Python's exit does); then the process ends with main's code. Skipped are the teardown of Python's
    objects (finalizers of objects still alive) and the C library's exit (native ``atexit`` handlers and
    destructors, unflushed C ``stdio``), none of which DeepSeg's outputs depend on. Before :func:`main`, the
    OpenMP spin count is shortened (:mod:`.openmp_waits`). A Cancel (SIGTERM) that
    lands while :func:`main` restores its handler ends the run as cancelled (130). Any other exception out
    of :func:`main` (a bug, ``--help``) takes Python's usual way out.
    """
    import atexit
    import threading

    from .openmp_waits import shorten_openmp_spinning

    shorten_openmp_spinning()  # before anything loads torch, which loads OpenMP
    try:
        code = main(argv)
    except KeyboardInterrupt:  # main restores the SIGTERM handler last, and a pending signal runs first
        print("cancelled", file=sys.stderr)
        code = EXIT_CANCELLED
    join_threads = getattr(threading, "_shutdown", None)  # CPython's own first step of an exit
    if join_threads is None:  # another Python: leave the exit to it
        sys.exit(code)
    try:
        join_threads()
    except BaseException as exc:  # Ctrl-C while waiting, or a failing thread hook: reported, and the exit goes on
        log.warning("at exit, waiting for the running threads stopped: %r", exc)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        if stream is None:  # no console (pythonw)
            continue
        try:
            stream.flush()
        except (BrokenPipeError, ValueError):  # the reader has gone, or the stream was closed
            pass
        except OSError as exc:  # e.g. a full disk under `deepseg ... > file`: the output is incomplete
            code = 120
            log.error("the output could not be written in full: %s", exc)
    os._exit(code)
