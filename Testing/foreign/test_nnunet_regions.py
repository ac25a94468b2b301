"""Region-based nnU-Net v2 models (BraTS, KiTS): import, parity with nnU-Net's own predictor, what users see.

The model is a real nnU-Net results folder trained region-based by nnU-Net's own trainer on the tiny
phantoms (``Dataset504_DeepSegTinyRegions``: regions "liver and lesions" [1, 2] and "liver lesion" 2,
``regions_class_order`` [1, 2]; ``scripts/make_tiny_nnunet_model.py``, cached). The references come
from ``nnUNetPredictor`` on the same files. The export's arithmetic against nnU-Net's ``LabelManager``
is tested in ``test_nnunet_import.py`` (``test_the_region_export_*``), on BraTS' three regions.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from foreign_cases import offgrid_ct_phantom, one_torch_thread, site_dataset  # noqa: F401 (one_torch_thread: a fixture)

from deepseg_core import io, metrics
from deepseg_core.cli import EXIT_OK, main
from deepseg_core.compare import compare_files
from deepseg_core.datasets import Dataset
from deepseg_core.errors import ConfigError
from deepseg_core.importers import import_model
from deepseg_core.importers.nnunet import NnUNetImportError, load_checkpoint
from deepseg_core.importers.nnunet.card import check_labels
from deepseg_core.inference import Segmenter, SegmentOptions
from deepseg_core.losses.sigmoid_regions import RegionDiceBCELoss
from deepseg_core.model_store import ModelStore
from deepseg_core.training.engine import RetrainConfig, retrain

pytestmark = [pytest.mark.needs_torch, pytest.mark.usefixtures("one_torch_thread")]

#: the label map's values and what they are: value 1 is written where "liver and lesions" is predicted and
#: "liver lesion" is not
EXPECTED_LABELS = [(1, "liver and lesions excluding liver lesion"), (2, "liver lesion")]
MIN_AGREEMENT = 0.995


def options(**kwargs) -> SegmentOptions:
    return SegmentOptions(device="cpu", check_modality=False, backend="torch", **kwargs)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> ModelStore:
    return ModelStore(tmp_path_factory.mktemp("store"))


#: the "core" model's second region is its first region's logit less this: a core inside every "liver and lesions"
CORE_LOGIT_MARGIN = 2.0


@pytest.fixture(scope="module")
def core_folder(tiny_region_folder, tmp_path_factory) -> Path:
    """The trained region model with its second head ("liver lesion") replaced by the first head less
    :data:`CORE_LOGIT_MARGIN`: the trained model never predicts a lesion (10 short epochs), and this one writes
    value 2 inside value 1 wherever the liver region is confident, so the parity covers a later region
    overwriting an earlier one. Both tools run the same edited checkpoint."""
    folder = tmp_path_factory.mktemp("core") / tiny_region_folder.name
    shutil.copytree(tiny_region_folder, folder)
    path = folder / "fold_0" / "checkpoint_final.pth"
    checkpoint = load_checkpoint(path)
    weights = checkpoint["network_weights"]
    for key in [k for k in weights if k.startswith("decoder.seg_layers.")]:
        weights[key][1] = weights[key][0] - (CORE_LOGIT_MARGIN if key.endswith(".bias") else 0.0)
    torch.save(checkpoint, path)
    return folder


@pytest.fixture(scope="module")
def card(store, tiny_region_folder):
    return import_model(tiny_region_folder, store, name="tiny-regions")


@pytest.fixture(scope="module")
def segmenters(card, core_folder, store) -> dict[str, Segmenter]:
    core = import_model(core_folder, store, name="tiny-regions-core")
    return {
        "trained": Segmenter.load(card.ref, device="cpu", store=store),
        "core": Segmenter.load(core.ref, device="cpu", store=store),
    }


@pytest.fixture(scope="module")
def segmenter(segmenters) -> Segmenter:
    return segmenters["trained"]


@pytest.fixture(scope="module")
def phantom_path(tmp_path_factory) -> Path:
    """A CT phantom on another grid than the training data, with a zero frame nnU-Net crops away."""
    return Path(io.write_image(offgrid_ct_phantom(9), tmp_path_factory.mktemp("images") / "phantom_0000.nii.gz"))


@pytest.fixture(scope="module")
def references(nnunet_maker, tiny_region_folder, core_folder, phantom_path, head_ct_path, tmp_path_factory) -> dict:
    """nnU-Net's own predictor with both models on the phantom and the real head CT (the trained model's
    sigmoid probabilities of the phantom too), keyed ``(model, image)``."""
    work = tmp_path_factory.mktemp("nnunet-region-reference")
    keys = [(model, image) for model in ("trained", "core") for image in ("phantom", "head_ct")]
    folders = {"trained": tiny_region_folder, "core": core_folder}
    paths = {"phantom": phantom_path, "head_ct": head_ct_path}
    jobs = [
        {
            "model": str(folders[model]),
            "mirroring": False,
            "inputs": [[str(paths[image])]],
            "outputs": [str(work / f"{model}-{image}")],
            "probabilities": (model, image) == ("trained", "phantom"),
        }
        for model, image in keys
    ]
    nnunet_maker.run_reference(jobs, work)
    out: dict = {}
    for model, image in keys:
        path = work / f"{model}-{image}.nii.gz"
        out[(model, image)] = {"path": path, "labels": sitk.GetArrayFromImage(sitk.ReadImage(str(path)))}
    out[("trained", "phantom")]["probabilities"] = np.load(work / "trained-phantom.npz")["probabilities"]
    return out


def test_the_card_names_what_each_label_value_is(card, tiny_region_folder):
    assert [(label.value, label.name) for label in card.labels] == EXPECTED_LABELS
    config = card.pipeline["config"]
    assert config["regions"] == [{"name": "liver and lesions", "values": [1, 2]}, {"name": "liver lesion", "values": [2]}]
    assert config["label_values"] == [1, 2]  # regions_class_order: the value each region writes
    assert card.architecture.config["num_classes"] == 2  # one sigmoid per region, no background channel
    assert config["batch_dice"] is False  # the plans' 3d_fullres choice (nnU-Net's planner: no lowres, no batch Dice)
    assert "regions liver and lesions [1, 2], liver lesion [2]" in card.description
    assert card.source["files"]["dataset.json"]  # the regions come from this file, hashed with the rest


@pytest.mark.parametrize("model", ["trained", "core"])
@pytest.mark.parametrize("image", ["phantom", "head_ct"])
def test_labels_match_nnunets_own_predictor(model, image, segmenters, references, phantom_path, head_ct_path, record_property):
    volume = io.read_image(phantom_path if image == "phantom" else head_ct_path)
    result = segmenters[model].segment([volume], options())
    reference = references[(model, image)]["labels"]
    ours = result.labels.array_zyx
    assert result.labels.same_grid(volume) and ours.shape == reference.shape
    agreement = float((ours == reference).mean())
    assert agreement >= MIN_AGREEMENT, f"voxel agreement {agreement:.5f}"
    counts = {v: int((reference == v).sum()) for v in (1, 2)}
    assert counts[1] > 100, "the model predicts no liver region: the comparison would be empty"
    if model == "core":
        assert counts[2] > 100, "the core model writes no value 2: nothing overwrites"
    dices = {}
    for name, values in (("liver and lesions", (1, 2)), ("liver lesion", (2,))):
        theirs, mine = np.isin(reference, values), np.isin(ours, values)
        total = int(theirs.sum() + mine.sum())
        dices[name] = 1.0 if total == 0 else 2.0 * float((theirs & mine).sum()) / total
        assert dices[name] >= 0.99, f"{name}: Dice {dices[name]:.5f}"
    differ = int((ours != reference).sum())
    record_property(
        "realdata",
        f"nnU-Net regions parity, {model} model, {image}: {differ} of {ours.size} voxels differ; "
        + ", ".join(f"'{name}' Dice {d:.5f}" for name, d in dices.items())
        + f" (nnU-Net: value 1 {counts[1]}, value 2 {counts[2]} voxels)",
    )


def test_probabilities_are_nnunets_sigmoids_and_uncertainty_the_least_certain_region(
    segmenter, references, phantom_path, record_property
):
    reference = references[("trained", "phantom")]["probabilities"]
    volume = io.read_image(phantom_path)
    result = segmenter.segment([volume], options(keep_probabilities=True))
    assert result.probabilities.shape == reference.shape == (2, *volume.shape_zyx)  # regions, no background channel
    difference = np.abs(result.probabilities.astype(np.float32) - reference)
    mean, p999, largest = float(difference.mean()), float(np.percentile(difference, 99.9)), float(difference.max())
    record_property(
        "realdata",
        f"nnU-Net region sigmoids, phantom: |difference| mean {mean:.1e}, 99.9th percentile {p999:.1e}, max {largest:.1e}",
    )
    assert mean < 2e-3 and p999 < 0.05
    assert float(np.abs(result.probabilities[:, :, :4]).max()) == 0.0  # the cropped-away frame: every region 0
    # the uncertainty of a mirrored (TTA) run: each voxel's least certain region, in bits, from that run's sigmoids
    uncertain = segmenter.segment([volume], options(keep_probabilities=True, uncertainty="tta"))
    entropy = uncertain.uncertainty.array_zyx
    assert entropy.shape == volume.shape_zyx and 0.0 <= float(entropy.min()) and float(entropy.max()) <= 1.0
    assert float(entropy[:, :4].max()) == 0.0
    p = np.clip(uncertain.probabilities.astype(np.float64), 1e-8, 1 - 1e-7)
    bits = (-(p * np.log2(p) + (1 - p) * np.log2(1 - p))).max(axis=0)
    np.testing.assert_allclose(entropy, bits, atol=2e-3)  # the probabilities are stored as float16


def test_segment_names_the_values_and_reports_each_regions_volume(segmenters, store, phantom_path, tmp_path, capsys):
    # the core model writes both values, so the region's row is a union of two counts
    out = tmp_path / "case.seg.nrrd"
    ref = segmenters["core"].card.ref
    args = ["segment", str(phantom_path), "--model", ref, "--models-dir", str(store.root), "--output", str(out)]
    assert main([*args, "--device", "cpu", "--json", "--stats", str(tmp_path / "stats.csv")]) == EXIT_OK
    done = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"case_done"' in line][-1]
    rows = {row["name"]: row for row in done["segments"]}
    assert list(rows) == [name for _, name in EXPECTED_LABELS] + ["liver and lesions"]
    seg = io.read_segmentation(out)
    assert [(s.label_value, s.name) for s in seg.segments] == EXPECTED_LABELS
    region = rows["liver and lesions"]
    assert region["region"] is True and region["values"] == [1, 2]
    assert rows[EXPECTED_LABELS[0][1]]["voxels"] > 0 and rows["liver lesion"]["voxels"] > 0
    assert region["voxels"] == rows[EXPECTED_LABELS[0][1]]["voxels"] + rows["liver lesion"]["voxels"]
    assert region["ml"] == pytest.approx(region["voxels"] * io.read_image(phantom_path).voxel_volume_ml)
    # the measurement table (the panel's) has the region's row too: the union's size, shape and intensities
    from deepseg_core.measurements import read_measurements_csv

    table = {row["segment"]: row for row in read_measurements_csv(tmp_path / "stats.csv")}
    assert list(table) == [name for _, name in EXPECTED_LABELS] + ["liver and lesions (values 1, 2)"]
    union, parts = table["liver and lesions (values 1, 2)"], [table[name] for _, name in EXPECTED_LABELS]
    assert union["label_value"] == "" and int(union["voxel_count"]) == region["voxels"]
    assert float(union["volume_mm3"]) == pytest.approx(sum(float(p["volume_mm3"]) for p in parts), rel=1e-5)
    weighted = sum(int(p["voxel_count"]) * float(p["intensity_mean"]) for p in parts) / region["voxels"]
    assert float(union["intensity_mean"]) == pytest.approx(weighted, rel=1e-4)
    assert float(union["feret_diameter_mm"]) >= max(float(p["feret_diameter_mm"]) for p in parts)
    assert float(union["intensity_min"]) == min(float(p["intensity_min"]) for p in parts)


def test_compare_scores_deepseg_against_nnunet_by_region(segmenter, references, phantom_path, tiny_region_folder, tmp_path):
    volume = io.read_image(phantom_path)
    ours = io.write_image(volume.with_array(segmenter.segment([volume], options()).labels.array_zyx), tmp_path / "ours.nii.gz")
    scores = compare_files(ours, references[("trained", "phantom")]["path"], labels_json=tiny_region_folder / "dataset.json")
    assert set(scores) == {"liver and lesions", "liver lesion"}
    assert scores["liver and lesions"]["dice"] >= 0.99


def test_a_region_model_is_fine_tuned_with_nnunets_region_loss(card, store, tmp_path, caplog, record_property):
    dataset = site_dataset(tmp_path / "site")
    # the site's "liver" is the model's value 1 (liver and lesions, less the lesion); "liver lesion" matches by name
    mapping = {"liver": EXPECTED_LABELS[0][1]}
    config = RetrainConfig(epochs=4, steps_per_epoch=10, learning_rate=1e-3, label_mapping=mapping)
    with caplog.at_level("INFO", logger="deepseg_core.training.engine"):
        outcome = retrain(dataset, card.name, config, tmp_path / "checkpoints", base=card.ref, store=store, activate=False)
    assert "training with nnU-Net's Dice + BCE over regions [(1, 2), (2,)] (batch Dice: False" in caplog.text
    child = outcome.card
    assert child.parent_version == card.version and child.pipeline == card.pipeline and child.labels == card.labels
    assert store.folder(child.ref) != store.folder(card.ref)
    losses = [record["loss"] for record in outcome.history]
    assert losses[-1] < losses[0], losses
    # measurably better on the new site's validation case: value 1 from nnU-Net's sigmoid export
    before, after = outcome.parent_validation["mean"]["liver"]["dice"], outcome.validation["mean"]["liver"]["dice"]
    lesion = [v["mean"]["liver lesion"]["dice"] for v in (outcome.parent_validation, outcome.validation)]
    region = [v["mean"]["liver and lesions"]["dice"] for v in (outcome.parent_validation, outcome.validation)]
    record_property(
        "realdata",
        f"nnU-Net region model fine-tuned on site ct-B (4 x 10 steps): loss {losses[0]:.3f} -> {losses[-1]:.3f}; "
        f"validation Dice of value 1 {before:.3f} -> {after:.3f}, of 'liver lesion' {lesion[0]:.3f} -> {lesion[1]:.3f}, "
        f"of region 'liver and lesions' {region[0]:.3f} -> {region[1]:.3f}",
    )
    assert after > before + 0.03, (before, after)
    # validation also scores each region as nnU-Net evaluates it, and keeps the best checkpoint by the regions' mean
    for validation in (outcome.validation, outcome.parent_validation):
        assert validation["regions"] == ["liver and lesions", "liver lesion"]
        assert validation["mean"]["liver and lesions"]["region"] is True
        assert validation["mean"]["liver and lesions"]["values"] == [1, 2]
    assert outcome.history[-1]["mean_dice"] == pytest.approx((region[1] + lesion[1]) / 2)
    # and it segments as a region model still: the values the regions write, named as before
    volume, truth = Dataset.open(dataset).load_case("case702")
    labels = Segmenter.load(child.ref, device="cpu", store=store).segment(volume, options()).labels.array_zyx
    assert set(np.unique(labels)) <= {0, 1, 2} and (labels == 1).sum() > 100
    # the region is the union of its values in both label maps (the site's liver and liver lesion: 1 and 2)
    union = metrics.dice(np.isin(labels, [1, 2]), np.isin(truth.array_zyx, [1, 2]))
    assert outcome.validation["cases"]["case702"]["liver and lesions"]["dice"] == pytest.approx(union, abs=1e-12)
    assert union > after  # the liver region is easier than value 1 alone: the boundary against lesions does not count


def test_a_loss_a_region_model_cannot_train_is_refused_before_anything_is_written(card, store, tmp_path):
    dataset = site_dataset(tmp_path / "site")
    versions = store.versions(card.name)
    config = RetrainConfig(epochs=1, loss="tversky_focal", label_mapping={"liver": EXPECTED_LABELS[0][1]})
    with pytest.raises(ConfigError, match="region-based nnU-Net model") as caught:
        retrain(dataset, card.name, config, tmp_path / "checkpoints", base=card.ref, store=store)
    assert "--loss tversky_focal" in str(caught.value) and "Leave --loss out" in str(caught.value)
    assert store.versions(card.name) == versions and not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize(
    "labels, order, expected",
    [
        (
            {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": 3},
            [1, 2, 3],
            [(1, "whole tumor excluding tumor core"), (2, "tumor core excluding enhancing tumor"), (3, "enhancing tumor")],
        ),
        (  # KiTS23: the masses region writes 3 (cysts), the tumor 2, last
            {"background": 0, "kidney": [1, 2, 3], "masses": [2, 3], "tumor": 2},
            [1, 3, 2],
            [(1, "kidney excluding masses"), (2, "tumor"), (3, "masses excluding tumor")],
        ),
        (  # two disjoint inner regions are both excluded; the ignore label has no channel
            {"background": 0, "organ": [1, 2, 3], "cyst": 2, "tumor": 3, "ignore": 4},
            [1, 2, 3],
            [(1, "organ excluding cyst and tumor"), (2, "cyst"), (3, "tumor")],
        ),
    ],
    ids=["brats", "kits23", "disjoint-inner"],
)
def test_each_label_value_is_named_for_what_its_voxels_are(labels, order, expected, tmp_path):
    outputs = check_labels({"labels": labels, "regions_class_order": order}, tmp_path)
    assert [(value, name) for name, value in outputs.pairs] == expected
    assert outputs.channel_values == tuple(order) and outputs.channels == len(order)
    assert [name for name, _ in outputs.regions] == [k for k in labels if k not in ("background", "ignore")]


@pytest.mark.parametrize("batch_dice", [True, False], ids=["batch-dice", "sample-dice"])
@pytest.mark.parametrize("ignore", [False, True], ids=["no-ignore", "ignore"])
def test_the_region_loss_is_nnunets_dice_and_bce_loss(batch_dice, ignore):
    from batchgeneratorsv2.transforms.utils.seg_to_regions import ConvertSegmentationToRegionsTransform
    from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    regions = [(1, 2, 3), (2, 3), 3]
    generator = torch.Generator().manual_seed(5)
    logits = (torch.randn(2, 3, 6, 8, 8, generator=generator) * 2).requires_grad_()
    labels = torch.randint(0, 5 if ignore else 4, (2, 6, 8, 8), generator=generator)
    ours = RegionDiceBCELoss(
        [r if isinstance(r, tuple) else (r,) for r in regions], ignore_index=4 if ignore else None, batch_dice=batch_dice
    )(logits, labels)
    (grad_ours,) = torch.autograd.grad(ours, logits)
    # nnU-Net's way: the regions (and the ignore label as a last channel) made by its transform, then its loss
    convert = ConvertSegmentationToRegionsTransform([*regions, 4] if ignore else regions)
    target = torch.stack([convert._apply_to_segmentation(case[None]) for case in labels])
    theirs_fn = DC_and_BCE_loss(
        {},
        {"batch_dice": batch_dice, "do_bg": True, "smooth": 1e-5, "ddp": False},
        use_ignore_label=ignore,
        dice_class=MemoryEfficientSoftDiceLoss,
    )
    theirs = theirs_fn(logits, target)
    (grad_theirs,) = torch.autograd.grad(theirs, logits)
    assert ours.item() == pytest.approx(theirs.item() + 1.0, abs=1e-6)  # nnU-Net returns BCE - Dice
    torch.testing.assert_close(grad_ours, grad_theirs, rtol=1e-5, atol=1e-8)
    if ignore:  # the ignored voxels change nothing
        assert float(grad_ours[(labels == 4).unsqueeze(1).expand_as(grad_ours)].abs().max()) == 0.0


def _edited_copy(folder: Path, target: Path, change) -> Path:
    shutil.copytree(folder, target)
    data = json.loads((target / "dataset.json").read_text())
    change(data)
    (target / "dataset.json").write_text(json.dumps(data))
    return target


def test_a_dataset_json_that_does_not_describe_the_network_is_refused(tiny_region_folder, tiny_folders, tmp_path, store):
    def no_order(data):
        del data["regions_class_order"]

    folder = _edited_copy(tiny_region_folder, tmp_path / "no-order", no_order)
    with pytest.raises(NnUNetImportError, match="needs regions_class_order") as caught:
        import_model(folder, store, name="no-order")
    assert "2 values, one per region ['liver and lesions', 'liver lesion']" in str(caught.value)

    def repeated(data):
        data["regions_class_order"] = [2, 2]

    with pytest.raises(NnUNetImportError, match="its own label value"):
        import_model(_edited_copy(tiny_region_folder, tmp_path / "repeated", repeated), store, name="repeated")

    # a label model's folder whose dataset.json was edited to regions: 3 softmax channels, not 2 sigmoids
    def regions(data):
        data["labels"] = {"background": 0, "liver and lesions": [1, 2], "liver lesion": 2}
        data["regions_class_order"] = [1, 2]

    with pytest.raises(NnUNetImportError, match="does not output what dataset.json describes") as caught:
        import_model(_edited_copy(tiny_folders["2d"], tmp_path / "edited", regions), store, name="edited")
    assert "2 sigmoid regions" in str(caught.value) and "3 output channels" in str(caught.value)

    def ignore_region(data):
        data["labels"]["ignore"] = [4, 5]

    with pytest.raises(NnUNetImportError, match="ignore label must be one integer"):
        import_model(_edited_copy(tiny_region_folder, tmp_path / "ignore", ignore_region), store, name="ignore")
    assert not {"no-order", "repeated", "edited", "ignore"} & set(store.names())


def test_a_region_order_whose_values_would_teach_the_opposite_segments_but_is_not_fine_tuned(tiny_region_folder, store, tmp_path):
    # value 2 is written where "liver and lesions" is on and "liver lesion" off, yet 2 is a "liver lesion" value:
    # nnU-Net runs such a model (and DeepSeg segments with it), but corrections in its values cannot train it
    def swapped(data):
        data["regions_class_order"] = [2, 1]

    card = import_model(_edited_copy(tiny_region_folder, tmp_path / "swapped", swapped), store, name="swapped")
    assert [(label.value, label.name) for label in card.labels] == [
        (1, "liver lesion"),
        (2, "liver and lesions excluding liver lesion"),
    ]
    dataset = site_dataset(tmp_path / "site")
    mapping = {"liver": "liver and lesions excluding liver lesion"}
    with pytest.raises(ConfigError, match="cannot train its regions") as caught:
        retrain(dataset, card.name, RetrainConfig(epochs=1, label_mapping=mapping), tmp_path / "ck", base=card.ref, store=store)
    assert (
        "value 2, which region 'liver and lesions' writes where 'liver lesion' is off, is one of 'liver lesion's values"
        in str(caught.value)
    )
    assert "value 1, which region 'liver lesion' writes, is not one of its values [2]" in str(caught.value)
    assert store.versions("swapped") == [1] and not (tmp_path / "ck").exists()


def test_a_region_row_keeps_a_name_of_its_own(card):
    # BraTS-like files whose last region has several values ("core": [2, 3], written as 2) name value 2 "core"
    # too; the region's row then needs another name, as the batch CSV keys its columns by name
    from deepseg_core.cli_segment import segment_summaries
    from deepseg_core.inference.predictor import SegmentationResult

    config = {
        **card.pipeline["config"],
        "regions": [{"name": "liver and lesions", "values": [1, 2]}, {"name": "liver lesion", "values": [1, 2]}],
    }
    renamed = dataclasses.replace(card, pipeline={**card.pipeline, "config": config})
    labels = np.zeros((4, 5, 6), np.uint8)
    labels[1, 1:3] = 1
    labels[2, 2:4] = 2
    grid = io.Volume(labels, (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), np.eye(3))
    rows = segment_summaries(SegmentationResult(labels=grid, card=renamed), options())
    names = [row["name"] for row in rows]
    assert names == ["liver and lesions excluding liver lesion", "liver lesion", "liver and lesions", "liver lesion (region)"]
    assert [row["voxels"] for row in rows] == [12, 12, 24, 24]


def test_regions_class_order_beside_plain_labels_is_ignored_as_nnunet_ignores_it(tiny_folders, tmp_path, store):
    def plain(data):
        data["regions_class_order"] = [2, 1]

    card = import_model(_edited_copy(tiny_folders["2d"], tmp_path / "plain", plain), store, name="plain-labels")
    assert [(label.value, label.name) for label in card.labels] == [(1, "liver"), (2, "liver lesion")]
    assert card.pipeline["config"]["label_values"] == [0, 1, 2] and "regions" not in card.pipeline["config"]


def test_one_value_lists_are_plain_labels(tiny_folders, tmp_path, store):
    def one_value_lists(data):
        data["labels"] = {"background": 0, "liver": [1], "liver lesion": [2]}

    card = import_model(_edited_copy(tiny_folders["2d"], tmp_path / "lists", one_value_lists), store, name="lists")
    assert [(label.value, label.name) for label in card.labels] == [(1, "liver"), (2, "liver lesion")]
    assert card.pipeline["config"]["label_values"] == [0, 1, 2] and "regions" not in card.pipeline["config"]


def test_evaluation_rows_of_regions_keep_names_of_their_own(card, tmp_path):
    # a dataset whose label is named like the model's multi-value region, and that lacks the lesion label: the
    # region's row is renamed, and the lesion region (one value, no dataset label) gets a row of its own
    from deepseg_core.phantoms import PHANTOM_LABELS
    from deepseg_core.training.engine import _region_rows

    renamed = (dataclasses.replace(PHANTOM_LABELS[0], name="liver and lesions"),)
    dataset = Dataset.create(tmp_path / "site", "site", renamed)
    rows = _region_rows(card, dataset, {1: 1})
    assert rows == {
        "liver and lesions": ("liver and lesions (region)", [1], (1, 2)),
        "liver lesion": ("liver lesion", [], (2,)),
    }
    assert [region.row_name for region in card.regions] == ["liver and lesions", "liver lesion"]
