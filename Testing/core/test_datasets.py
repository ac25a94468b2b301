"""Datasets: nnU-Net v2 layout, manifest, fixed split, validation, atomic and non-destructive writes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from deepseg_core import io
from deepseg_core.cli import main
from deepseg_core.datasets import CaseProvenance, Dataset, DatasetError, correction_effort, validate_dataset
from deepseg_core.model_card import LabelSpec
from deepseg_core.phantoms import PHANTOM_LABELS, generate_phantom


def small_case(seed: int):
    phantom = generate_phantom(seed=seed, profile="ct-A", shape_zyx=(12, 24, 24), spacing_xyz_mm=(2.0, 2.0, 3.0), n_lesions=2)
    return phantom.image, phantom.labels.array_zyx.astype(np.uint8)


@pytest.fixture()
def dataset(tmp_path):
    return Dataset.create(tmp_path / "ds", "liver", PHANTOM_LABELS, ("CT",))


def test_layout_is_nnunet_v2_and_round_trips_voxels(dataset):
    image, labels = small_case(0)
    dataset.add_case("case_000", [image], labels, CaseProvenance(source="phantom 0"))
    meta = json.loads((dataset.root / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "CT"}
    assert meta["labels"] == {"background": 0, "liver": 1, "liver lesion": 2}
    assert meta["numTraining"] == 1 and meta["file_ending"] == ".nii.gz"
    assert (dataset.root / "imagesTr" / "case_000_0000.nii.gz").exists()
    images, label = Dataset.open(dataset.root).load_case("case_000")
    np.testing.assert_array_equal(label.array_zyx, labels)
    np.testing.assert_array_equal(images[0].array_zyx, image.array_zyx)
    assert images[0].same_grid(image) and label.same_grid(image)
    reopened = Dataset.open(dataset.root)
    assert reopened.cases["case_000"].provenance.source == "phantom 0"
    assert reopened.cases["case_000"].provenance.added  # timestamp recorded
    assert [label.name for label in reopened.labels] == ["liver", "liver lesion"]
    assert validate_dataset(dataset.root) == []


def test_existing_case_is_never_overwritten_silently(dataset):
    image, labels = small_case(0)
    dataset.add_case("a", [image], labels)
    before = (dataset.root / "labelsTr" / "a.nii.gz").read_bytes()
    with pytest.raises(DatasetError, match="already exists"):
        dataset.add_case("a", [image], np.zeros_like(labels))
    assert (dataset.root / "labelsTr" / "a.nii.gz").read_bytes() == before
    dataset.add_case("a", [image], np.zeros_like(labels), overwrite=True)
    assert not Dataset.open(dataset.root).load_case("a")[1].array_zyx.any()


def test_a_case_id_that_differs_only_in_letter_case_or_whose_files_are_strays_is_refused(dataset):
    """On Windows and macOS "Case01" and "case01" are the same files: the second would replace the first's
    files while the manifest listed both. Files of an id the manifest does not list are not replaced either."""
    image, labels = small_case(0)
    dataset.add_case("Case01", [image], labels)
    before = (dataset.root / "labelsTr" / "Case01.nii.gz").read_bytes()
    for overwrite in (False, True):
        with pytest.raises(DatasetError, match="'case01' differs from the existing case 'Case01' only in letter case"):
            dataset.add_case("case01", [image], np.zeros_like(labels), overwrite=overwrite)
    assert (dataset.root / "labelsTr" / "Case01.nii.gz").read_bytes() == before
    assert sorted(Dataset.open(dataset.root).cases) == ["Case01"]

    stray = dataset.root / "labelsTr" / "b.nii.gz"
    stray.write_bytes(before)  # left by hand, or by another tool
    with pytest.raises(DatasetError, match=r"'b' is not in the dataset's manifest, but files of it are") as caught:
        dataset.add_case("b", [image], np.zeros_like(labels))
    assert "labelsTr/b.nii.gz" in str(caught.value) and stray.read_bytes() == before
    dataset.add_case("b", [image], np.zeros_like(labels), overwrite=True)
    assert not Dataset.open(dataset.root).load_case("b")[1].array_zyx.any()


def test_two_writers_of_one_dataset_keep_each_others_cases(dataset):
    """Two Slicer sessions exporting to one dataset, or an export beside a training fixing the split: each
    rewrote the manifest from the cases it had read, so the other's case was dropped (its files left as strays)."""
    image, labels = small_case(0)
    first, second, training = Dataset.open(dataset.root), Dataset.open(dataset.root), Dataset.open(dataset.root)
    first.add_case("a", [image], labels)
    second.add_case("b", [image], labels)
    second.add_case("c", [image], labels)
    split = training.ensure_split()  # opened before any case was added
    assert sorted(split["train"] + split["validation"]) == ["a", "b", "c"]
    assert sorted(Dataset.open(dataset.root).cases) == ["a", "b", "c"] and validate_dataset(dataset.root) == []
    with pytest.raises(DatasetError, match="'a' already exists"):
        second.add_case("a", [image], labels)  # known from the disk, though this object never added it


def test_bad_cases_write_nothing(dataset):
    image, labels = small_case(0)
    bad = labels.copy()
    bad[0, 0, 0] = 7
    with pytest.raises(DatasetError, match=r"outside the schema.*\[7\]"):
        dataset.add_case("b", [image], bad)
    with pytest.raises(DatasetError, match="shapes differ"):
        dataset.add_case("b", [image], labels[:-1])
    with pytest.raises(DatasetError, match="number of channels"):
        dataset.add_case("b", [image, image], labels)
    with pytest.raises(DatasetError, match="invalid case id"):
        dataset.add_case("../escape", [image], labels)
    assert sorted(p.name for p in (dataset.root / "imagesTr").iterdir()) == []
    assert sorted(p.name for p in (dataset.root / "labelsTr").iterdir()) == []
    assert Dataset.open(dataset.root).cases == {}


def test_split_is_fixed_once_and_new_cases_go_to_training(dataset):
    for i in range(5):
        image, labels = small_case(i)
        dataset.add_case(f"c{i}", [image], labels)
    split = dataset.ensure_split(validation_fraction=0.4, seed=3)
    assert len(split["validation"]) == 2 and len(split["train"]) == 3
    image, labels = small_case(9)
    dataset.add_case("c9", [image], labels)
    reopened = Dataset.open(dataset.root)
    again = reopened.ensure_split(validation_fraction=0.9, seed=99)  # already fixed: arguments ignored
    assert again["validation"] == split["validation"]
    assert "c9" in again["train"]
    reopened.add_case("c10", [image], labels, split="validation")
    assert Dataset.open(dataset.root).split()["validation"] == sorted([*split["validation"], "c10"])


def test_unknown_segment_name_says_how_to_add_it(dataset):
    with pytest.raises(DatasetError, match=r"not in the dataset's label schema.*add-label"):
        dataset.label_by_name("spleen")
    dataset.add_label(LabelSpec(3, "spleen", (0.1, 0.2, 0.3)))
    assert Dataset.open(dataset.root).label_by_name("spleen").value == 3


def test_ignore_value_is_accepted_and_exported_for_nnunet(tmp_path):
    ds = Dataset.create(tmp_path / "p", "partial", PHANTOM_LABELS, ("CT",), ignore_value=255)
    image, labels = small_case(1)
    labels[:4] = 255
    ds.add_case("x", [image], labels)
    assert json.loads((ds.root / "dataset.json").read_text())["labels"]["ignore"] == 255
    assert validate_dataset(ds.root) == []


def test_validate_reports_every_problem_with_the_case_name(dataset):
    for i in range(3):
        image, labels = small_case(i)
        dataset.add_case(f"c{i}", [image], labels)
    (dataset.root / "imagesTr" / "c0_0000.nii.gz").unlink()
    image, labels = small_case(1)
    shifted = io.Volume(image.array_zyx, image.spacing_xyz_mm, origin_lps=(5.0, 0.0, 0.0))
    io.write_image(shifted, dataset.root / "imagesTr" / "c1_0000.nii.gz")
    bad = labels.copy()
    bad[0, 0, 0] = 9
    io.write_image(image.with_array(bad), dataset.root / "labelsTr" / "c2.nii.gz")
    (dataset.root / "labelsTr" / "stray.nii.gz").write_bytes(b"")
    problems = {str(p).split(":")[0]: str(p) for p in validate_dataset(dataset.root)}
    assert set(problems) == {"c0", "c1", "c2", "stray"}
    assert "missing" in problems["c0"] and "geometry" in problems["c1"] and "[9]" in problems["c2"]


def test_correction_effort():
    predicted = np.zeros((2, 4, 4), np.uint8)
    predicted[0, :2, :2] = 1
    corrected = predicted.copy()
    corrected[0, 0, 0] = 0  # one voxel removed: Dice = 2*3/(4+3)
    effort = correction_effort(predicted, corrected, [1, 2], voxel_ml=0.5)
    assert effort["changed_voxels"] == 1 and effort["changed_ml"] == 0.5
    assert effort["dice_prediction_vs_correction"] == pytest.approx((6 / 7 + 1.0) / 2)


def test_plain_nnunet_dataset_opens_with_a_derived_schema(tmp_path):
    root = tmp_path / "Dataset001"
    (root / "labelsTr").mkdir(parents=True)
    (root / "imagesTr").mkdir()
    meta = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "tumour": 1}, "numTraining": 0, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta))
    ds = Dataset.open(root)
    assert ds.channel_names == ("MRI",) and [label.name for label in ds.labels] == ["tumour"]


def test_a_plain_nnunet_dataset_of_regions_is_refused_and_left_as_it_is(tmp_path):
    # BraTS' dataset.json names regions; DeepSeg rewrites dataset.json as {name: value}, which would drop them
    root = tmp_path / "Dataset002_BraTS"
    (root / "labelsTr").mkdir(parents=True)
    (root / "imagesTr").mkdir()
    labels = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": 3}
    meta = {"channel_names": {"0": "T1"}, "labels": labels, "regions_class_order": [1, 2, 3], "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta))
    before = (root / "dataset.json").read_bytes()
    with pytest.raises(DatasetError, match="declares nnU-Net regions") as caught:
        Dataset.open(root)
    assert "['whole tumor', 'tumor core']" in str(caught.value) and "--labels-from MODEL" in str(caught.value)
    assert (root / "dataset.json").read_bytes() == before
    # one-value lists are plain labels, as nnU-Net reads them
    meta["labels"] = {"background": 0, "liver": [1], "liver lesion": 2}
    del meta["regions_class_order"]
    (root / "dataset.json").write_text(json.dumps(meta))
    assert [(label.value, label.name) for label in Dataset.open(root).labels] == [(1, "liver"), (2, "liver lesion")]


def test_dataset_cli(tmp_path, capsys):
    root = tmp_path / "cli"
    assert main(["dataset", "create", str(root), "--labels-from", "phantom-liver"]) == 0
    image, labels = small_case(4)
    io.write_image(image, tmp_path / "img.nrrd")
    segments = [label.segment_info() for label in PHANTOM_LABELS]
    io.write_segmentation(tmp_path / "corrected.seg.nrrd", image.with_array(labels), segments)
    predicted = labels.copy()
    predicted[predicted == 2] = 1  # the model missed the lesions
    io.write_image(image.with_array(predicted), tmp_path / "pred.nrrd")
    args = ["dataset", "add", str(root), "--case", "s1", "--image", str(tmp_path / "img.nrrd")]
    args += ["--labels", str(tmp_path / "corrected.seg.nrrd"), "--prediction", str(tmp_path / "pred.nrrd")]
    assert main([*args, "--predicted-by", "phantom-liver:1"]) == 0
    assert main(args) == 2  # exists: refused
    assert "already exists" in capsys.readouterr().err
    provenance = Dataset.open(root).cases["s1"].provenance
    assert provenance.changed_voxels == int((labels == 2).sum()) and provenance.predicted_by == "phantom-liver:1"
    assert provenance.dice_prediction_vs_correction < 0.75
    assert main(["dataset", "validate", str(root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    (root / "labelsTr" / "s1.nii.gz").write_bytes(b"garbage")
    assert main(["dataset", "validate", str(root)]) == 2
    assert "s1: unreadable" in capsys.readouterr().out


def test_an_upper_case_seg_nrrd_is_read_by_segment_names(tmp_path):
    # CASE.SEG.NRRD (a Windows share) is a segmentation, mapped by names, not an image of label values:
    # here "liver" is stored as 2 and "liver lesion" as 1, the dataset's values the other way round
    root = tmp_path / "ds"
    assert main(["dataset", "create", str(root), "--labels-from", "phantom-liver"]) == 0
    image, labels = small_case(6)
    io.write_image(image, tmp_path / "img.nrrd")
    swapped = np.select([labels == 1, labels == 2], [2, 1], 0).astype(np.uint8)
    segments = [io.SegmentInfo("liver", 2), io.SegmentInfo("liver lesion", 1)]
    io.write_segmentation(tmp_path / "corrected.seg.nrrd", image.with_array(swapped), segments)
    upper = (tmp_path / "corrected.seg.nrrd").rename(tmp_path / "CORRECTED.SEG.NRRD")
    args = ["dataset", "add", str(root), "--case", "c1", "--image", str(tmp_path / "img.nrrd"), "--labels", str(upper)]
    assert main(args) == 0
    _, stored = Dataset.open(root).load_case("c1")
    np.testing.assert_array_equal(stored.array_zyx, labels)
    assert np.count_nonzero(labels == 2) > 0


def test_segment_names_map_to_schema_values_and_lesions_win_overlaps(dataset):
    assert dataset.value_for_segment("liver lesion 3") == 2  # an instance of the thing label
    # pieces of Slicer's Islands effect ("Split islands to segments" names them <segment>_<n>)
    assert dataset.value_for_segment("liver lesion_2") == dataset.value_for_segment("liver lesion 3_2") == 2
    with pytest.raises(DatasetError, match="not in the dataset's label schema"):
        dataset.value_for_segment("liver 2")  # liver is not a thing label: no instances of it
    with pytest.raises(DatasetError, match="not in the dataset's label schema"):
        dataset.value_for_segment("liver_2")
    # the first base that names a label decides: pieces of the stuff label "lesion 2" are not the thing "lesion"
    labels = [LabelSpec(1, "lesion", (1, 0, 0), thing=True), LabelSpec(2, "lesion 2", (0, 1, 0))]
    other = Dataset.create(dataset.root.parent / "other", "other", labels, ("CT",))
    assert other.value_for_segment("lesion 3") == 1 and other.value_for_segment("lesion 2") == 2
    with pytest.raises(DatasetError, match="not in the dataset's label schema"):
        other.value_for_segment("lesion 2_1")
    liver = np.zeros((2, 3, 3), bool)
    liver[:, :2] = True
    lesion = np.zeros_like(liver)
    lesion[0, 0, 0] = True
    computed = []
    masks = [
        ("liver lesion 1", lambda: computed.append("lesion") or lesion),
        ("liver", lambda: computed.append("liver") or liver),
    ]
    labels = dataset.labelmap_from_segments(liver.shape, masks)
    assert labels[0, 0, 0] == 2 and labels[1, 0, 0] == 1 and labels[:, 2].sum() == 0
    with pytest.raises(DatasetError, match="'spleen'"):
        dataset.labelmap_from_segments(liver.shape, [*masks, ("spleen", lambda: liver)])
    assert computed == ["liver", "lesion"]  # names checked before any mask is computed
