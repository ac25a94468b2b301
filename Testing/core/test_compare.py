"""``deepseg compare`` with label maps: a dataset's labelsTr case, nnU-Net-style predictions, the ignore label."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from deepseg_core import io, metrics
from deepseg_core.cli import EXIT_INPUT, EXIT_OK, main
from deepseg_core.compare import compare_files, compare_folders, read_label_table
from deepseg_core.datasets import Dataset
from deepseg_core.errors import DeepSegError, ImageError
from deepseg_core.phantoms import PHANTOM_LABELS, generate_phantom

SHAPE_ZYX = (12, 40, 40)


@pytest.fixture()
def case(tmp_path):
    """A DeepSeg dataset with one phantom case, and the same labels as a Slicer .seg.nrrd."""
    phantom = generate_phantom(seed=5, shape_zyx=SHAPE_ZYX, n_lesions=2, lesion_radius_mm=(4.0, 6.0))
    dataset = Dataset.create(tmp_path / "ds", "site", PHANTOM_LABELS, ("CT",))
    dataset.add_case("case01", [phantom.image], phantom.labels.array_zyx)
    seg_path = io.write_segmentation(tmp_path / "case01.seg.nrrd", phantom.labels, [lab.segment_info() for lab in PHANTOM_LABELS])
    return dataset, phantom, seg_path


def _eroded_lesion(labels_zyx: np.ndarray) -> np.ndarray:
    """The labels with the lesion's first slice given to the liver (a prediction that misses some lesion)."""
    out = labels_zyx.copy()
    first = np.flatnonzero((out == 2).any(axis=(1, 2)))[0]
    out[first][out[first] == 2] = 1
    return out


def test_a_seg_nrrd_against_the_datasets_label_map_names_segments_from_its_dataset_json(case):
    dataset, phantom, seg_path = case
    result = compare_files(seg_path, dataset.label_path("case01"))
    assert sorted(result) == ["liver", "liver lesion"]
    assert result["liver"]["dice"] == 1.0 and result["liver lesion"]["dice"] == 1.0 and result["liver lesion"]["hd95_mm"] == 0.0


def test_label_maps_on_both_sides_score_as_the_metrics_on_their_arrays(case, tmp_path):
    dataset, phantom, _ = case
    predicted = _eroded_lesion(phantom.labels.array_zyx)
    prediction = io.write_image(phantom.labels.with_array(predicted), tmp_path / "case01.nii.gz")
    result = compare_files(prediction, dataset.label_path("case01"), labels_json=dataset.root / "dataset.json")
    spacing = phantom.labels.spacing_zyx_mm
    for value, name in ((1, "liver"), (2, "liver lesion")):
        expected = metrics.compute_all(predicted == value, phantom.labels.array_zyx == value, spacing, 2.0).as_dict()
        assert result[name] == pytest.approx(expected)
    lesion, reference_lesion = predicted == 2, phantom.labels.array_zyx == 2
    dice = 2 * np.count_nonzero(lesion & reference_lesion) / (np.count_nonzero(lesion) + np.count_nonzero(reference_lesion))
    assert result["liver lesion"]["dice"] == pytest.approx(dice) and 0.3 < dice < 1.0


def test_voxels_with_the_ignore_label_are_left_out(tmp_path):
    reference = np.zeros(SHAPE_ZYX, np.uint8)
    reference[2:10, 10:30, 10:30] = 1
    reference[2:10, 10:30, 25:30] = 3  # a strip nobody labelled, as nnU-Net's sparse annotations mark it
    organ_over_the_strip = np.where(reference > 0, 1, 0).astype(np.uint8)
    grid = io.Volume(reference, spacing_xyz_mm=(1.0, 1.0, 2.0))
    root = tmp_path / "ds"
    (root / "labelsTr").mkdir(parents=True)
    ref_path = io.write_image(grid, root / "labelsTr" / "c.nii.gz")
    pred_path = io.write_image(grid.with_array(organ_over_the_strip), tmp_path / "c.nii.gz")
    (root / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "organ": 1, "ignore": 3}}))
    assert compare_files(pred_path, ref_path)["organ"]["dice"] == 1.0
    # the same strip as a label of its own: the organ predicted over it is wrong there
    (root / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "organ": 1, "strip": 3}}))
    scores = compare_files(pred_path, ref_path)
    assert scores["organ"]["dice"] == pytest.approx(2 * 8 * 20 * 15 / (8 * 20 * 20 + 8 * 20 * 15))
    assert scores["strip"]["dice"] == 0.0


def _tumour_label_maps() -> tuple[np.ndarray, np.ndarray, io.Volume]:
    """BraTS-like label maps (1 oedema, 2 necrosis, 3 enhancing): a reference, and a prediction that
    calls part of the enhancing rim necrosis and misses part of the oedema."""
    reference = np.zeros(SHAPE_ZYX, np.uint8)
    reference[2:11, 8:32, 8:32] = 1
    reference[3:10, 12:28, 12:28] = 3
    reference[4:9, 15:25, 15:25] = 2
    predicted = reference.copy()
    predicted[3:10, 12:14, 12:28] = np.where(predicted[3:10, 12:14, 12:28] == 3, 2, predicted[3:10, 12:14, 12:28])
    predicted[2:11, 8:11, 8:32] = 0
    return reference, predicted, io.Volume(reference, spacing_xyz_mm=(1.0, 1.0, 2.0))


def test_nnunet_regions_are_scored_as_the_union_of_their_labels(tmp_path):
    # nnU-Net's region-based dataset.json (BraTS): overlapping segments, each the union of some labels;
    # "enhancing tumor" a plain integer, which in a region-based table is a region of one label
    reference, predicted, grid = _tumour_label_maps()
    regions = {"whole tumor": (1, 2, 3), "tumor core": (2, 3), "enhancing tumor": (3,)}
    root = tmp_path / "ds"
    (root / "labelsTs").mkdir(parents=True)
    table = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": 3}
    (root / "dataset.json").write_text(json.dumps({"labels": table, "regions_class_order": [1, 2, 3]}))
    ref_path = io.write_image(grid, root / "labelsTs" / "brats.nii.gz")
    pred_path = io.write_image(grid.with_array(predicted), tmp_path / "brats.nii.gz")
    result = compare_files(pred_path, ref_path)
    assert list(result) == list(regions)
    for name, values in regions.items():
        expected = metrics.compute_all(np.isin(predicted, values), np.isin(reference, values), grid.spacing_zyx_mm, 2.0)
        assert result[name] == pytest.approx(expected.as_dict())
    assert result["tumor core"]["dice"] == 1.0  # necrosis for enhancing: both are tumour core
    assert result["enhancing tumor"]["dice"] < 1.0 and result["whole tumor"]["dice"] < 1.0
    assert result["whole tumor"]["ref_ml"] > result["tumor core"]["ref_ml"] > result["enhancing tumor"]["ref_ml"]
    assert read_label_table(root / "dataset.json").region_based


def test_each_segment_is_scored_as_on_the_whole_arrays(tmp_path):
    # segments are scored in the box around both masks: the whole arrays' numbers exactly, for a segment
    # at the array's edge, one only the prediction has, one neither has, under an ignore strip
    rng = np.random.default_rng(2)
    reference = np.zeros(SHAPE_ZYX, np.int16)
    reference[0:5, 0:12, 3:15] = 1
    reference[6:11, 20:34, 22:37] = 2
    reference[:, 36:, :] = 9  # ignore
    predicted = np.where(rng.random(SHAPE_ZYX) < 0.1, 0, reference).astype(np.float32)  # whole numbers as floats
    predicted[predicted == 9] = 0
    predicted[2:4, 25:30, 5:9] = 3  # only predicted
    predicted[6:11, 34:36, 18:37] = 2  # beyond the reference's b
    table = {"background": 0, "a": 1, "b": 2, "c": 3, "never": 4, "ignore": 9}
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": table}))
    grid = io.Volume(reference, spacing_xyz_mm=(0.8, 0.9, 2.5))
    ref_path = io.write_image(grid, tmp_path / "ref.nrrd")
    pred_path = io.write_image(grid.with_array(predicted), tmp_path / "pred.nrrd")
    result = compare_files(pred_path, ref_path, labels_json=tmp_path / "dataset.json")
    scored = reference != 9
    for name, value in (("a", 1), ("b", 2), ("c", 3), ("never", 4)):
        expected = metrics.compute_all((predicted == value) & scored, (reference == value) & scored, grid.spacing_zyx_mm, 2.0)
        assert result[name] == expected.as_dict()
    assert result["c"]["dice"] == 0.0 and result["never"]["dice"] == 1.0 and 0.0 < result["a"]["dice"] < 1.0
    reference[0, 0, 0] = -1
    io.write_image(grid.with_array(reference), ref_path)
    with pytest.raises(ImageError, match="does not name") as caught:
        compare_files(pred_path, ref_path, labels_json=tmp_path / "dataset.json")
    assert "[-1]" in str(caught.value)


def test_a_one_value_list_is_a_plain_label(case, tmp_path):
    # nnU-Net takes "liver": [1] as label 1 (a table is region-based only with a list of several values)
    dataset, phantom, seg_path = case
    plain = compare_files(seg_path, dataset.label_path("case01"))
    listed = tmp_path / "listed.json"
    listed.write_text(json.dumps({"labels": {"background": 0, "liver": [1], "liver lesion": 2}}))
    assert not read_label_table(listed).region_based
    assert compare_files(seg_path, dataset.label_path("case01"), labels_json=listed) == plain


def test_a_label_map_with_nothing_to_name_it_is_refused_with_what_to_pass(case, tmp_path):
    _, phantom, seg_path = case
    loose = io.write_image(phantom.labels, tmp_path / "loose.nii.gz")
    for prediction, reference in ((seg_path, loose), (loose, seg_path)):
        with pytest.raises(ImageError, match="nothing names its values") as caught:
            compare_files(prediction, reference)
        assert "--labels" in str(caught.value)


def test_a_predicted_label_map_outside_a_dataset_takes_the_references_names(case, tmp_path):
    dataset, phantom, _ = case
    (tmp_path / "nnunet_output").mkdir()
    prediction = io.write_image(phantom.labels, tmp_path / "nnunet_output" / "case01.nii.gz")
    result = compare_files(prediction, dataset.label_path("case01"))
    assert sorted(result) == ["liver", "liver lesion"] and result["liver lesion"]["dice"] == 1.0


def test_values_the_table_does_not_name_are_refused(case, tmp_path):
    dataset, phantom, seg_path = case
    table = tmp_path / "liver_only.json"
    table.write_text(json.dumps({"labels": {"background": 0, "liver": 1}}))
    with pytest.raises(ImageError, match="does not name") as caught:
        compare_files(seg_path, dataset.label_path("case01"), labels_json=table)
    assert "[2]" in str(caught.value)


@pytest.mark.parametrize(
    ("labels", "problem"),
    [
        ({"background": 0, "organ": []}, "not a label value or a region"),
        ({"background": 0, "organ": [1, "2"]}, "not a label value or a region"),
        ({"background": 0, "organ": 1.5}, "not a label value or a region"),
        ({"background": 0, "organ": 1, "lesion": 1}, "two names"),
        ({"background": 0, "core": [2, 3], "same core": [3, 2]}, "two names"),
        ({"background": 0, "organ": 1, "ignore": [2]}, "ignore label is not one integer"),
        (None, "no label table"),
    ],
)
def test_label_tables_that_cannot_name_values_are_refused(tmp_path, labels, problem):
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"labels": labels} if labels is not None else {"name": "x"}))
    with pytest.raises(ImageError, match=problem):
        read_label_table(path)


def test_a_probability_map_is_not_a_label_map(case, tmp_path):
    dataset, phantom, seg_path = case
    fractional = io.write_image(phantom.labels.with_array(phantom.labels.array_zyx * np.float32(0.5)), tmp_path / "p.nrrd")
    with pytest.raises(ImageError, match="is not a label map"):
        compare_files(fractional, dataset.label_path("case01"))


def test_cli_compare_takes_a_label_map_and_labels(case, tmp_path, capsys):
    dataset, phantom, seg_path = case
    assert (
        main(["compare", str(seg_path), str(dataset.label_path("case01")), "--labels", str(dataset.root / "dataset.json")])
        == EXIT_OK
    )
    assert json.loads(capsys.readouterr().out)["liver"]["dice"] == 1.0
    loose = io.write_image(phantom.labels, Path(tmp_path) / "loose.nii.gz")
    assert main(["compare", str(seg_path), str(loose)]) == EXIT_INPUT
    assert "--labels" in capsys.readouterr().err


def test_folders_are_compared_case_by_case_with_a_mean_per_segment(tmp_path, capsys):
    dataset = Dataset.create(tmp_path / "ds", "site", PHANTOM_LABELS, ("CT",))
    predictions = tmp_path / "predictions"
    predictions.mkdir()
    expected_lesion_dice = []
    for index in range(3):
        phantom = generate_phantom(seed=30 + index, shape_zyx=SHAPE_ZYX, n_lesions=2, lesion_radius_mm=(4.0, 6.0))
        dataset.add_case(f"case{index}", [phantom.image], phantom.labels.array_zyx)
        if index == 2:
            continue  # not predicted (yet)
        predicted = _eroded_lesion(phantom.labels.array_zyx) if index == 1 else phantom.labels.array_zyx
        if index == 0:  # DeepSeg's batch output and nnU-Net's output side by side
            io.write_segmentation(predictions / "case0.seg.nrrd", phantom.labels, [lab.segment_info() for lab in PHANTOM_LABELS])
            io.write_image(phantom.image, predictions / "case0.nrrd")  # the image it segmented, beside it
        else:
            io.write_image(phantom.labels.with_array(predicted), predictions / "case1.nii.gz")
        ours, truth = predicted == 2, phantom.labels.array_zyx == 2
        expected_lesion_dice.append(2 * np.count_nonzero(ours & truth) / (np.count_nonzero(ours) + np.count_nonzero(truth)))
    (predictions / "notes.txt").write_text("not a case")
    result = compare_folders(predictions, dataset.root / "labelsTr")
    assert sorted(result["cases"]) == ["case0", "case1"] and result["cases_scored"] == 2
    assert result["missing_predictions"] == ["case2"]
    assert result["cases"]["case1"]["liver lesion"]["dice"] == pytest.approx(expected_lesion_dice[1])
    assert expected_lesion_dice == [1.0, pytest.approx(expected_lesion_dice[1])] and expected_lesion_dice[1] < 1.0
    assert result["mean"]["liver lesion"]["dice"] == pytest.approx(np.mean(expected_lesion_dice))
    assert result["mean"]["liver"]["finite_cases"]["hd95_mm"] == 2
    assert result["foreground_mean"]["dice"] == pytest.approx(
        (result["mean"]["liver"]["dice"] + np.mean(expected_lesion_dice)) / 2
    )
    in_threads = compare_folders(predictions, dataset.root / "labelsTr", workers=3)
    assert json.dumps(in_threads, sort_keys=True) == json.dumps(result, sort_keys=True)
    with pytest.raises(DeepSegError, match="invalid number of workers"):
        compare_folders(predictions, dataset.root / "labelsTr", workers=0)

    assert main(["compare", str(predictions), str(dataset.root / "labelsTr"), "--workers", "2"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["mean"]["liver lesion"]["dice"] == pytest.approx(np.mean(expected_lesion_dice))
    assert main(["compare", str(predictions / "case1.nii.gz"), str(dataset.root / "labelsTr")]) == EXIT_INPUT
    assert "two files or two folders" in capsys.readouterr().err

    io.write_image(io.read_image(predictions / "case1.nii.gz"), predictions / "case1.nrrd")
    with pytest.raises(ImageError, match="case 'case1' has two files"):
        compare_folders(predictions, dataset.root / "labelsTr")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ImageError, match="no reference case has a prediction"):
        compare_folders(empty, dataset.root / "labelsTr")
