"""Training datasets: nnU-Net v2 layout plus a DeepSeg manifest with provenance and a fixed split.

Layout (``nnU-Net v2`` reads it unchanged)::

    DATASET/
      dataset.json                 channel_names, labels {name: value}, numTraining, file_ending
      deepseg.json                 the DeepSeg manifest (below)
      imagesTr/<case>_<ch:04d><file_ending>
      labelsTr/<case><file_ending>

The manifest holds the label schema (value, name, colour, terminology code, thing/stuff), an optional
``ignore_value`` (voxels nobody reviewed; the losses skip them), per-case provenance (where the case
came from, which model version predicted it, how much the user changed, when it was added) and the
validation split. The split is drawn once (:meth:`Dataset.ensure_split`) and stored; cases added
later go to training unless the caller says ``split="validation"``, so a model's validation metrics
stay comparable with its parent's.

A case's files and the updated ``dataset.json`` and manifest are written as one commit
(:func:`deepseg_core.fileutil.staged_commit`): staged beside their targets, then renamed into place
under a journal. An error or a kill before the journal leaves the dataset as it was (an existing
case included); after it, :meth:`Dataset.open` finishes the commit. So no reader ever sees a case
without its manifest entry or the reverse, and an existing case is replaced only when the caller
asks for it explicitly.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from . import io
from .errors import DeepSegError
from .fileutil import check_writable_folder, exclusive_lock, recover_commits, staged_commit
from .model_card import LabelSpec, TerminologyCode

log = logging.getLogger(__name__)

MANIFEST_NAME = "deepseg.json"
MANIFEST_FORMAT = 1
CASE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
#: "liver lesion 3" (DeepSeg's instances) or "liver lesion_2" (Slicer's Islands effect, "Split islands to segments")
INSTANCE_NAME_PATTERN = re.compile(r"^(?P<base>.+)[ _](?P<index>\d+)$")
SPLITS = ("train", "validation")


class DatasetError(DeepSegError):
    """A dataset folder, case or label schema problem."""


T = TypeVar("T")

#: in the dataset's folder: held while a process changes its manifest (:func:`_one_writer`)
WRITE_LOCK_NAME = ".deepseg-write.lock"


def _one_writer(change: Callable[..., T]) -> Callable[..., T]:
    """One process at a time changes a dataset, on what is on disk now: each change rewrites the manifest
    from the cases it holds, so an export running beside another (two Slicer sessions) or beside a training
    that fixes the split would have dropped the other's case from the manifest, its files left as strays."""

    @functools.wraps(change)
    def locked(self: Dataset, *args: Any, **kwargs: Any) -> T:
        with exclusive_lock(self.root / WRITE_LOCK_NAME):
            self._reread()
            return change(self, *args, **kwargs)

    return locked


@dataclass(frozen=True)
class CaseProvenance:
    """Where a case came from and what it cost to correct.

    Attributes:
        source: free text (the original file, a Slicer scene, a PACS accession).
        predicted_by: ``name:version`` of the model whose output the user corrected, or None.
        changed_voxels: voxels whose label differs between prediction and correction.
        changed_ml: the same in millilitres.
        dice_prediction_vs_correction: mean Dice over the schema's labels between the prediction
            and the corrected mask (1.0 = nothing corrected); None without a prediction.
        added: ISO 8601 UTC time the case was written.
    """

    source: str = ""
    predicted_by: str | None = None
    changed_voxels: int | None = None
    changed_ml: float | None = None
    dice_prediction_vs_correction: float | None = None
    added: str = ""


@dataclass
class CaseRecord:
    """One case of the manifest."""

    case_id: str
    split: str = "train"
    provenance: CaseProvenance = field(default_factory=CaseProvenance)


@dataclass(frozen=True)
class Problem:
    """One thing :func:`validate_dataset` found wrong."""

    case: str
    message: str

    def __str__(self) -> str:
        return f"{self.case}: {self.message}"


def correction_effort(predicted_zyx: np.ndarray, corrected_zyx: np.ndarray, labels: Sequence[int], voxel_ml: float) -> dict:
    """How much a user changed a prediction.

    Args:
        predicted_zyx: labelmap the model produced ``(Z, Y, X)``.
        corrected_zyx: labelmap after correction, same shape.
        labels: foreground label values to average Dice over (labels empty in both count as 1.0).
        voxel_ml: volume of one voxel in millilitres.

    Returns:
        ``{"changed_voxels", "changed_ml", "dice_prediction_vs_correction"}``.
    """
    from .metrics import dice

    if predicted_zyx.shape != corrected_zyx.shape:
        raise DatasetError(
            "prediction and correction are on different grids",
            expected=str(corrected_zyx.shape),
            found=str(predicted_zyx.shape),
        )
    changed = int(np.count_nonzero(predicted_zyx != corrected_zyx))
    scores = [dice(predicted_zyx == v, corrected_zyx == v) for v in labels]
    return {
        "changed_voxels": changed,
        "changed_ml": changed * voxel_ml,
        "dice_prediction_vs_correction": float(np.mean(scores)) if scores else 1.0,
    }


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat()


def _refuse_regions(root: Path, nn_labels: dict[str, Any]) -> None:
    """A plain nnU-Net dataset whose ``dataset.json`` declares regions (BraTS' ``"whole tumor": [1, 2, 3]``) names
    regions, not label values; writing to it as a DeepSeg dataset would rewrite its labels without them."""
    regions = [name for name, value in nn_labels.items() if isinstance(value, list) and len(value) > 1]
    if regions:
        raise DatasetError(
            "dataset.json declares nnU-Net regions, which name unions of label values, not the values themselves",
            subject=root / "dataset.json",
            expected="labels {name: value}, one name per value (DeepSeg writes dataset.json that way)",
            found=f"regions {regions}",
            hint="Create a DeepSeg dataset with the region model's value names (deepseg dataset create DIR "
            "--labels-from MODEL) and add these cases to it with deepseg dataset add; this folder stays as it is.",
        )


def _label_to_json(label: LabelSpec) -> dict[str, Any]:
    entry: dict[str, Any] = {"value": label.value, "name": label.name, "color": list(label.color), "thing": label.thing}
    if label.code is not None:
        entry["code"] = {"scheme": label.code.scheme, "value": label.code.value, "meaning": label.code.meaning}
    return entry


def _label_from_json(entry: dict[str, Any]) -> LabelSpec:
    code = entry.get("code")
    return LabelSpec(
        value=int(entry["value"]),
        name=str(entry["name"]),
        color=tuple(float(c) for c in entry.get("color", (0.5, 0.5, 0.5))),
        code=TerminologyCode(code["scheme"], code["value"], code["meaning"]) if code else None,
        thing=bool(entry.get("thing", False)),
    )


def default_color(value: int) -> tuple[float, float, float]:
    """A distinct, reproducible colour for a label value without one."""
    golden = (value * 0.618033988749895) % 1.0
    return (round(0.3 + 0.7 * golden, 3), round(0.9 - 0.6 * golden, 3), round(0.4 + 0.5 * ((value * 0.37) % 1.0), 3))


class Dataset:
    """A dataset folder. Open with :meth:`open`, make with :meth:`create`."""

    def __init__(
        self,
        root: Path,
        name: str,
        channel_names: tuple[str, ...],
        labels: tuple[LabelSpec, ...],
        file_ending: str,
        ignore_value: int | None,
        cases: dict[str, CaseRecord],
        split_fixed: dict[str, Any] | None,
    ) -> None:
        self.root = root
        self.name = name
        self.channel_names = channel_names
        self.labels = labels
        self.file_ending = file_ending
        self.ignore_value = ignore_value
        self.cases = cases
        self.split_fixed = split_fixed

    # -- creation and loading ------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        root: str | Path,
        name: str,
        labels: Sequence[LabelSpec],
        channel_names: Sequence[str] = ("CT",),
        file_ending: str = ".nii.gz",
        ignore_value: int | None = None,
    ) -> Dataset:
        """Make an empty dataset folder. Refused if ``root`` already holds a dataset or other files."""
        root = Path(root)
        if (root / "dataset.json").exists():
            raise DatasetError("a dataset already exists here", subject=root, hint="Open it instead of creating it.")
        if root.exists() and any(root.iterdir()):
            raise DatasetError(
                "folder is not empty",
                subject=root,
                expected="a new or empty folder",
                found=f"{len(list(root.iterdir()))} entries",
            )
        if file_ending not in (".nii.gz", ".nii", ".nrrd", ".mha"):
            raise DatasetError("unsupported file ending", expected=".nii.gz, .nii, .nrrd or .mha", found=file_ending)
        if not channel_names:
            raise DatasetError("a dataset needs at least one channel", found="no channel names")
        cls._check_schema(labels, ignore_value)
        root.mkdir(parents=True, exist_ok=True)
        check_writable_folder(root / "dataset.json")
        (root / "imagesTr").mkdir(exist_ok=True)
        (root / "labelsTr").mkdir(exist_ok=True)
        dataset = cls(
            root, name, tuple(channel_names), tuple(sorted(labels, key=lambda x: x.value)), file_ending, ignore_value, {}, None
        )
        dataset.save()
        return dataset

    @classmethod
    def open(cls, root: str | Path) -> Dataset:
        """Read a dataset; a plain nnU-Net v2 dataset (no manifest) gets a schema from its labels."""
        root = Path(root)
        if not root.is_dir():
            raise DatasetError("dataset folder not found", subject=root, hint="Create it with `deepseg dataset create`.")
        cls.recover(root)
        try:
            meta = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DatasetError("not a dataset", subject=root, expected="dataset.json (nnU-Net v2 layout)", found="none") from None
        except json.JSONDecodeError as exc:
            raise DatasetError("dataset.json is not valid JSON", subject=root, found=str(exc)) from None
        try:
            channels = tuple(str(meta["channel_names"][k]) for k in sorted(meta["channel_names"], key=int))
            nn_labels = {str(k): v for k, v in meta["labels"].items()}
            file_ending = str(meta["file_ending"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DatasetError(
                "dataset.json lacks a field", subject=root, expected="channel_names, labels, file_ending", found=str(exc)
            ) from None
        manifest_path = root / MANIFEST_NAME
        if manifest_path.exists():
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            if manifest.get("format") != MANIFEST_FORMAT:
                raise DatasetError(
                    "unknown manifest format",
                    subject=manifest_path,
                    expected=str(MANIFEST_FORMAT),
                    found=str(manifest.get("format")),
                )
            labels = tuple(_label_from_json(e) for e in manifest["labels"])
            ignore_value = manifest.get("ignore_value")
            cases = {
                cid: CaseRecord(cid, rec.get("split", "train"), CaseProvenance(**rec.get("provenance", {})))
                for cid, rec in manifest.get("cases", {}).items()
            }
            split_fixed = manifest.get("split_fixed")
            name = manifest.get("name", meta.get("name", root.name))
        else:
            _refuse_regions(root, nn_labels)
            # one-value lists (``"liver": [1]``) are plain labels, as nnU-Net reads them
            nn_labels = {k: v[0] if isinstance(v, list) and len(v) == 1 else v for k, v in nn_labels.items()}
            ignore_value = nn_labels.pop("ignore", None)
            labels = tuple(
                LabelSpec(int(v), k, default_color(int(v)))
                for k, v in sorted(nn_labels.items(), key=lambda kv: int(kv[1]))
                if int(v) > 0
            )
            cases = {cid: CaseRecord(cid) for cid in _cases_on_disk(root, file_ending)}
            split_fixed, name = None, meta.get("name", root.name)
        return cls(root, name, channels, labels, file_ending, ignore_value, cases, split_fixed)

    @staticmethod
    def recover(root: str | Path) -> None:
        """Finish a case write that a killed process left after its journal, or discard one it left before.

        :meth:`open` calls it, so a reader sees either the old dataset or the whole new case.
        """
        root = Path(root)
        report = recover_commits([root, root / "imagesTr", root / "labelsTr"])
        if report:
            log.warning("%s: an interrupted write was recovered: %s", root, report.summary())

    @staticmethod
    def _check_schema(labels: Sequence[LabelSpec], ignore_value: int | None) -> None:
        values = [label.value for label in labels]
        names = [label.name for label in labels]
        if not labels:
            raise DatasetError("a dataset needs at least one foreground label", found="no labels")
        if len(set(values)) != len(values) or len(set(names)) != len(names):
            raise DatasetError("label values and names must be unique", found=f"values {values}, names {names}")
        if min(values) < 1 or max(values) > 254:
            raise DatasetError("label values must be within 1..254 (0 is background)", found=str(values))
        if ignore_value is not None and (ignore_value in values or not 1 <= ignore_value <= 255):
            raise DatasetError("ignore value must be a free value in 1..255", found=str(ignore_value))

    # -- writing -------------------------------------------------------------------------------

    def save(self) -> None:
        """Write ``dataset.json`` and the manifest together (one commit: both or neither)."""
        texts = self._metadata(self.cases)
        with staged_commit(list(texts)) as commit:
            for path, text in texts.items():
                commit.stage(path).write_text(text, encoding="utf-8")

    def _metadata(self, cases: dict[str, CaseRecord]) -> dict[Path, str]:
        """The manifest's and ``dataset.json``'s text for ``cases`` (the manifest first: it holds the journal)."""
        nn_labels: dict[str, int] = {"background": 0}
        nn_labels.update({label.name: label.value for label in self.labels})
        if self.ignore_value is not None:
            nn_labels["ignore"] = self.ignore_value
        meta = {
            "name": self.name,
            "channel_names": {str(i): name for i, name in enumerate(self.channel_names)},
            "labels": nn_labels,
            "numTraining": len(cases),
            "file_ending": self.file_ending,
        }
        manifest = {
            "format": MANIFEST_FORMAT,
            "name": self.name,
            "labels": [_label_to_json(label) for label in self.labels],
            "ignore_value": self.ignore_value,
            "split_fixed": self.split_fixed,
            "cases": {cid: {"split": rec.split, "provenance": rec.provenance.__dict__} for cid, rec in sorted(cases.items())},
        }
        return {
            self.root / MANIFEST_NAME: json.dumps(manifest, indent=2) + "\n",
            self.root / "dataset.json": json.dumps(meta, indent=2) + "\n",
        }

    def image_paths(self, case_id: str) -> list[Path]:
        """``imagesTr/<case>_<ch:04d><ending>`` for every channel."""
        return [self.root / "imagesTr" / f"{case_id}_{i:04d}{self.file_ending}" for i in range(len(self.channel_names))]

    def label_path(self, case_id: str) -> Path:
        """``labelsTr/<case><ending>``."""
        return self.root / "labelsTr" / f"{case_id}{self.file_ending}"

    def label_by_name(self, name: str) -> LabelSpec:
        """The schema's label called ``name``; the error says how to add a new one."""
        for label in self.labels:
            if label.name == name:
                return label
        raise DatasetError(
            f"segment {name!r} is not in the dataset's label schema",
            subject=self.root,
            expected=", ".join(f"{label.value}={label.name}" for label in self.labels),
            found=name,
            hint=(
                f"Rename the segment to one of the schema's names, or add the label first: "
                f"`deepseg dataset add-label {self.root} --name '{name}' --value N`."
            ),
        )

    def value_for_segment(self, name: str) -> int:
        """Schema value of a segment name; an instance of a thing label maps to it: ``"liver lesion 3"``, and the
        pieces Slicer's Islands effect splits a segment into, ``"liver lesion_2"`` or ``"liver lesion 3_2"``."""
        try:
            return self.label_by_name(name).value
        except DatasetError:
            match = INSTANCE_NAME_PATTERN.match(name)
            while match:
                # the first base that names a label decides: a thing's instance, or no instance at all
                label = next((label for label in self.labels if label.name == match["base"]), None)
                if label is not None:
                    if label.thing:
                        return label.value
                    break
                match = INSTANCE_NAME_PATTERN.match(match["base"])
            raise

    def labelmap_from_segments(
        self, shape_zyx: tuple[int, int, int], segments: Iterable[tuple[str, Callable[[], np.ndarray]]]
    ) -> np.ndarray:
        """Named segments as one uint8 labelmap ``(Z, Y, X)`` of the schema's values.

        Args:
            shape_zyx: the grid's shape.
            segments: ``(segment name, function returning its boolean mask)``; every name must be
                in the schema (instances map to their thing label) before any mask is computed.

        Where segments overlap the higher schema value wins (a lesion drawn over the organ stays a
        lesion).
        """
        valued = sorted(
            ((self.value_for_segment(name), index, mask_of) for index, (name, mask_of) in enumerate(segments)),
            key=lambda entry: entry[:2],
        )
        labels = np.zeros(shape_zyx, np.uint8)
        for value, _, mask_of in valued:
            labels[mask_of()] = value
        return labels

    def _reread(self) -> None:
        """Take the schema, cases and split as they are on disk now (another process may have changed them)."""
        current = Dataset.open(self.root)
        self.labels, self.ignore_value, self.cases, self.split_fixed = (
            current.labels,
            current.ignore_value,
            current.cases,
            current.split_fixed,
        )

    @_one_writer
    def add_label(self, label: LabelSpec) -> None:
        """Extend the schema by one label (existing cases keep their values)."""
        self._check_schema((*self.labels, label), self.ignore_value)
        self.labels = tuple(sorted((*self.labels, label), key=lambda x: x.value))
        self.save()

    def _check_case_files_free(self, case_id: str, overwrite: bool) -> None:
        """Refuse a new case whose files would be another case's: an id that differs from a listed one only in
        letter case (the same files on Windows and macOS), or files of this id on disk that the manifest does
        not list (a stray, which ``dataset validate`` reports), unless ``overwrite``."""
        same_but_case = [other for other in self.cases if other != case_id and other.casefold() == case_id.casefold()]
        if same_but_case:
            raise DatasetError(
                f"case {case_id!r} differs from the existing case {same_but_case[0]!r} only in letter case",
                subject=self.root,
                hint="On Windows and macOS both names are the same files. Choose another case id, or use the existing one "
                "(with overwrite=True / --overwrite to replace it).",
            )
        if case_id in self.cases or overwrite:
            return
        strays = [path for path in (*self.image_paths(case_id), self.label_path(case_id)) if path.exists()]
        if strays:
            raise DatasetError(
                f"case {case_id!r} is not in the dataset's manifest, but files of it are",
                subject=self.root,
                found=", ".join(str(path.relative_to(self.root)) for path in strays),
                hint="Choose another case id, or replace those files explicitly (overwrite=True / --overwrite).",
            )

    @_one_writer
    def add_case(
        self,
        case_id: str,
        images: Sequence[io.Volume],
        label_zyx: np.ndarray,
        provenance: CaseProvenance | None = None,
        split: str | None = None,
        overwrite: bool = False,
    ) -> CaseRecord:
        """Write one case (images + labelmap) and record it in the manifest.

        Args:
            case_id: letters, digits, ``_ . -`` (nnU-Net appends ``_0000`` itself).
            images: one :class:`io.Volume` per channel, all on one grid.
            label_zyx: integer labelmap ``(Z, Y, X)`` on that grid; values 0, the schema's values,
                or the ignore value.
            provenance: where it came from; ``added`` is filled in.
            split: ``"train"`` (default for new cases) or ``"validation"``; an existing case keeps
                its split when replaced unless one is given.
            overwrite: replace an existing case. Without it an existing case is refused.

        Raises:
            DatasetError: naming the case and the problem; nothing is written then.
        """
        if not CASE_ID_PATTERN.match(case_id):
            raise DatasetError("invalid case id", expected="letters, digits, '_', '.', '-' (max 100)", found=repr(case_id))
        if case_id in self.cases and not overwrite:
            raise DatasetError(
                f"case {case_id!r} already exists",
                subject=self.root,
                hint="Choose another case id, or replace it explicitly (overwrite=True / --overwrite).",
            )
        self._check_case_files_free(case_id, overwrite)
        if split is not None and split not in SPLITS:
            raise DatasetError("unknown split", expected=" or ".join(SPLITS), found=split)
        if len(images) != len(self.channel_names):
            raise DatasetError(
                f"case {case_id!r} has the wrong number of channels",
                expected=f"{len(self.channel_names)} ({', '.join(self.channel_names)})",
                found=str(len(images)),
            )
        grid = images[0]
        for channel, image in zip(self.channel_names, images, strict=True):
            if not image.same_grid(grid):
                raise DatasetError(f"case {case_id!r}: channel {channel} is on another grid than channel {self.channel_names[0]}")
        label_zyx = np.asarray(label_zyx)
        if label_zyx.shape != grid.shape_zyx:
            raise DatasetError(
                f"case {case_id!r}: label and image shapes differ", expected=str(grid.shape_zyx), found=str(label_zyx.shape)
            )
        self._check_label_values(case_id, label_zyx)
        previous = self.cases.get(case_id)
        record = CaseRecord(
            case_id,
            split or (previous.split if previous else "train"),
            CaseProvenance(**{**(provenance or CaseProvenance()).__dict__, "added": _now()}),
        )
        if self.split_fixed is not None and record.split == "validation" and previous is None:
            log.info("case %s added to the fixed validation split on request", case_id)
        files = [*self.image_paths(case_id), self.label_path(case_id)]
        volumes = [*images, grid.with_array(label_zyx.astype(np.uint8))]
        texts = self._metadata({**self.cases, case_id: record})
        # One commit for the case's files and the metadata naming it: a kill before the journal
        # keeps the old case (when replacing one), after it the next open finishes the new one.
        with staged_commit([*texts, *files]) as commit:
            for volume, path in zip(volumes, files, strict=True):
                io.write_image(volume, commit.stage(path))
            for path, text in texts.items():
                commit.stage(path).write_text(text, encoding="utf-8")
        self.cases[case_id] = record
        return record

    def _check_label_values(self, case_id: str, label_zyx: np.ndarray) -> None:
        allowed = {0, *(label.value for label in self.labels)}
        if self.ignore_value is not None:
            allowed.add(self.ignore_value)
        present = {int(v) for v in np.unique(label_zyx)}
        unknown = sorted(present - allowed)
        if unknown:
            raise DatasetError(
                f"case {case_id!r} has label values outside the schema",
                expected=str(sorted(allowed)),
                found=str(unknown),
                hint="Add the labels to the schema (`deepseg dataset add-label`) or relabel the case.",
            )

    # -- reading and splitting -----------------------------------------------------------------

    def load_case(self, case_id: str) -> tuple[list[io.Volume], io.Volume]:
        """``(images per channel, labelmap)`` of one case."""
        if case_id not in self.cases:
            raise DatasetError(f"no case {case_id!r}", subject=self.root, found=f"{len(self.cases)} cases")
        return [io.read_image(p) for p in self.image_paths(case_id)], io.read_image(self.label_path(case_id))

    @_one_writer
    def ensure_split(self, validation_fraction: float = 0.2, seed: int = 0, minimum: int = 1) -> dict[str, list[str]]:
        """The fixed split, drawing it once if it was never fixed.

        Cases already marked ``validation`` stay there; when drawing, further validation cases are
        picked at random (``seed``) until ``validation_fraction`` of the cases (at least
        ``minimum``, at most all but one) are held out. Afterwards the split never changes by
        itself: new cases are training cases unless added with ``split="validation"``.
        """
        if self.split_fixed is None:
            ids = sorted(self.cases)
            if len(ids) < 2:
                raise DatasetError("too few cases to hold out a validation split", expected=">= 2", found=str(len(ids)))
            chosen = {cid for cid in ids if self.cases[cid].split == "validation"}
            wanted = min(max(minimum, round(validation_fraction * len(ids))), len(ids) - 1)
            rng = np.random.default_rng(seed)
            pool = [cid for cid in ids if cid not in chosen]
            rng.shuffle(pool)
            chosen.update(pool[: max(0, wanted - len(chosen))])
            for cid in ids:
                self.cases[cid].split = "validation" if cid in chosen else "train"
            self.split_fixed = {"at": _now(), "seed": seed, "fraction": validation_fraction, "cases": len(ids)}
            self.save()
        return self.split()

    def split(self) -> dict[str, list[str]]:
        """``{"train": [...], "validation": [...]}`` as recorded now."""
        return {s: sorted(cid for cid, rec in self.cases.items() if rec.split == s) for s in SPLITS}

    def summary(self) -> dict[str, Any]:
        """Name, counts, channels, labels and split (for the CLI and the training panel)."""
        split = self.split()
        return {
            "name": self.name,
            "folder": str(self.root),
            "cases": len(self.cases),
            "train": len(split["train"]),
            "validation": len(split["validation"]),
            "split_fixed": self.split_fixed is not None,
            "channels": list(self.channel_names),
            "labels": {label.value: label.name for label in self.labels},
            "ignore_value": self.ignore_value,
        }


def _cases_on_disk(root: Path, file_ending: str) -> list[str]:
    folder = root / "labelsTr"
    if not folder.is_dir():
        return []
    return sorted(
        p.name[: -len(file_ending)] for p in folder.iterdir() if p.name.endswith(file_ending) and not p.name.startswith(".")
    )


def validate_dataset(root: str | Path) -> list[Problem]:
    """Every problem of a dataset, each naming its case (``"<dataset>"`` for folder-level ones).

    Checks: dataset.json and manifest readable; every case has all its channels and its label;
    files readable; channels on the label's grid (spacing, origin, direction within 1e-4 mm);
    label values within the schema; numTraining matches; files on disk the manifest does not know.
    """
    try:
        dataset = Dataset.open(root)
    except DeepSegError as exc:
        return [Problem("<dataset>", str(exc))]
    problems: list[Problem] = []
    on_disk = set(_cases_on_disk(dataset.root, dataset.file_ending))
    for stray in sorted(on_disk - set(dataset.cases)):
        problems.append(Problem(stray, "label file present but the case is not in the manifest"))
    for case_id in sorted(dataset.cases):
        problems.extend(_validate_case(dataset, case_id))
    meta = json.loads((dataset.root / "dataset.json").read_text(encoding="utf-8"))
    if meta.get("numTraining") != len(dataset.cases):
        problems.append(
            Problem("<dataset>", f"numTraining is {meta.get('numTraining')} but there are {len(dataset.cases)} cases")
        )
    return problems


def _validate_case(dataset: Dataset, case_id: str) -> Iterable[Problem]:
    paths = [*dataset.image_paths(case_id), dataset.label_path(case_id)]
    missing = [p.relative_to(dataset.root).as_posix() for p in paths if not p.exists()]
    if missing:
        yield Problem(case_id, f"missing file(s): {', '.join(missing)}")
        return
    volumes = []
    for path in paths:
        try:
            volumes.append(io.read_image(path))
        except DeepSegError as exc:
            yield Problem(case_id, f"unreadable {path.name}: {exc}")
            return
    label = volumes[-1]
    for channel, image in zip(dataset.channel_names, volumes[:-1], strict=True):
        if image.shape_zyx != label.shape_zyx:
            yield Problem(case_id, f"channel {channel} has shape {image.shape_zyx}, label has {label.shape_zyx}")
        elif not image.same_grid(label):
            yield Problem(
                case_id,
                f"channel {channel} geometry differs from the label (spacing {image.spacing_xyz_mm} vs {label.spacing_xyz_mm}, "
                f"origin {image.origin_lps} vs {label.origin_lps})",
            )
    if not np.issubdtype(label.array_zyx.dtype, np.integer):
        yield Problem(case_id, f"label file has {label.array_zyx.dtype} voxels, expected integers")
        return
    try:
        dataset._check_label_values(case_id, label.array_zyx)
    except DatasetError as exc:
        yield Problem(case_id, str(exc))
