"""nnU-Net's cascade (``3d_lowres`` then ``3d_cascade_fullres``): import both stages, segment as nnU-Net's predictor.

The cascade is made from the tiny 3d_fullres model (``scripts/make_tiny_nnunet_model.py``), as nnU-Net lays
it out: ``<Trainer>__<Plans>__3d_lowres`` beside ``<Trainer>__<Plans>__3d_cascade_fullres``, with the plans'
``previous_stage`` / ``next_stage``. The first stage is the 3d_fullres folds run at 1.6 times the spacing;
the second stage is the same folds with two more input channels (the first stage's liver and lesion
one-hot masks) whose weights are seeded random numbers, so its output depends on them. nnU-Net runs the
same files: its predictor on the first stage, then on the second with ``folder_with_segs_from_prev_stage``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from foreign_cases import THREE_SIDED_FRAMES, add_lowres_configuration, offgrid_ct_phantom, one_torch_thread, site_dataset  # noqa: F401 (one_torch_thread: a fixture)

from deepseg_core import io
from deepseg_core.cli import EXIT_OK, main
from deepseg_core.errors import ConfigError
from deepseg_core.importers import import_model
from deepseg_core.importers.nnunet import NnUNetImportError, load_checkpoint
from deepseg_core.inference import Segmenter, SegmentOptions
from deepseg_core.model_store import ModelStore
from deepseg_core.training.engine import RetrainConfig, retrain

pytestmark = [pytest.mark.needs_torch, pytest.mark.usefixtures("one_torch_thread")]

FIRST, SECOND = "nnUNetTrainer__nnUNetPlans__3d_lowres", "nnUNetTrainer__nnUNetPlans__3d_cascade_fullres"
#: the first stage's spacing as a multiple of 3d_fullres'
LOWRES_FACTOR = 1.6
MIN_AGREEMENT = 0.995


def options(**kwargs) -> SegmentOptions:
    return SegmentOptions(device="cpu", check_modality=False, **{"backend": "torch", **kwargs})


def _edit_plans(plans: dict) -> None:
    add_lowres_configuration(plans, LOWRES_FACTOR)
    plans["configurations"]["3d_cascade_fullres"] = {
        "inherits_from": "3d_fullres",
        "data_identifier": "nnUNetPlans_3d_cascade_fullres",
        "previous_stage": "3d_lowres",
    }


def _second_stage_checkpoint(path: Path, extra_channels: int, seed: int) -> None:
    """The first conv (and its aliases) reads ``extra_channels`` more channels, with seeded random weights."""
    checkpoint = load_checkpoint(path)
    weights = checkpoint["network_weights"]
    first_conv = [k for k, v in weights.items() if v.ndim == 5 and v.shape[1] == 1]
    assert len(first_conv) == 4  # the conv and its aliases (all_modules, decoder.encoder)
    reference = weights[first_conv[0]]
    generator = torch.Generator().manual_seed(seed)
    extra = torch.randn(reference.shape[0], extra_channels, *reference.shape[2:], generator=generator) * 2 * reference.std()
    for key in first_conv:
        weights[key] = torch.cat([weights[key], extra.to(weights[key].dtype)], dim=1)
    checkpoint["init_args"]["configuration"] = "3d_cascade_fullres"
    torch.save(checkpoint, path)


@pytest.fixture(scope="module")
def cascade(tiny_folders, tmp_path_factory) -> Path:
    """The cascade's parent folder (both stages; fold 0, and in the first stage also fold 1, which the import
    leaves out: the first stage's folds are the second stage's)."""
    parent = tmp_path_factory.mktemp("cascade")
    for name in (FIRST, SECOND):
        folder = parent / name
        shutil.copytree(tiny_folders["3d"], folder)
        plans = json.loads((folder / "plans.json").read_text())
        _edit_plans(plans)
        (folder / "plans.json").write_text(json.dumps(plans))
        for fold in (0, 1):
            path = folder / f"fold_{fold}" / "checkpoint_final.pth"
            if name == FIRST:
                checkpoint = load_checkpoint(path)
                checkpoint["init_args"]["configuration"] = "3d_lowres"
                torch.save(checkpoint, path)
            elif fold == 0:
                _second_stage_checkpoint(path, extra_channels=2, seed=10)
            else:
                shutil.rmtree(path.parent)
    return parent


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> ModelStore:
    return ModelStore(tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="module")
def card(cascade, store):
    return import_model(cascade / SECOND, store, name="cascade")


@pytest.fixture(scope="module")
def images(tmp_path_factory, head_ct_path) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("images")
    phantom = io.write_image(offgrid_ct_phantom(7, THREE_SIDED_FRAMES), folder / "phantom_0000.nii.gz")
    head = folder / "headct_0000.nii.gz"
    head.symlink_to(head_ct_path)
    return {"phantom": Path(phantom), "head_ct": head}


@pytest.fixture(scope="module")
def references(nnunet_maker, cascade, images, tmp_path_factory) -> dict:
    """nnU-Net's first stage, its second stage on the first stage's files, and its preprocessing of the second
    stage's phantom input (image and first-stage segmentation), in one predictor subprocess."""
    work = tmp_path_factory.mktemp("reference")
    cases = {key: path.name.removesuffix("_0000.nii.gz") for key, path in images.items()}
    for stage in ("first", "second"):
        (work / stage).mkdir()
    jobs = [
        {"model": str(cascade / FIRST), "folds": [0], "mirroring": False, "inputs": [[str(p)] for p in images.values()],
         "outputs": [str(work / "first" / cases[k]) for k in images]},
        {"model": str(cascade / SECOND), "mirroring": False, "inputs": [[str(p)] for p in images.values()],
         "outputs": [str(work / "second" / cases[k]) for k in images], "prev_stage": str(work / "first")},
        *({"kind": "preprocess", "model": str(cascade / SECOND), "configuration": "3d_cascade_fullres",
           "inputs": [[str(images[key])]], "seg": str(work / "first" / f"{cases[key]}.nii.gz"),
           "outputs": [str(work / f"second-input-{key}")]} for key in images),
    ]  # fmt: skip
    nnunet_maker.run_reference(jobs, work)

    def labels(stage: str, key: str) -> np.ndarray:
        return sitk.GetArrayFromImage(sitk.ReadImage(str(work / stage / f"{cases[key]}.nii.gz")))

    out = {(stage, key): labels(stage, key) for stage in ("first", "second") for key in images}
    out.update({("second_input", key): np.load(work / f"second-input-{key}.npz") for key in images})
    return out


def test_the_card_holds_both_stages(card, cascade, store):
    first = card.previous_stage
    assert first is not None and card.source["configuration"] == "3d_cascade_fullres"
    assert card.source["previous_stage"]["configuration"] == "3d_lowres"
    assert card.ensemble == first.ensemble == ("fold_0",)
    assert card.architecture.config["in_channels"] == 3 and first.architecture.config["in_channels"] == 1
    fullres = card.pipeline["config"]["spacing"]
    assert first.pipeline["config"]["spacing"] == pytest.approx([s * LOWRES_FACTOR for s in fullres])
    assert f"../{FIRST}/fold_0/checkpoint_final.pth" in card.source["files"]
    assert f"../{FIRST}/fold_1/checkpoint_final.pth" not in card.source["files"]
    assert "second stage of a cascade after 3d_lowres" in card.description
    # importing the same folders again returns the stored version
    assert import_model(cascade / SECOND, store, name="cascade").version == card.version


@pytest.mark.parametrize("image", ["phantom", "head_ct"])
def test_the_second_stage_reads_the_first_stages_labels_as_nnunet_prepares_them(image, card, store, images, references):
    segmenter = Segmenter.load(card.ref, device="cpu", store=store)
    volume = io.read_image(images[image])
    first = segmenter.previous_stage.segment([volume], options()).labels.array_zyx
    assert float((first == references[("first", image)]).mean()) >= MIN_AGREEMENT
    # the second stage's input made from nnU-Net's own first-stage file, as nnU-Net's preprocessing makes it
    prepared = segmenter.prepare([volume], options(), [image], references[("first", image)]).image_czyx
    theirs = references[("second_input", image)]
    expected_onehot = np.stack([theirs["seg"][0] == value for value in (1, 2)]).astype(np.float32)
    assert prepared.shape == (3, *theirs["data"].shape[1:])
    np.testing.assert_array_equal(prepared[0], theirs["data"][0])
    np.testing.assert_array_equal(prepared[1:], expected_onehot)
    assert expected_onehot[0].sum() > 100, "liver voxels to compare"
    if image == "head_ct":  # background inside the crop box: nnU-Net's -1, in no channel
        assert (theirs["seg"][0] < 0).sum() > 1000


@pytest.mark.parametrize("image", ["phantom", "head_ct"])
def test_labels_match_nnunets_own_cascade(image, card, store, images, references, record_property):
    volume = io.read_image(images[image])
    segmenter = Segmenter.load(card.ref, device="cpu", store=store)
    progress = []
    result = segmenter.segment([volume], options(), on_progress=lambda *event: progress.append(event))
    ours, theirs = result.labels.array_zyx, references[("second", image)]
    # one progress bar over both stages: the total (the second stage's tiles planned from its network
    # grid before the first runs) holds from the first event to the last
    first_tiles = segmenter.previous_stage.planned_tiles([volume], options())
    total = first_tiles + result.window_stats["tiles"]
    assert first_tiles > 0 and {event[1] for event in progress} == {total}
    assert [event[0] for event in progress] == sorted(event[0] for event in progress) and progress[-1][:2] == (total, total)
    assert all(eta > 0 for done, _, eta in progress if done < first_tiles), "the first stage's estimate counts the second's tiles"
    assert result.labels.same_grid(volume)
    differ = int((ours != theirs).sum())
    record_property("realdata", f"nnU-Net cascade parity, {image}: {differ} of {theirs.size} voxels differ")
    assert 1.0 - differ / theirs.size >= MIN_AGREEMENT
    assert (theirs == 1).sum() > 100
    # the first stage's labels steer the second: the cascade's labels are not the first stage's
    assert int((theirs != references[("first", image)]).sum()) > 100
    assert "first_stage_network" in result.timings_s and "input_checks" in result.timings_s
    assert result.first_stage == {"backend": "torch", "precision": "float32", "tiles": first_tiles}


def test_other_backends_run_both_stages(card, store, images):
    volume = io.read_image(images["phantom"])
    segmenter = Segmenter.load(card.ref, device="cpu", store=store)
    torch_labels = segmenter.segment([volume], options()).labels.array_zyx
    result = segmenter.segment([volume], options(backend="onnxruntime"))
    assert result.backend == "onnxruntime" and result.first_stage["backend"] == "onnxruntime"
    assert float((result.labels.array_zyx == torch_labels).mean()) >= 0.999


def test_the_summary_names_each_stages_backend_and_tiles(card, store, images, tmp_path, capsys):
    out = tmp_path / "case.seg.nrrd"
    args = ["segment", str(images["phantom"]), "--model", card.ref, "--models-dir", str(store.root), "--output", str(out)]
    assert main([*args, "--device", "cpu", "--backend", "torch", "--json"]) == EXIT_OK
    done = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"case_done"' in line][-1]
    segmenter = Segmenter.load(card.ref, device="cpu", store=store)
    volume = io.read_image(images["phantom"])
    assert done["tiles"] == segmenter.planned_tiles([volume], options())
    assert done["first_stage"] == {
        "backend": "torch",
        "precision": "float32",
        "tiles": segmenter.previous_stage.planned_tiles([volume], options()),
    }
    assert "input_checks" in done["timings_s"] and "first_stage_network" in done["timings_s"]


def test_both_stages_are_prepared_and_then_run_without_exporting(card, store, images, tmp_path, monkeypatch):
    segmenter = Segmenter.load(card.ref, device="cpu", store=store)
    segmenter.cache_dir = segmenter.previous_stage.cache_dir = tmp_path
    # the second stage reads the image and one channel per foreground label of the first stage
    assert (segmenter.previous_stage.pipeline.network_input_channels, segmenter.pipeline.network_input_channels) == (1, 3)
    stages = segmenter.prepare_backend(options(backend="openvino"))
    assert [(stage["backend"], stage["exported"]) for stage in stages] == [("openvino", True), ("openvino", True)]

    def no_export(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr(torch.onnx, "export", no_export)
    statuses = []
    result = segmenter.segment([io.read_image(images["phantom"])], options(backend="openvino"), on_status=statuses.append)
    assert statuses == [] and result.backend == "openvino" and result.first_stage["backend"] == "openvino"


def test_a_cascade_whose_graphs_are_cached_builds_neither_stages_network(card, store, images, tmp_path):
    from deepseg_core.inference.backends import weights_digest

    preparing = Segmenter.load(card.ref, device="cpu", store=store)
    preparing.cache_dir = preparing.previous_stage.cache_dir = tmp_path
    preparing.prepare_backend(options(backend="openvino"))
    later = Segmenter.load(card.ref, device="cpu", store=store)
    later.cache_dir = later.previous_stage.cache_dir = tmp_path
    digests = (later.previous_stage.weights_sha256(), later.weights_sha256())
    result = later.segment([io.read_image(images["phantom"])], options(backend="openvino"))
    assert (result.backend, result.first_stage["backend"]) == ("openvino", "openvino")
    assert not later.network_built and not later.previous_stage.network_built
    assert digests == (weights_digest(preparing.previous_stage.net), weights_digest(preparing.net))
    assert digests == (weights_digest(later.previous_stage.net), weights_digest(later.net))


def test_a_cascade_whose_first_stage_the_runtime_cannot_take_runs_that_stage_in_torch_and_the_second_in_openvino(
    card, store, images, tmp_path, monkeypatch
):
    """Each stage chooses its backend on its own: an export that fails for the first stage's network (one input
    channel) sends that stage to torch, is recorded, and the second stage still runs in OpenVINO; the labels
    are torch's, and a later run builds only the first stage's network."""
    real_export = torch.onnx.export

    def first_stage_unsupported(model, args, *rest, **kwargs):
        if args[0].shape[1] == 1:
            raise torch.onnx.errors.UnsupportedOperatorError("aten::frobnicate", 17, 18)
        return real_export(model, args, *rest, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", first_stage_unsupported)
    volume = io.read_image(images["phantom"])
    first = Segmenter.load(card.ref, device="cpu", store=store)
    first.cache_dir = first.previous_stage.cache_dir = tmp_path
    result = first.segment([volume], options(backend="openvino"))
    assert (result.first_stage["backend"], result.backend) == ("torch", "openvino")
    torch_labels = Segmenter.load(card.ref, device="cpu", store=store).segment([volume], options()).labels.array_zyx
    assert float((result.labels.array_zyx == torch_labels).mean()) >= 0.999

    later = Segmenter.load(card.ref, device="cpu", store=store)  # the next run: the failure is on record
    later.cache_dir = later.previous_stage.cache_dir = tmp_path
    assert not later.needs_preparing(options(backend="openvino"))
    later.build_networks_runs_need(options(backend="openvino"))
    assert later.previous_stage.network_built and not later.network_built
    again = later.segment([volume], options(backend="openvino"))
    assert (again.first_stage["backend"], again.backend) == ("torch", "openvino")
    assert np.array_equal(again.labels.array_zyx, result.labels.array_zyx)


def test_a_cascade_is_not_fine_tuned_and_says_what_to_do(card, store, tmp_path):
    dataset = site_dataset(tmp_path / "site")
    versions = store.versions(card.name)
    with pytest.raises(ConfigError, match="cascade") as caught:
        retrain(dataset, card.name, RetrainConfig(epochs=1), tmp_path / "checkpoints", base=card.ref, store=store)
    assert "3d_fullres" in str(caught.value)
    assert store.versions(card.name) == versions and not (tmp_path / "checkpoints").exists()


def test_a_second_stage_without_its_first_stage_is_refused(cascade, tmp_path):
    alone = tmp_path / SECOND
    shutil.copytree(cascade / SECOND, alone)
    store = ModelStore(tmp_path / "store")
    with pytest.raises(NnUNetImportError, match="needs its first stage") as caught:
        import_model(alone, store, name="alone")
    assert FIRST in str(caught.value) and "alone" not in store.names()


def test_tta_uncertainty_perturbs_the_image_not_the_first_stages_labels(card, store, images):
    segmenter = Segmenter.load(card.ref, device="cpu", store=store)
    assert segmenter.window_config(options(uncertainty="tta")).perturbed_channels == 1  # the CT, not the one-hot masks
    assert segmenter.previous_stage.window_config(options(uncertainty="tta")).perturbed_channels is None
    volume = io.read_image(images["phantom"])
    result = segmenter.segment([volume], options(uncertainty="tta"))
    assert result.uncertainty is not None and result.uncertainty.same_grid(volume)


def test_a_wrong_input_is_refused_before_the_first_stage_runs(card, store, images, monkeypatch):
    segmenter = Segmenter.load(card.ref, device="cpu", store=store)
    ct = io.read_image(images["phantom"])
    mr_like = ct.with_array((ct.array_zyx - ct.array_zyx.min()).astype(np.float32))  # no voxel below 0: not a CT

    def first_stage_ran(*args, **kwargs):
        raise AssertionError("the first stage ran")

    monkeypatch.setattr(segmenter.previous_stage, "segment", first_stage_ran)
    with pytest.raises(io.ImageError, match="does not look like a CT"):
        segmenter.segment([mr_like], SegmentOptions(device="cpu", backend="torch"))


def _copy_cascade(cascade: Path, target: Path) -> Path:
    for name in (FIRST, SECOND):
        shutil.copytree(cascade / name, target / name)
    return target


def test_a_first_stage_that_does_not_fit_the_second_is_refused(cascade, tmp_path):
    store = ModelStore(tmp_path / "store")
    other_channels = _copy_cascade(cascade, tmp_path / "channels")
    dataset_json = other_channels / FIRST / "dataset.json"
    dataset_json.write_text(json.dumps({**json.loads(dataset_json.read_text()), "channel_names": {"0": "T1"}}))
    with pytest.raises(NnUNetImportError, match="first stage reads other input channels"):
        import_model(other_channels / SECOND, store, name="channels")
    missing_fold = _copy_cascade(cascade, tmp_path / "folds")
    shutil.rmtree(missing_fold / FIRST / "fold_0")
    with pytest.raises(NnUNetImportError, match="first stage .3d_lowres. lacks the second stage's folds"):
        import_model(missing_fold / SECOND, store, name="folds")
    assert store.names() == []
