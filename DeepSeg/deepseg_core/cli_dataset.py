"""``deepseg dataset create|add|add-label|info|validate``: training datasets from the command line."""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import numpy as np

from . import io
from .datasets import CaseProvenance, Dataset, DatasetError, correction_effort, default_color, validate_dataset
from .errors import ImageError
from .model_card import LabelSpec


def _parse_label(text: str) -> LabelSpec:
    """``VALUE:NAME`` or ``VALUE:NAME:thing``."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[0].isdigit() or (len(parts) == 3 and parts[2] not in ("thing", "stuff")):
        raise DatasetError("invalid --label", expected="VALUE:NAME or VALUE:NAME:thing", found=text)
    value = int(parts[0])
    return LabelSpec(value, parts[1], default_color(value), thing=len(parts) == 3 and parts[2] == "thing")


def _labels_from_model(ref: str, models_dir: str | None) -> tuple[list[LabelSpec], tuple[str, ...]]:
    from .model_store import ModelStore, read_model_folder, resolve_model

    card = read_model_folder(resolve_model(ref, ModelStore(models_dir)))
    return list(card.labels), tuple(card.inputs.channels)


def _read_labelmap(path: Path, dataset: Dataset, grid: io.Volume) -> np.ndarray:
    """A ``.seg.nrrd`` (segments mapped to schema values by name) or a labelmap image."""
    if io.is_segmentation_file(path):
        segmentation = io.read_segmentation(path)
        segments = [(s.name, functools.partial(segmentation.mask, s.name)) for s in segmentation.segments]
        volume = segmentation.grid.with_array(dataset.labelmap_from_segments(segmentation.grid.shape_zyx, segments))
    else:
        volume = io.read_image(path)
    try:
        return np.asarray(io.place_on_grid(volume, grid, subject=path).array_zyx)
    except ImageError as exc:
        raise DatasetError(exc.problem, subject=path, expected=exc.expected, found=exc.found, hint=exc.hint) from exc


def cmd_dataset(args: argparse.Namespace) -> int:
    """Dispatch ``deepseg dataset ACTION``."""
    folder = Path(args.folder)
    if args.action == "create":
        if args.labels_from:
            labels, channels = _labels_from_model(args.labels_from, args.models_dir)
        else:
            labels = [_parse_label(t) for t in args.label or []]
            channels = tuple(args.channels.split(","))
        dataset = Dataset.create(folder, args.name or folder.name, labels, channels, args.file_ending, args.ignore_value)
        print(f"created dataset {dataset.name} in {folder}: channels {', '.join(channels)}; labels {dataset.summary()['labels']}")
        return 0
    if args.action == "validate":
        problems = validate_dataset(folder)
        if args.json:
            print(json.dumps({"folder": str(folder), "ok": not problems, "problems": [p.__dict__ for p in problems]}, indent=2))
        else:
            for problem in problems:
                print(problem)
            print(f"{folder}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
        return 0 if not problems else 2
    dataset = Dataset.open(folder)
    if args.action == "info":
        print(json.dumps(dataset.summary(), indent=2))
        return 0
    if args.action == "add-label":
        if args.value is None or not args.name:
            raise DatasetError("add-label needs --name and --value")
        dataset.add_label(LabelSpec(args.value, args.name, default_color(args.value), thing=args.thing))
        print(f"{folder}: label {args.value}={args.name} added")
        return 0
    # add
    if not args.case or not args.image or not args.labels:
        raise DatasetError("dataset add needs --case, --image (one per channel) and --labels")
    images = [io.read_image(p) for p in args.image]
    label_zyx = _read_labelmap(Path(args.labels), dataset, images[0])
    provenance = CaseProvenance(source=args.source or str(args.image[0]), predicted_by=args.predicted_by)
    if args.prediction:
        predicted = _read_labelmap(Path(args.prediction), dataset, images[0])
        effort = correction_effort(predicted, label_zyx, [label.value for label in dataset.labels], images[0].voxel_volume_ml)
        provenance = CaseProvenance(**{**provenance.__dict__, **effort})
    record = dataset.add_case(args.case, images, label_zyx, provenance, split=args.split, overwrite=args.overwrite)
    print(f"{folder}: case {record.case_id} added to {record.split} ({len(dataset.cases)} cases)")
    return 0


def add_dataset_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``deepseg dataset``."""
    p = sub.add_parser("dataset", help="training datasets (nnU-Net v2 layout + manifest): create, add, validate, info")
    p.add_argument("action", choices=["create", "add", "add-label", "info", "validate"])
    p.add_argument("folder", help="the dataset folder")
    p.add_argument("--name", help="dataset name (create) or label name (add-label)")
    p.add_argument("--label", action="append", help="create: VALUE:NAME[:thing], repeatable")
    p.add_argument("--labels-from", help="create: take labels and channels from a model (NAME[:VERSION] or folder)")
    p.add_argument("--channels", default="CT", help="create: channel names, comma-separated (default CT)")
    p.add_argument("--file-ending", default=".nii.gz", choices=[".nii.gz", ".nii", ".nrrd", ".mha"])
    p.add_argument("--ignore-value", type=int, default=None, help="create: label value of unreviewed voxels")
    p.add_argument("--value", type=int, help="add-label: the new label's value")
    p.add_argument("--thing", action="store_true", help="add-label: countable objects (lesions)")
    p.add_argument("--case", help="add: case id")
    p.add_argument("--image", nargs="+", help="add: image file(s), one per channel")
    p.add_argument("--labels", help="add: corrected labels (.seg.nrrd by segment name, or a labelmap image)")
    p.add_argument("--prediction", help="add: the model's uncorrected output, to record the correction effort")
    p.add_argument("--predicted-by", help="add: NAME:VERSION of the model that predicted it")
    p.add_argument("--source", help="add: where the case came from")
    p.add_argument("--split", choices=["train", "validation"], default=None)
    p.add_argument("--overwrite", action="store_true", help="add: replace an existing case")
    p.add_argument("--models-dir", default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_dataset)
