"""nnU-Net v2 models: import (card, provenance, refusals) and parity with nnU-Net's own predictor.

The models are real nnU-Net results folders made by nnU-Net's own code on a tiny DeepSeg dataset of
phantoms (``scripts/make_tiny_nnunet_model.py``, cached); the reference segmentations come from
``nnUNetPredictor.predict_from_files_sequential`` run on the same files. Parity: per-label Dice >= 0.99
and >= 99.5 % voxel agreement (README, "Importing nnU-Net and TotalSegmentator models").
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from foreign_cases import THREE_SIDED_FRAMES, add_lowres_configuration, offgrid_ct_phantom, one_torch_thread  # noqa: F401 (one_torch_thread: a fixture)

from deepseg_core import io, phantoms
from deepseg_core.cli import EXIT_MODEL, EXIT_OK, main
from deepseg_core.compare import compare_files, compare_folders
from deepseg_core.errors import ConfigError
from deepseg_core.importers import import_model
from deepseg_core.importers.nnunet import NnUNetImportError, load_checkpoint
from deepseg_core.inference import Segmenter, SegmentOptions
from deepseg_core.inference.sliding_window import SlidingWindowConfig, sliding_window_predict
from deepseg_core.losses import DeepSupervisionLoss, build_loss
from deepseg_core.model_card import TerminologyCode
from deepseg_core.model_catalog import CARD_FILE, WEIGHTS_FILE
from deepseg_core.model_store import ModelStore
from deepseg_core.nets import build_net
from deepseg_core.nets.nnunet import (
    NnUNetPlainConfig,
    NnUNetPlainUNet,
    NnUNetResEncConfig,
    NnUNetResEncUNet,
    canonical_state_dict,
)
from deepseg_core.outputs import write_segmentation_result
from deepseg_core.pipelines.axes import AxisReorder
from deepseg_core.pipelines.nnunet import (
    CANDIDATE_MIN_CLASSES,
    GENERIC_BILINEAR_MIN_CHANNELS,
    NnUNetExportCollector,
    candidate_channels,
    export,
    linear_positions,
    nearest_positions,
    nnunet_gaussian,
    nnunet_tile_starts,
    nonzero_bbox,
    resample_image,
    resample_labels,
)
from deepseg_core.pipelines.nnunet.orientation import input_shape, reorientation, reoriented_spacing_zyx

pytestmark = [pytest.mark.needs_torch, pytest.mark.usefixtures("one_torch_thread")]

MIN_DICE = 0.99
MIN_AGREEMENT = 0.995
#: labels smaller than this (in either map) are compared by voxel count, not Dice: a couple of
#: near-tie voxels (nnU-Net rounds its logits to float16) would move a tiny region's Dice a lot
SMALL_REGION_VOXELS = 200
#: (model, image, mirroring): the parity cases, each against nnU-Net's own predictor
CASES = [
    ("3d", "phantom", False),
    ("3d", "phantom", True),
    ("3d", "head_ct", False),
    ("2d", "phantom", False),
    ("2d", "head_ct", False),
    ("resenc", "phantom", False),
    ("lowres", "phantom", False),
    ("lowres", "head_ct", False),
]


def dice(a: np.ndarray, b: np.ndarray, value: int) -> float:
    """Dice of label ``value`` between two label maps (1.0 when both lack it)."""
    x, y = a == value, b == value
    total = int(x.sum() + y.sum())
    return 1.0 if total == 0 else 2.0 * float((x & y).sum()) / total


def assert_parity(ours: np.ndarray, reference: np.ndarray) -> None:
    """DeepSeg's labels against nnU-Net's: voxel agreement, and Dice per label (voxel counts for tiny labels)."""
    assert ours.shape == reference.shape
    agreement = float((ours == reference).mean())
    assert agreement >= MIN_AGREEMENT, f"voxel agreement {agreement:.5f}"
    assert (reference == 1).sum() > 100, "the model predicts no liver: the comparison would be empty"
    for value in (1, 2):
        size = max(int((reference == value).sum()), int((ours == value).sum()))
        if size >= SMALL_REGION_VOXELS:
            assert dice(ours, reference, value) >= MIN_DICE, f"label {value}: Dice {dice(ours, reference, value):.5f}"
        else:
            assert int(((ours == value) != (reference == value)).sum()) <= max(2, size // 20), f"label {value}"


def options(**kwargs) -> SegmentOptions:
    """Segment options on the CPU with PyTorch itself (other inference backends are compared with torch elsewhere)."""
    names = {f.name for f in dataclasses.fields(SegmentOptions)}
    if "backend" in names:
        kwargs.setdefault("backend", "torch")
    return SegmentOptions(device="cpu", check_modality=False, **kwargs)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> ModelStore:
    return ModelStore(tmp_path_factory.mktemp("store"))


#: the 3d_lowres copy's spacing, as a multiple of 3d_fullres' (nnU-Net's planner coarsens by about 1.5-2)
LOWRES_FACTOR = 1.6


@pytest.fixture(scope="module")
def folders(tiny_folders, tmp_path_factory) -> dict[str, Path]:
    """The tiny folders, and ``lowres``: fold 0 of the 3d_fullres model as the ``3d_lowres`` configuration of
    nnU-Net's cascade (plans with a coarser spacing, ``next_stage`` set; the checkpoint's configuration renamed),
    which both tools run as a model of its own."""
    folder = _copy(tiny_folders["3d"], tmp_path_factory.mktemp("lowres") / "nnUNetTrainer__nnUNetPlans__3d_lowres")
    shutil.rmtree(folder / "fold_1")

    _edit_json(folder / "plans.json", lambda plans: add_lowres_configuration(plans, LOWRES_FACTOR))
    _rewrite_checkpoint(folder / "fold_0" / "checkpoint_final.pth", lambda c: c["init_args"].update(configuration="3d_lowres"))
    return {**tiny_folders, "lowres": folder}


@pytest.fixture(scope="module")
def imported(store, folders) -> dict:
    return {key: import_model(folder, store, name=f"tiny-{key}") for key, folder in folders.items()}


@pytest.fixture(scope="module")
def segmenters(imported, store) -> dict:
    return {key: Segmenter.load(card.ref, device="cpu", store=store) for key, card in imported.items()}


@pytest.fixture(scope="module")
def images(tmp_path_factory, head_ct_path) -> dict[str, Path]:
    """A CT phantom on another grid than the training data (spacing, origin, flipped axes, a zero frame that
    nnU-Net crops away; its z axis is anisotropic, so resampling takes the separate-axis path), and the
    real head CT (1 mm isotropic, background 0: cropped; plain 3D resampling)."""
    folder = tmp_path_factory.mktemp("images")
    path = io.write_image(offgrid_ct_phantom(7, THREE_SIDED_FRAMES), folder / "phantom_0000.nii.gz")
    oblique = io.write_image(oblique_phantom(), folder / "oblique_0000.nii.gz")
    # the reference's way (TotalSegmentator's nib.as_closest_canonical): the voxels permuted and flipped to RAS
    oblique_ras = folder / "oblique_ras_0000.nii.gz"
    sitk.WriteImage(sitk.DICOMOrient(sitk.ReadImage(str(oblique)), "RAS"), str(oblique_ras), True)
    return {"phantom": Path(path), "head_ct": head_ct_path, "oblique": Path(oblique), "oblique_ras": oblique_ras}


def rotation(axis: int, degrees: float) -> np.ndarray:
    """Rotation by ``degrees`` about world axis ``axis``."""
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    matrix = np.eye(3)
    i, j = [a for a in range(3) if a != axis]
    matrix[i, i], matrix[j, j], matrix[i, j], matrix[j, i] = c, c, -s, s
    return matrix


def oblique_phantom() -> io.Volume:
    """A CT phantom stored as DICOM stores an axial series (LPS: i toward Left, j toward Posterior, k toward
    Superior), tilted 20 degrees about z and 10 about x, with a zero frame on one side of y and x (so the crop
    is not symmetric under the flips of the reorientation)."""
    phantom = phantoms.generate_phantom(
        seed=23,
        profile="ct-A",
        shape_zyx=(16, 58, 50),
        spacing_xyz_mm=(1.1, 0.9, 3.5),
        n_lesions=(2, 3),
        lesion_radius_mm=(8.0, 14.0),
        origin_lps=(-20.0, 15.5, -30.0),
    )
    array = phantom.image.array_zyx.astype(np.int16)
    array[:, :5] = 0
    array[:, :, -4:] = 0
    return io.Volume(array, phantom.image.spacing_xyz_mm, phantom.image.origin_lps, rotation(2, 20) @ rotation(0, 10))


@pytest.fixture(scope="module")
def references(nnunet_maker, tiny_folders, folders, images, tmp_path_factory) -> dict:
    """nnU-Net's own segmentations of every parity case (one predictor subprocess for all), and a training
    case preprocessed by nnU-Net's DefaultPreprocessor."""
    work = tmp_path_factory.mktemp("nnunet-reference")
    jobs, keys = [], []
    for model, image, mirroring in CASES:
        out = work / f"{model}-{image}-{int(mirroring)}"
        probabilities = (model, image, mirroring) == ("3d", "phantom", False)
        jobs.append(
            {
                "model": str(folders[model]),
                "mirroring": mirroring,
                "inputs": [[str(images[image])]],
                "outputs": [str(out)],
                "probabilities": probabilities,
            }
        )
        keys.append((model, image, mirroring))
    phantom = phantoms.generate_phantom(seed=11, shape_zyx=(20, 44, 36), spacing_xyz_mm=(2.5, 1.8, 2.2), n_lesions=2)
    case_image = io.write_image(phantom.image, work / "case_0000.nii.gz")
    case_labels = io.write_image(phantom.labels, work / "case.nii.gz")
    jobs.append(
        {
            "kind": "preprocess",
            "model": str(tiny_folders["3d"]),
            "configuration": "3d_fullres",
            "inputs": [[str(case_image)]],
            "seg": str(case_labels),
            "outputs": [str(work / "training-case")],
        }
    )
    # TotalSegmentator's way: nnU-Net on the image reoriented to RAS (and its preprocessing of that image)
    jobs.append(
        {
            "model": str(tiny_folders["3d"]),
            "mirroring": False,
            "inputs": [[str(images["oblique_ras"])]],
            "outputs": [str(work / "ras")],
        }
    )
    jobs.append(
        {
            "kind": "preprocess",
            "model": str(tiny_folders["3d"]),
            "configuration": "3d_fullres",
            "inputs": [[str(images["oblique_ras"])]],
            "outputs": [str(work / "ras-preprocessed")],
        }
    )
    results = nnunet_maker.run_reference(jobs, work)
    out: dict = {"training_case": (phantom, np.load(work / "training-case.npz"))}
    # ... and the labels taken back to the stored orientation, as TotalSegmentator's undo_canonical does
    original = sitk.ReadImage(str(images["oblique"]))
    code = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(original.GetDirection())
    out["ras"] = {
        "labels": sitk.DICOMOrient(sitk.ReadImage(str(work / "ras.nii.gz")), code),
        "network_input": np.load(work / "ras-preprocessed.npz")["data"],
    }
    for key, job, result in zip(keys, jobs, results, strict=False):
        output = Path(job["outputs"][0])
        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(output) + ".nii.gz"))
        probabilities = np.load(str(output) + ".npz")["probabilities"] if job["probabilities"] else None
        out[key] = {
            "labels": labels,
            "probabilities": probabilities,
            "seconds": result["predict_s"],
            "path": Path(str(output) + ".nii.gz"),
        }
    return out


# ------------------------------------------------------------------------------------------------
# the card


def test_the_card_says_what_the_folder_holds(imported, tiny_folders, store):
    card = imported["3d"]
    folder = tiny_folders["3d"]
    assert card.ensemble == ("fold_0", "fold_1")
    assert card.architecture.name == "nnunet_plain_unet"
    assert card.architecture.config["features_per_stage"] == [8, 16, 32]
    assert [(label.value, label.name) for label in card.labels] == [(1, "liver"), (2, "liver lesion")]
    assert all(len(label.color) == 3 for label in card.labels) and card.labels[0].color != card.labels[1].color
    assert (card.inputs.modality, card.inputs.channels) == ("CT", ("CT",))
    # the phantoms are 2 x 2 x 3 mm (x thickest): nnU-Net plans (3, 2, 2) in its transposed order
    assert card.preprocessing.target_spacing_xyz_mm == pytest.approx((3.0, 2.0, 2.0))
    assert card.preprocessing.normalization.scheme == "ct"
    assert card.inference.patch_size_zyx == (16, 16, 32)
    config = card.pipeline["config"]
    assert card.pipeline["name"] == "nnunetv2"
    assert (config["transpose_forward"], config["transpose_backward"]) == ([2, 0, 1], [1, 2, 0])
    assert config["allowed_mirroring_axes"] == [0, 1, 2]
    assert config["label_values"] == [0, 1, 2]
    assert config["normalization_schemes"] == ["CTNormalization"]
    assert config["resampling_data"] == {"order": 3, "order_z": 0, "force_separate_z": None}
    assert config["reorient"] == "none"  # nnUNetPredictor's own behaviour unless asked
    assert card.inference.batch_size == 1  # one tile at a time, as nnU-Net's predictor
    source = card.source
    assert (source["format"], source["configuration"], source["trainer_name"], source["plans_name"]) == (
        "nnunetv2",
        "3d_fullres",
        "nnUNetTrainer",
        "nnUNetPlans",
    )
    assert source["folds"] == ["fold_0", "fold_1"] and source["checkpoint"] == "checkpoint_final.pth"
    expected_files = ["dataset.json", "dataset_fingerprint.json", "fold_0/checkpoint_final.pth", "fold_1/checkpoint_final.pth"]
    assert sorted(source["files"]) == sorted([*expected_files, "plans.json"])
    assert all(source["files"][name] == sha256(folder / name) for name in source["files"])
    assert card.fingerprint["spacing_xyz_mm"]["median"] == pytest.approx([3.0, 2.0, 2.0])
    assert card.fingerprint["num_cases"] == 6
    # the store holds the card and safetensors weights, never the pickles
    stored = store.folder(card.ref)
    assert sorted(p.name for p in stored.iterdir()) == sorted([CARD_FILE, WEIGHTS_FILE])
    assert imported["2d"].inference.patch_size_zyx == (1, 16, 32) and imported["2d"].architecture.config["spatial_dims"] == 2
    assert imported["resenc"].architecture.name == "nnunet_resenc_unet"


def test_the_default_name_is_the_dataset_and_reimporting_returns_the_stored_version(tiny_folders, tmp_path):
    store = ModelStore(tmp_path / "store")
    first = import_model(tiny_folders["2d"], store)
    assert first.ref == "Dataset501_DeepSegTiny:1"
    again = import_model(tiny_folders["2d"], store)
    assert again.ref == first.ref and store.versions(first.name) == [1]
    best = import_model(tiny_folders["2d"], store, checkpoint="checkpoint_best.pth", activate=False)
    assert best.version == 2 and "fold_0/checkpoint_best.pth" in best.source["files"]
    assert store.active_version(first.name) == 1


def test_labels_get_terminology_codes_when_deepseg_knows_them(tiny_folders, tmp_path, monkeypatch):
    liver = TerminologyCode("SCT", "10200004", "Liver")
    terminology = types.ModuleType("deepseg_core.terminology")
    terminology.code_for_name = lambda name: liver if name == "liver" else None
    monkeypatch.setitem(sys.modules, "deepseg_core.terminology", terminology)
    card = import_model(tiny_folders["2d"], ModelStore(tmp_path), name="coded")
    assert [(label.name, label.code) for label in card.labels] == [("liver", liver), ("liver lesion", None)]


@pytest.mark.parametrize("key", ["3d", "2d", "resenc", "lowres"])
def test_the_graph_key_read_from_the_weights_file_is_the_built_networks_digest(imported, store, key):
    from deepseg_core.inference.backends import weights_digest

    # "3d" is an ensemble of two folds (members registered as member_<fold>), "2d" a network wrapped for 2D tiles
    segmenter = Segmenter.load(imported[key].ref, device="cpu", store=store)
    before = segmenter.weights_sha256()
    assert not segmenter.network_built
    assert before == weights_digest(segmenter.net)


def test_folds_and_configuration_options(tiny_folders, tmp_path, store):
    one = import_model(tiny_folders["3d"], store, name="tiny-fold1", folds=["1"])
    assert one.ensemble == ("fold_1",) and list(one.source["files"]) == [
        "dataset.json",
        "plans.json",
        "fold_1/checkpoint_final.pth",
        "dataset_fingerprint.json",
    ]
    with pytest.raises(NnUNetImportError, match="fold_7.*checkpoint_final"):
        import_model(tiny_folders["3d"], store, name="tiny-fold7", folds=[7])
    with pytest.raises(NnUNetImportError, match="--configuration 2d does not match.*3d_fullres"):
        import_model(tiny_folders["3d"], store, name="tiny-wrong", configuration="2d")


def test_reorient_is_an_import_option_stored_on_the_card(tiny_folders, tmp_path, capsys):
    args = ["models", "import", str(tiny_folders["2d"]), "--models-dir", str(tmp_path), "--name", "ts", "--json"]
    assert main([*args, "--reorient", "ras"]) == EXIT_OK
    store = ModelStore(tmp_path)
    card = store.card("ts:1")
    assert card.pipeline["config"]["reorient"] == "ras" and "closest RAS orientation" in card.description
    # the same files without the reorientation are another model: a new version, not the stored one
    plain = import_model(tiny_folders["2d"], store, name="ts")
    assert plain.version == 2 and plain.pipeline["config"]["reorient"] == "none"
    assert import_model(tiny_folders["2d"], store, name="ts", reorient="RAS").version == 1
    capsys.readouterr()
    assert main([*args, "--reorient", "lps"]) == EXIT_MODEL
    assert "unknown --reorient value. Expected none or ras; found lps" in capsys.readouterr().err
    with pytest.raises(NnUNetImportError, match="Expected none or ras; found nearest"):
        import_model(tiny_folders["2d"], store, name="ts", reorient="nearest")
    assert store.versions("ts") == [1, 2]


def test_cli_imports_an_nnunet_folder(tiny_folders, tmp_path, capsys):
    args = ["models", "import", str(tiny_folders["resenc"]), "--models-dir", str(tmp_path), "--name", "cli", "--json"]
    assert main(args) == EXIT_OK
    events = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    event = events[0]
    assert (event["event"], event["model"], event["source"]["format"]) == ("imported", "cli:1", "nnunetv2")
    assert event["labels"] == ["liver", "liver lesion"]
    # then the ResEnc network is exported and compiled for this computer's CPU runtime (on CUDA: nothing to do)
    if not torch.cuda.is_available():
        assert [e["event"] for e in events[1:]] == ["status", "prepared"]
        assert [stage["backend"] for stage in events[-1]["stages"]] == ["openvino"]
    assert main(["models", "import", str(tiny_folders["resenc"].parent), "--models-dir", str(tmp_path)]) == EXIT_MODEL
    assert "trained model folders" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# refusals


def _rewrite_checkpoint(path: Path, change) -> None:
    checkpoint = load_checkpoint(path)
    change(checkpoint)
    torch.save(checkpoint, path)


def _edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _copy(folder: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(folder, target)
    return target


def test_a_cascade_of_three_stages_is_refused(tiny_folders, tmp_path, store):
    # nnU-Net's own cascades have two stages (test_nnunet_cascade.py); a first stage that has a stage before it is not run
    folder = _copy(tiny_folders["3d"], tmp_path / "nnUNetTrainer__nnUNetPlans__3d_cascade_fullres")

    def add_cascade(plans):
        plans["configurations"]["3d_lowres"] = {**plans["configurations"]["3d_fullres"], "previous_stage": "3d_verylowres"}
        plans["configurations"]["3d_cascade_fullres"] = {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}

    _edit_json(folder / "plans.json", add_cascade)
    _rewrite_checkpoint(
        folder / "fold_0" / "checkpoint_final.pth", lambda c: c["init_args"].update(configuration="3d_cascade_fullres")
    )
    with pytest.raises(NnUNetImportError, match="cascade of more than two stages.*not supported yet"):
        import_model(folder, store, name="cascade", folds=[0])
    assert "cascade" not in store.names()


def test_the_lowres_stage_of_a_cascade_imports_as_a_model_of_its_own(imported, folders):
    card = imported["lowres"]
    config = card.pipeline["config"]
    fullres = imported["3d"].pipeline["config"]
    assert card.source["configuration"] == "3d_lowres" and "3d_lowres" in card.description
    assert config["spacing"] == pytest.approx([s * LOWRES_FACTOR for s in fullres["spacing"]])
    assert config["patch_size"] == fullres["patch_size"] and card.ensemble == ("fold_0",)


def _leave_a_mark(path: str) -> None:
    """What the unsafe checkpoint would run when unpickled by plain pickle: create ``path``."""
    Path(path).touch()


class _Payload:
    """Unpickles as ``_leave_a_mark(marker)``: code in a checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (_leave_a_mark, (self.marker,))


def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(tiny_folders, tmp_path, store):
    folder = _copy(tiny_folders["2d"], tmp_path / "unsafe")
    marker = tmp_path / "code-ran"
    checkpoint_path = folder / "fold_0" / "checkpoint_final.pth"
    _rewrite_checkpoint(checkpoint_path, lambda c: c["logging"].update(extra=_Payload(marker)))
    with pytest.raises(NnUNetImportError, match=r"refused.*_leave_a_mark") as raised:
        import_model(folder, store, name="unsafe")
    assert "weights_only" in str(raised.value)
    assert not marker.exists() and "unsafe" not in store.names()
    # the payload is live: a plain unpickling would have run it
    torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    assert marker.exists()


def test_checkpoints_pickled_under_numpy_1_load(tiny_folders, tmp_path):
    # numpy < 2 (older nnU-Net and TotalSegmentator checkpoints) names the scalar constructor numpy.core.multiarray.scalar
    source = tiny_folders["2d"] / "fold_0" / "checkpoint_final.pth"
    old = tmp_path / "old.pth"
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(old, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith("data.pkl"):
                assert b"numpy._core.multiarray\nscalar" in data
                data = data.replace(b"numpy._core.multiarray\nscalar", b"numpy.core.multiarray\nscalar")
            zout.writestr(item, data)
    checkpoint = load_checkpoint(old)
    assert isinstance(checkpoint["_best_ema"], np.float32) and checkpoint["network_weights"]


def test_old_plans_without_an_architecture_section_give_the_same_network(tiny_folders, tmp_path, imported, store):
    folder = _copy(tiny_folders["3d"], tmp_path / "nnUNetTrainer__nnUNetPlans__3d_fullres")

    def legacy(plans):
        config = plans["configurations"]["3d_fullres"]
        kwargs = config.pop("architecture")["arch_kwargs"]
        config.update(
            UNet_class_name="PlainConvUNet",
            UNet_base_num_features=8,
            unet_max_num_features=32,
            conv_kernel_sizes=kwargs["kernel_sizes"],
            pool_op_kernel_sizes=kwargs["strides"],
            n_conv_per_stage_encoder=kwargs["n_conv_per_stage"],
            n_conv_per_stage_decoder=kwargs["n_conv_per_stage_decoder"],
            num_pool_per_axis=[2, 2, 2],
        )

    _edit_json(folder / "plans.json", legacy)
    card = import_model(folder, store, name="legacy")
    assert card.architecture == imported["3d"].architecture


# ------------------------------------------------------------------------------------------------
# networks and pipeline pieces against nnU-Net's own


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("residual", [False, True])
def test_networks_compute_what_dynamic_network_architectures_computes(dims, residual):
    from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet

    torch.manual_seed(dims)
    kernels = [[1, 3, 3], [3, 3, 3], [3, 3, 3]] if dims == 3 else [[3, 3]] * 3
    strides = [[1, 1, 1], [1, 2, 2], [2, 2, 2]] if dims == 3 else [[1, 1], [2, 2], [2, 2]]
    common = dict(
        input_channels=2,
        n_stages=3,
        features_per_stage=[8, 16, 32],
        conv_op=torch.nn.Conv3d if dims == 3 else torch.nn.Conv2d,
        kernel_sizes=kernels,
        strides=strides,
        num_classes=4,
        n_conv_per_stage_decoder=[2, 1],
        conv_bias=True,
        norm_op=torch.nn.InstanceNorm3d if dims == 3 else torch.nn.InstanceNorm2d,
        norm_op_kwargs={"eps": 1e-5, "affine": True},
        nonlin=torch.nn.LeakyReLU,
        nonlin_kwargs={"inplace": True},
        deep_supervision=True,
    )
    ours_config = dict(
        spatial_dims=dims,
        in_channels=2,
        num_classes=4,
        features_per_stage=(8, 16, 32),
        kernel_sizes=tuple(map(tuple, kernels)),
        strides=tuple(map(tuple, strides)),
        n_conv_per_stage_decoder=(2, 1),
    )
    if residual:
        theirs = ResidualEncoderUNet(n_blocks_per_stage=[1, 2, 2], **common)
        ours = NnUNetResEncUNet(NnUNetResEncConfig(n_blocks_per_stage=(1, 2, 2), **ours_config))
    else:
        theirs = PlainConvUNet(n_conv_per_stage=[2, 2, 1], **common)
        ours = NnUNetPlainUNet(NnUNetPlainConfig(n_conv_per_stage=(2, 2, 1), **ours_config))
    for parameter in theirs.parameters():
        parameter.data.normal_(0, 0.3)
    state = theirs.state_dict()
    assert any(".all_modules." in k for k in state) and any(k.startswith("decoder.encoder.") for k in state)
    ours.load_state_dict(canonical_state_dict(state, ours), strict=True)
    x = torch.randn(2, 2, *((8, 16, 16) if dims == 3 else (16, 16)))
    with torch.no_grad():
        theirs_out = theirs.train()(x)  # deep supervision: every head, full resolution first
        ours_out = ours.train()(x)
        torch.testing.assert_close(ours.eval()(x), theirs_out[0], rtol=0, atol=0)
    assert [o.shape for o in ours_out] == [o.shape for o in theirs_out]
    for a, b in zip(ours_out, theirs_out, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # an alias that differs from its canonical tensor is refused
    alias = next(k for k in state if ".all_modules.0.weight" in k)
    with pytest.raises(Exception, match="aliases that differ"):
        canonical_state_dict({**state, alias: state[alias] + 1}, ours)


def test_an_imported_model_can_be_fine_tuned_with_deep_supervision(imported, store):
    card = imported["3d"]
    net = build_net(card.architecture.name, card.architecture.config).train()
    x = torch.randn(2, 1, *card.inference.patch_size_zyx)
    y = torch.randint(0, 3, (2, *card.inference.patch_size_zyx))
    outputs = net(x)
    assert isinstance(outputs, list) and outputs[0].shape[2:] == x.shape[2:] and outputs[1].shape[2:] == (8, 8, 16)
    loss = DeepSupervisionLoss(build_loss("dice_ce"))(outputs, y)
    loss.backward()
    assert net.encoder.stages[0][0].convs[0].conv.weight.grad is not None


def test_the_reorientation_is_nibabels_closest_canonical(tmp_path):
    # TotalSegmentator's reorientation is nib.as_closest_canonical: compared on directions of every axis order and
    # sign, tilted up to 30 degrees about two axes, through files as DeepSeg reads them
    import nibabel as nib

    rng = np.random.default_rng(3)
    array = rng.integers(0, 1000, size=(5, 6, 7)).astype(np.int16)
    for case in range(12):
        permutation = np.eye(3)[:, rng.permutation(3)] @ np.diag(rng.choice([-1.0, 1.0], 3))
        tilt = rotation(int(rng.integers(3)), rng.uniform(-30, 30)) @ rotation(int(rng.integers(3)), rng.uniform(-30, 30))
        path = io.write_image(
            io.Volume(array, (0.8, 1.3, 2.9), (5.0, -3.0, 12.0), tilt @ permutation), tmp_path / f"{case}.nii.gz"
        )
        volume = io.read_image(path)
        reorder = reorientation(volume, "ras")
        canonical = nib.as_closest_canonical(nib.load(str(path)))
        ours = reorder.apply(volume.array_zyx)
        np.testing.assert_array_equal(ours, np.asarray(canonical.dataobj).transpose(2, 1, 0))
        assert reoriented_spacing_zyx(volume, reorder) == pytest.approx(canonical.header.get_zooms()[::-1], abs=1e-6)
        assert input_shape(reorder, ours.shape) == volume.shape_zyx
        np.testing.assert_array_equal(reorder.undo(ours), volume.array_zyx)
    assert reorientation(volume, "none").identity
    with pytest.raises(ConfigError, match="Expected none or ras"):
        reorientation(volume, "lps")


def test_tiles_and_gaussian_are_nnunets():
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian, compute_steps_for_sliding_window

    for size, patch in [((110, 64, 200), (64, 64, 128)), ((17, 33, 160), (16, 32, 32)), ((200, 91, 91), (128, 80, 80))]:
        expected = compute_steps_for_sliding_window(size, patch, 0.5)
        assert [nnunet_tile_starts(s, p, 0.5) for s, p in zip(size, patch, strict=True)] == expected
    for patch in [(16, 16, 32), (128, 128, 128), (17, 24, 33), (40, 56), (1, 1, 7)]:
        expected = compute_gaussian(patch, 1 / 8, 10, device=torch.device("cpu")).float()
        ours = nnunet_gaussian(patch if len(patch) == 3 else (1, *patch), 1 / 8)
        torch.testing.assert_close(ours.reshape(expected.shape), expected, rtol=0, atol=0)
    assert nnunet_tile_starts(5, 1, 0.5) == [0, 1, 2, 3, 4]  # 2D networks visit every slice


def crop_cases() -> list[np.ndarray]:
    """Two-channel images whose non-zero masks have enclosed holes, holes open to the border, a zero
    frame, no zeros at all, and nothing but zeros."""
    rng = np.random.default_rng(5)
    framed = np.zeros((2, 12, 14, 16), dtype=np.float32)
    framed[0, 2:10, 3:12, 1:15] = rng.normal(size=(8, 9, 14))
    framed[0, 5:7, 6:8, 4:9] = 0  # an enclosed hole
    framed[1, 2:4, 3:5, 1:3] = 0
    open_hole = rng.normal(size=(1, 10, 10, 10)).astype(np.float32)
    open_hole[0, :, 4:6, 4:6] = 0  # a tunnel through the whole volume: not a hole
    open_hole[0, 3:5, 1:3, 1:3] = 0
    speckled = np.where(rng.random((1, 9, 11, 13)) < 0.3, 0, 1).astype(np.float32)
    return [framed, open_hole, speckled, np.full((1, 5, 6, 7), -1000.0, np.float32), np.zeros((1, 4, 5, 6), np.float32)]


@pytest.mark.parametrize("case", range(len(crop_cases())))
def test_the_crop_is_nnunets_with_or_without_filling_the_mask(case):
    from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero

    data = crop_cases()[case]
    _, seg, bbox = crop_to_nonzero(data.copy())
    for fill_holes in (True, False):
        mask, ours = nonzero_bbox(data, fill_holes=fill_holes)
        assert [list(b) for b in ours] == [list(b) for b in bbox]
        box = tuple(slice(a, b) for a, b in ours)
        if fill_holes:
            np.testing.assert_array_equal(mask[box], seg[0] == 0)
        else:
            np.testing.assert_array_equal(mask, (data != 0).any(axis=0))


@pytest.mark.parametrize(
    "shape, new_shape, spacing, new_spacing",
    [
        ((6, 20, 18), (15, 12, 14), (4.0, 0.8, 0.9), (1.6, 1.3, 1.2)),  # separate axis 0 (current spacing)
        ((12, 7, 18), (10, 17, 15), (1.0, 4.0, 1.1), (1.2, 1.6, 1.3)),  # separate axis 1
        ((12, 14, 10), (9, 18, 13), (1.0, 1.2, 1.1), (1.3, 0.9, 0.85)),  # plain 3D
        ((12, 14, 10), (12, 18, 13), (2.0, 1.0, 1.0), (2.0, 0.8, 0.75)),  # 2D configuration: z unchanged
    ],
)
@pytest.mark.parametrize("threads", [1, 3])
def test_resampling_is_nnunets(shape, new_shape, spacing, new_spacing, threads):
    from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape

    rng = np.random.default_rng(0)
    data = rng.normal(size=(2, *shape)).astype(np.float32)
    expected = resample_data_or_seg_to_shape(data, new_shape, spacing, new_spacing, False, 3, 0, None)
    ours = resample_image(data, new_shape, spacing, new_spacing, order=3, order_z=0, threads=threads)
    np.testing.assert_array_equal(ours, expected)
    labels = (rng.random(shape) * 3).astype(np.int16) - 1  # -1 marks "outside the non-zero mask" in nnU-Net
    expected = resample_data_or_seg_to_shape(labels[None], new_shape, spacing, new_spacing, True, 1, 0, None)[0]
    ours = resample_labels(labels, new_shape, spacing, new_spacing, order=1, order_z=0, threads=threads)
    np.testing.assert_array_equal(ours, expected)


#: (network shape, cropped input shape, network spacing, input spacing, how each axis maps back)
EXPORT_GEOMETRIES = [
    ((9, 20, 18), (30, 25, 16), (3.5, 1.0, 1.0), (0.9, 0.8, 1.1), ("nearest", "linear", "linear")),  # separate axis 0
    ((14, 12, 16), (10, 21, 16), (1.2, 1.5, 1.0), (1.7, 0.85, 1.0), ("linear", "linear", "identity")),  # plain 3D
    ((11, 12, 16), (11, 30, 16), (1.2, 3.6, 1.0), (1.2, 1.0, 1.0), ("identity", "nearest", "identity")),  # separate axis 1
    ((10, 12, 16), (10, 12, 16), (1.5, 1.5, 1.5), (1.5, 1.5, 1.5), ("identity", "identity", "identity")),  # at the plans' spacing
]


def streamed_export(
    logits,
    crop_shape,
    network_spacing,
    spacing,
    values,
    tf,
    *,
    reorder=None,
    probabilities=False,
    depths=(3, 1, 4, 2),
    regions=False,
):
    """``NnUNetExportCollector`` fed ``logits`` ``(K, *network_shape)`` in slabs of ``depths`` slices (repeated), the
    crop box at (2, 1, 0) inside a grid 5 and 2 slices larger along the first two axes.

    Returns the collector, its output, the crop box and the shape before cropping."""
    network_shape = tuple(logits.shape[1:])
    box = [[2, 2 + crop_shape[0]], [1, 1 + crop_shape[1]], [0, crop_shape[2]]]
    before = (crop_shape[0] + 5, crop_shape[1] + 2, crop_shape[2])
    context = {
        "shape_before_crop": before,
        "bbox": box,
        "shape_after_crop": crop_shape,
        "network_shape": network_shape,
        "spacing_transposed": list(spacing),
        "network_spacing": list(network_spacing),
        "reorder": reorder or AxisReorder(),
    }
    resampling = {"order": 1, "order_z": 0, "force_separate_z": None}
    collector = NnUNetExportCollector(
        context, values, list(tf), resampling, regions=regions, keep_probabilities=probabilities, uncertainty=probabilities
    )
    z = 0
    while z < network_shape[0]:
        for depth in depths:
            stop = min(z + depth, network_shape[0])
            if stop > z:
                collector.add(z, stop, logits[:, z:stop].astype(np.float32))
            z = stop
    return collector, collector.finish(), box, before


@pytest.mark.parametrize("network_shape, crop_shape, network_spacing, spacing, modes", EXPORT_GEOMETRIES)
@pytest.mark.parametrize("probabilities", [False, True])
def test_the_export_streamed_by_slabs_equals_nnunets_whole_volume_export(
    network_shape, crop_shape, network_spacing, spacing, modes, probabilities
):
    from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape

    rng = np.random.default_rng(1)
    logits = (rng.normal(size=(4, *network_shape)) * 3).astype(np.float16)
    tf = [1, 2, 0]
    collector, out, box, before = streamed_export(
        logits, crop_shape, network_spacing, spacing, [0, 1, 2, 3], tf, probabilities=probabilities
    )
    assert [m.mode for m in collector.maps] == list(modes)
    assert collector.max_buffered_slices <= 4 + 2 + 4
    # nnU-Net's way: the whole volume's float16 logits resampled at once, argmax, crop reverted, transposed back
    whole = resample_data_or_seg_to_shape(logits, crop_shape, network_spacing, spacing, False, 1, 0, None)
    expected = np.zeros(before, np.uint8)
    expected[tuple(slice(a, b) for a, b in box)] = np.argmax(whole, axis=0)
    expected = expected.transpose([tf.index(a) for a in range(3)])
    # float16 rounding of two interpolations that sum in another order: a voxel may flip at an exact tie
    assert (out.labels_zyx != expected).mean() < 0.002
    if probabilities:
        softmax = torch.softmax(torch.from_numpy(whole).float(), 0).numpy()
        full = np.zeros((4, *before), np.float32)
        full[0] = 1
        full[(slice(None), *[slice(a, b) for a, b in box])] = softmax
        full = full.transpose([0, *[tf.index(a) + 1 for a in range(3)]])
        np.testing.assert_allclose(out.probabilities.astype(np.float32), full, atol=2e-3)
        assert out.entropy_zyx.shape == out.labels_zyx.shape and float(out.entropy_zyx.max()) <= 1.0


#: BraTS' regions as nnU-Net's documentation writes them (the key order is the regions' order)
BRATS_REGIONS = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": 3}


@pytest.mark.parametrize("network_shape, crop_shape, network_spacing, spacing, modes", EXPORT_GEOMETRIES)
def test_the_region_export_streamed_by_slabs_equals_nnunets_label_manager(
    network_shape, crop_shape, network_spacing, spacing, modes
):
    from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    manager = LabelManager(BRATS_REGIONS, regions_class_order=[1, 2, 3])
    rng = np.random.default_rng(2)
    logits = (rng.normal(size=(3, *network_shape)) * 3).astype(np.float16)
    tf = [1, 2, 0]
    collector, out, box, before = streamed_export(
        logits, crop_shape, network_spacing, spacing, [1, 2, 3], tf, probabilities=True, regions=True
    )
    assert [m.mode for m in collector.maps] == list(modes)
    # nnU-Net's export: the whole volume's logits resampled, sigmoid, regions written in order, crop reverted
    whole = resample_data_or_seg_to_shape(logits, crop_shape, network_spacing, spacing, False, 1, 0, None)
    sigmoids = manager.apply_inference_nonlin(whole)
    cropped = manager.convert_probabilities_to_segmentation(sigmoids)
    expected = np.zeros(before, np.uint8)
    expected[tuple(slice(a, b) for a, b in box)] = np.asarray(cropped)
    expected = expected.transpose([tf.index(a) for a in range(3)])
    assert set(np.unique(expected)) == {0, 1, 2, 3}  # every region wins somewhere, and so does nothing
    assert (out.labels_zyx != expected).mean() < 0.002
    full = manager.revert_cropping_on_probabilities(sigmoids, box, before).numpy()
    full = full.transpose([0, *[tf.index(a) + 1 for a in range(3)]])
    np.testing.assert_allclose(out.probabilities.astype(np.float32), full, atol=2e-3)
    outside = np.ones(before, bool)
    outside[tuple(slice(a, b) for a, b in box)] = False
    outside = outside.transpose([tf.index(a) for a in range(3)])
    assert float(np.abs(out.probabilities[:, outside]).max()) == 0.0  # no background channel to set to 1
    # uncertainty: the least certain region's binary entropy, in bits
    p = np.clip(full.astype(np.float64), 1e-8, 1 - 1e-7)
    bits = (-(p * np.log2(p) + (1 - p) * np.log2(1 - p))).max(axis=0)
    np.testing.assert_allclose(out.entropy_zyx, bits, atol=1e-2)
    assert float(out.entropy_zyx.max()) > 0.99


def the_export_arithmetic_on_the_whole_volume(logits, values, crop_shape, modes, box, before, tf, reorder, regions=False):
    """The labels DeepSeg's export must give, computed on the whole volume in numpy with nothing streamed or
    threaded: float16 logits to float32, the first axis linear or nearest, nearest axes, bilinear in-plane
    (torch, slices as the batch and classes as channels, as the collector states), float16 rounding,
    numpy's argmax (``regions``: torch's float32 sigmoid, each channel writing its value where above 0.5,
    in order), the crop reverted, written back through the reorientation and transpose with numpy."""
    block = logits.astype(np.float32)
    if modes[0] == "linear":
        i0, i1, t = linear_positions(logits.shape[1], crop_shape[0])
        t = t.astype(np.float32).reshape(1, -1, 1, 1)
        block = (1.0 - t) * np.take(block, i0, axis=1) + t * np.take(block, i1, axis=1)
    elif modes[0] == "nearest":
        block = np.take(block, nearest_positions(logits.shape[1], crop_shape[0]), axis=1)
    for axis in (2, 3):
        if modes[axis - 1] == "nearest":
            block = np.take(block, nearest_positions(block.shape[axis], crop_shape[axis - 1]), axis=axis)
    planes = torch.from_numpy(np.ascontiguousarray(block.transpose(1, 0, 2, 3)))
    if tuple(planes.shape[2:]) != tuple(crop_shape[1:]):
        planes = torch.nn.functional.interpolate(planes, size=tuple(crop_shape[1:]), mode="bilinear", align_corners=False)
    rounded = planes.to(torch.float16).numpy().astype(np.float32)
    dtype = np.uint8 if max(values) < 255 else np.uint16
    labels_t = np.zeros(before, dtype=dtype)
    if regions:
        sigmoids = torch.sigmoid(torch.from_numpy(rounded)).numpy()
        written = np.zeros((rounded.shape[0], *rounded.shape[2:]), dtype=dtype)
        for channel, value in enumerate(values):
            written[sigmoids[:, channel] > 0.5] = value
        labels_t[tuple(slice(a, b) for a, b in box)] = written
    else:
        labels_t[tuple(slice(a, b) for a, b in box)] = np.asarray(values)[np.argmax(rounded, axis=1)]
    oriented = [0, 0, 0]
    for i, a in enumerate(tf):
        oriented[a] = before[i]
    labels = np.zeros(input_shape(reorder, oriented), dtype=dtype)
    reorder.apply(labels).transpose(tf)[...] = labels_t
    return labels


@pytest.mark.parametrize("network_shape, crop_shape, network_spacing, spacing, modes", EXPORT_GEOMETRIES)
@pytest.mark.parametrize(
    "classes, values",
    [(3, None), (4, (0, 3, 7, 300)), (70, None)],
    ids=["3-identity", "4-values-uint16", "70-argmax-over-last-axis"],
)
@pytest.mark.parametrize(
    "tf, reorder",
    [((0, 1, 2), None), ((2, 0, 1), None), ((1, 2, 0), ((1, 0, 2), (True, False, True)))],
    ids=["plain", "transposed", "transposed-and-flipped"],
)
def test_the_export_equals_its_arithmetic_on_the_whole_volume_exactly(
    network_shape, crop_shape, network_spacing, spacing, modes, classes, values, tf, reorder
):
    # exact, not within a tolerance: the streamed export (torch, threads, slabs of any depth, the running
    # argmax, writes through transposed and flipped views) must give numpy's whole-volume labels, ties
    # included. Thirds on a coarse grid: interpolated values often land on float16 midpoints, and many
    # voxels are ties.
    rng = np.random.default_rng(classes)
    logits = (rng.integers(-40, 40, size=(classes, *network_shape)) / 3).astype(np.float16)
    logits[:, ::3] = (rng.integers(-4, 5, size=(classes, *network_shape))[:, ::3] * 0.75).astype(np.float16)
    values = list(values or range(classes))
    axis_reorder = AxisReorder(*reorder) if reorder else AxisReorder()
    collector, out, box, before = streamed_export(logits, crop_shape, network_spacing, spacing, values, tf, reorder=axis_reorder)
    assert [m.mode for m in collector.maps] == list(modes)
    expected = the_export_arithmetic_on_the_whole_volume(logits, values, crop_shape, modes, box, before, tf, axis_reorder)
    assert out.labels_zyx.dtype == expected.dtype
    np.testing.assert_array_equal(out.labels_zyx, expected)
    assert len(np.unique(out.labels_zyx)) == len(set(values))  # every class won somewhere: the check has teeth


#: output planes large enough (height + width > 128) for the export to interpolate, per output slice, only
#: the classes that can win there
CANDIDATE_GEOMETRIES = [
    ((10, 30, 40), (15, 70, 90), (1.5, 1.5, 1.5), (1.0, 0.64, 0.67), ("linear", "linear", "linear")),
    ((4, 24, 40), (10, 60, 90), (3.5, 1.0, 1.0), (1.4, 0.4, 0.44), ("nearest", "linear", "linear")),  # separate axis 0
    ((5, 12, 40), (5, 30, 100), (1.2, 3.6, 1.0), (1.2, 1.44, 0.4), ("identity", "nearest", "linear")),  # separate axis 1
]


def few_classes_per_slice(classes, network_shape, seed):
    """float16 logits ``(classes, *network_shape)`` in which each network slice holds the background and 3
    other classes (blocks of 3 x 3 voxels; one slice a single class): 8 where a class is, -4 where it is
    present in the slice but not there, -20 where absent, plus thirds (float16 midpoints and ties). A last
    class is never the largest at any network voxel yet wins between two others: in the first rows of
    every slice two of its classes alternate at 10 and 0 along x, and the last class sits at 6 and beats
    their 5 halfway. Returns the logits and that class."""
    rng = np.random.default_rng(seed)
    hidden = classes - 1
    z_count, y_count, x_count = network_shape
    logits = np.full((classes, *network_shape), -20.0)
    for z in range(z_count):
        present = [0, *((3 * z + j) % (classes - 2) + 1 for j in range(3))]
        blocks = rng.choice(present, size=(-(-y_count // 3), -(-x_count // 3)))
        if z == z_count // 2:
            present, blocks = [1], np.ones_like(blocks)  # one class alone: the candidates are filled up to 4
        labels = np.repeat(np.repeat(blocks, 3, axis=0), 3, axis=1)[:y_count, :x_count]
        logits[present, z] = -4.0
        np.put_along_axis(logits[:, z], labels[None], 8.0, axis=0)
    logits += rng.integers(-9, 10, size=logits.shape) / 3
    strip = (slice(None), slice(0, y_count // 2))
    alternating = np.arange(x_count) % 2 == 0
    for z in range(z_count):
        if z == z_count // 2:
            continue
        a, b = (3 * z) % (classes - 2) + 1, (3 * z + 1) % (classes - 2) + 1
        present = logits[:, z][strip] > -15
        logits[:, z][strip] = np.where(present, -4.0, -20.0)
        logits[a, z, : y_count // 2] = np.where(alternating, 10.0, 0.0)
        logits[b, z, : y_count // 2] = np.where(alternating, 0.0, 10.0)
        logits[hidden, z, : y_count // 2] = 6.0
        logits[:, z][strip] += rng.integers(-1, 2, size=logits[:, z][strip].shape) / 3
    return logits.astype(np.float16), hidden


@pytest.mark.parametrize("network_shape, crop_shape, network_spacing, spacing, modes", CANDIDATE_GEOMETRIES)
@pytest.mark.parametrize("classes, values", [(16, None), (24, tuple(range(0, 480, 20)))], ids=["16", "24-uint16"])
@pytest.mark.parametrize(
    "tf, reorder", [((0, 1, 2), None), ((1, 2, 0), ((1, 0, 2), (True, False, True)))], ids=["plain", "flipped"]
)
@pytest.mark.parametrize("one_row_chunks", [False, True], ids=["chunks", "one-row-chunks"])
def test_the_export_of_the_classes_that_can_win_each_slice_equals_its_arithmetic_on_the_whole_volume(
    network_shape, crop_shape, network_spacing, spacing, modes, classes, values, tf, reorder, one_row_chunks, monkeypatch
):
    # With labels only and many classes, each output slice interpolates only the classes that can win it
    # (candidate_channels); the labels must be exactly those of every class interpolated, ties, a class
    # that wins without being on top at any network voxel, a NaN and an infinity included.
    assert classes >= CANDIDATE_MIN_CLASSES
    logits, hidden = few_classes_per_slice(classes, network_shape, classes + len(modes[0]))
    assert not (logits.argmax(axis=0) == hidden).any()
    logits[2, 1, 3, 4] = np.nan  # the slices around it fall back to every class (NaN wins, as in numpy)
    logits[3, -1, -2, -3] = np.inf
    values = list(values or range(classes))
    axis_reorder = AxisReorder(*reorder) if reorder else AxisReorder()
    # torch's generic bilinear kernel, the one that computes each channel on its own, needs 4 channels: the
    # slice with a single class is given 3 more (with 3 channels and one thread torch takes another kernel)
    channels_given = []
    interpolate = torch.nn.functional.interpolate
    monkeypatch.setattr(
        torch.nn.functional,
        "interpolate",
        lambda planes, **kw: channels_given.append(planes.shape[1]) or interpolate(planes, **kw),
    )
    searched = []
    monkeypatch.setattr(export, "candidate_channels", lambda window: searched.append(1) or candidate_channels(window))
    if one_row_chunks:  # as for 118 classes on 512 x 512: rows between the same two slices fall in two chunks
        monkeypatch.setattr(export, "EXPORT_CHUNK_BYTES", 1)
    collector, out, box, before = streamed_export(logits, crop_shape, network_spacing, spacing, values, tf, reorder=axis_reorder)
    monkeypatch.undo()
    first = collector.maps[0]
    windows = {(first.i0[row], first.i1[row] if first.mode == "linear" else first.i0[row]) for row in range(crop_shape[0])}
    assert len(searched) == len(windows)  # once per network slice or pair, however the rows fall into chunks
    assert min(channels_given) >= GENERIC_BILINEAR_MIN_CHANNELS
    if modes[0] != "linear":  # between two slices, the one with a single class takes every class
        assert GENERIC_BILINEAR_MIN_CHANNELS in channels_given
    assert [m.mode for m in collector.maps] == list(modes)
    expected = the_export_arithmetic_on_the_whole_volume(logits, values, crop_shape, modes, box, before, tf, axis_reorder)
    np.testing.assert_array_equal(out.labels_zyx, expected)
    # the check has teeth: the hidden class won somewhere, fewer classes were interpolated, and some slices
    # (next to the NaN and the infinity, and, between two slices, next to the one with a single class) took
    # every class
    assert (out.labels_zyx == values[hidden]).any()
    assert 0 < collector.pruned_slices < crop_shape[0]
    assert collector.interpolated_channel_slices < classes * crop_shape[0]


def test_candidate_channels_keeps_every_class_that_can_win_a_cell_and_no_class_that_cannot():
    # two network slices of one 2 x 2 cell. Class 1 leads at the first corner and class 2 at the others;
    # class 3 is never first at a corner, yet wins halfway along the first row (5.5 against 5 and 5). The
    # winner's floor is the largest minimum (class 3's 5.5) and the margin (M + 1) / 128 with M = 20: class
    # 4 sits exactly on the threshold and stays, class 5's maximum is one float16 step below it, class 0 far.
    window = torch.full((6, 2, 2, 2), -20.0)
    window[0] = -1.0
    window[1] = torch.tensor([[9.0, 1.0], [1.0, 1.0]])
    window[2] = torch.tensor([[1.0, 9.0], [9.0, 9.0]])
    window[3] = 5.5
    threshold = 5.5 - 21 / 128
    window[4] = threshold
    window[5, :, 0, 0] = threshold - 2**-8
    assert float(torch.tensor(threshold).half()) == threshold  # on the float16 grid: the test is exact
    assert candidate_channels(window.half()).tolist() == [1, 2, 3, 4]
    # one slice of one row is a cell too; a single voxel is its own cell (only its largest class can win)
    assert candidate_channels(window[:, :1, :1].half()).tolist() == [1, 2, 3, 4]
    assert candidate_channels(window[:, :1, :1, :1].half()).tolist() == [1]
    for bad in (float("nan"), float("inf"), -float("inf")):
        spoiled = window.clone()
        spoiled[0, 0, 0, 0] = bad
        assert candidate_channels(spoiled.half()) is None


def test_torchs_bilinear_kernel_gives_each_channel_the_values_it_has_among_all_channels():
    # The export's labels are defined by torch's bilinear kernel with every class as a channel; interpolating
    # only some of them must give each the same float32 values, bit for bit. True of torch's generic kernel,
    # which it takes for NCHW input of at least 4 channels and output height + width above 128, at any
    # thread count and batch (see GENERIC_BILINEAR_MIN_CHANNELS).
    generator = torch.Generator().manual_seed(3)
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for source, size in (((273, 273), (512, 512)), ((24, 40), (60, 90)), ((12, 40), (30, 100)), ((1, 40), (1, 200))):
                for channels in (4, 17, 118):
                    planes = (torch.randint(-400, 400, (3, channels, *source), generator=generator) / 37).half().float()
                    every = torch.nn.functional.interpolate(planes, size=size, mode="bilinear", align_corners=False)
                    for subset in ([0, 1, 2, 3], sorted(torch.randperm(channels, generator=generator)[:4].tolist())):
                        some = torch.nn.functional.interpolate(
                            planes[:1, subset], size=size, mode="bilinear", align_corners=False
                        )
                        assert torch.equal(some[0], every[0, subset]), (threads, source, size, channels, subset)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("network_shape, crop_shape, network_spacing, spacing, modes", EXPORT_GEOMETRIES)
@pytest.mark.parametrize("values", [(1, 2, 3), (1, 3, 2), (2, 1)], ids=["brats", "kits-order", "two"])
@pytest.mark.parametrize(
    "tf, reorder", [((2, 0, 1), None), ((1, 2, 0), ((1, 0, 2), (True, False, True)))], ids=["transposed", "flipped"]
)
def test_the_region_export_equals_its_arithmetic_on_the_whole_volume_exactly(
    network_shape, crop_shape, network_spacing, spacing, modes, values, tf, reorder
):
    # regions overwrite one another in order; logits in thirds and quarters put many sigmoids at exactly 0.5
    # (a logit of 0), where "above 0.5" must not write
    rng = np.random.default_rng(len(values) + sum(values))
    logits = (rng.integers(-6, 7, size=(len(values), *network_shape)) / 3).astype(np.float16)
    logits[:, ::3] = (rng.integers(-2, 3, size=(len(values), *network_shape))[:, ::3] * 0.25).astype(np.float16)
    axis_reorder = AxisReorder(*reorder) if reorder else AxisReorder()
    collector, out, box, before = streamed_export(
        logits, crop_shape, network_spacing, spacing, list(values), tf, reorder=axis_reorder, regions=True
    )
    expected = the_export_arithmetic_on_the_whole_volume(
        logits, list(values), crop_shape, modes, box, before, tf, axis_reorder, regions=True
    )
    np.testing.assert_array_equal(out.labels_zyx, expected)
    assert set(np.unique(out.labels_zyx)) == {0, *values}  # every region is last somewhere: the order matters


def test_the_export_labels_do_not_depend_on_how_torch_picks_its_bilinear_kernel():
    # torch's bilinear kernel (and its float32 rounding) depends on the channel count: with the 14 slices
    # of this volume (one slab) as channels instead of the 3 classes, 3 interpolated values round to
    # another float16 and one voxel's near-tie goes the other way. The export keeps classes as channels.
    network_shape, crop_shape, spacing = (14, 12, 16), (14, 21, 40), (1.0, 12 / 21, 0.4)
    logits = (np.random.default_rng(14).integers(-40, 40, size=(3, *network_shape)) / 3).astype(np.float16)
    collector, out, box, before = streamed_export(
        logits, crop_shape, (1.0, 1.0, 1.0), spacing, [0, 1, 2], (0, 1, 2), depths=(network_shape[0],)
    )
    modes = ("identity", "linear", "linear")
    assert [m.mode for m in collector.maps] == list(modes)
    identity = AxisReorder()
    expected = the_export_arithmetic_on_the_whole_volume(logits, [0, 1, 2], crop_shape, modes, box, before, (0, 1, 2), identity)
    np.testing.assert_array_equal(out.labels_zyx, expected)


# ------------------------------------------------------------------------------------------------
# parity with nnU-Net's own predictor


@pytest.mark.parametrize("model, image, mirroring", CASES, ids=[f"{m}-{i}-{'tta' if t else 'plain'}" for m, i, t in CASES])
def test_labels_match_nnunets_own_predictor(model, image, mirroring, segmenters, images, references, record_property):
    reference = references[(model, image, mirroring)]["labels"]
    volume = io.read_image(images[image])
    result = segmenters[model].segment([volume], options(tta=mirroring))
    assert result.labels.same_grid(volume)
    if model == "lowres":
        differ = int((result.labels.array_zyx != reference).sum())
        record_property("realdata", f"nnU-Net 3d_lowres parity, {image}: {differ} of {reference.size} voxels differ")
    assert_parity(result.labels.array_zyx, reference)


def test_compare_reads_nnunets_own_label_map_named_by_the_model_folders_dataset_json(
    segmenters, images, references, tiny_folders, tmp_path
):
    # what nnU-Net's predictor wrote (a NIfTI label map) against DeepSeg's .seg.nrrd of the same image
    reference = references[("3d", "phantom", False)]
    result = segmenters["3d"].segment([io.read_image(images["phantom"])], options())
    ours = write_segmentation_result(tmp_path / "ours.seg.nrrd", result)
    dataset_json = tiny_folders["3d"] / "dataset.json"
    scores = compare_files(ours, reference["path"], labels_json=dataset_json)
    names = {name: value for name, value in json.loads(dataset_json.read_text())["labels"].items() if value != 0}
    assert sorted(scores) == sorted(names) == ["liver", "liver lesion"]
    for name, value in names.items():
        assert scores[name]["dice"] == pytest.approx(dice(result.labels.array_zyx, reference["labels"], value))
    assert scores["liver"]["dice"] >= MIN_DICE


def test_compare_scores_as_nnunets_own_evaluation_with_the_ignore_label(tmp_path):
    # nnU-Net's evaluate_predictions.compute_metrics on the same two label maps: Dice, IoU and the voxel
    # counts per label, with the voxels under the ignore label left out by both
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    phantom = phantoms.generate_phantom(seed=21, shape_zyx=(16, 48, 40), n_lesions=3, lesion_radius_mm=(4.0, 7.0))
    reference = phantom.labels.array_zyx.copy()
    reference[:, :, :6] = 3  # an unannotated strip (nnU-Net's sparse labels)
    predicted = phantom.labels.array_zyx.copy()
    lesion_slice = np.flatnonzero((predicted == 2).any(axis=(1, 2)))[0]
    predicted[lesion_slice][predicted[lesion_slice] == 2] = 1  # a lesion slice called liver
    liver_rows = np.flatnonzero((predicted == 1).any(axis=(0, 2)))
    edge = predicted[:, liver_rows[0] : liver_rows[0] + 3]
    edge[edge == 1] = 0  # and the liver's edge missed
    predicted[:, 10:30, :6] = 1  # liver where nobody annotated: no error where the reference says ignore
    root = tmp_path / "ds"
    (root / "labelsTr").mkdir(parents=True)
    table = {"background": 0, "liver": 1, "liver lesion": 2, "ignore": 3}
    (root / "dataset.json").write_text(json.dumps({"labels": table}))
    ref_path = io.write_image(phantom.labels.with_array(reference), root / "labelsTr" / "case.nii.gz")
    pred_path = io.write_image(phantom.labels.with_array(predicted), tmp_path / "case.nii.gz")
    ours = compare_files(pred_path, ref_path)
    theirs = compute_metrics(str(ref_path), str(pred_path), SimpleITKIO(), [1, 2], ignore_label=3)["metrics"]
    for name, value in (("liver", 1), ("liver lesion", 2)):
        assert 0.0 < theirs[value]["Dice"] < 1.0
        assert ours[name]["dice"] == pytest.approx(theirs[value]["Dice"], abs=1e-12)
        assert ours[name]["iou"] == pytest.approx(theirs[value]["IoU"], abs=1e-12)
        voxel_ml = phantom.labels.voxel_volume_ml
        assert ours[name]["ref_ml"] == pytest.approx(theirs[value]["n_ref"] * voxel_ml)
        assert ours[name]["pred_ml"] == pytest.approx(theirs[value]["n_pred"] * voxel_ml)


BRATS_LIKE_LABELS = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3], "ignore": 4}


def brats_like_case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A reference label map (1 oedema, 3 enhancing rim, 2 necrotic core, 4 unannotated strip) and a
    prediction with scattered errors, each voxel a random label (also under the strip)."""
    rng = np.random.default_rng(seed)
    reference = np.zeros((14, 40, 36), np.uint8)
    shift = int(rng.integers(0, 3))
    reference[1:13, 5 + shift : 35, 4:32] = 1
    reference[3:11, 10:30, 9 + shift : 27] = 3
    reference[5:9, 15:25, 13:23] = 2
    reference[:, :, :3] = 4
    predicted = reference.copy()
    predicted[predicted == 4] = rng.integers(0, 4, size=int(np.count_nonzero(predicted == 4)))
    flips = rng.random(reference.shape) < 0.08
    predicted[flips] = rng.integers(0, 4, size=int(np.count_nonzero(flips)))
    return reference, predicted


def brats_like_regions() -> list:
    """nnU-Net's own regions of :data:`BRATS_LIKE_LABELS` (its ``LabelManager``)."""
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    manager = LabelManager(BRATS_LIKE_LABELS, regions_class_order=[1, 2, 3])
    regions = manager.foreground_regions
    assert manager.has_regions and [tuple(r) if isinstance(r, (list, tuple)) else (r,) for r in regions] == [
        (1, 2, 3),
        (2, 3),
        (3,),
    ]
    return regions


def write_brats_like_dataset(root: Path) -> None:
    (root / "labelsTr").mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps({"labels": BRATS_LIKE_LABELS, "regions_class_order": [1, 2, 3]}))


def test_compare_scores_nnunet_regions_as_nnunets_own_evaluation(tmp_path):
    # a region-based dataset.json (BraTS's nested tumour regions) with an ignore label: the regions come
    # from nnU-Net's LabelManager, the scores from its compute_metrics, on the same two label maps
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    reference, predicted = brats_like_case(4)
    root = tmp_path / "ds"
    write_brats_like_dataset(root)
    grid = io.Volume(reference, spacing_xyz_mm=(0.9, 0.9, 1.5))
    ref_path = io.write_image(grid, root / "labelsTr" / "case.nii.gz")
    pred_path = io.write_image(grid.with_array(predicted), tmp_path / "case.nii.gz")
    regions = brats_like_regions()
    theirs = compute_metrics(str(ref_path), str(pred_path), SimpleITKIO(), regions, ignore_label=4)["metrics"]
    ours = compare_files(pred_path, ref_path)
    assert list(ours) == ["whole tumor", "tumor core", "enhancing tumor"]
    for name, region in zip(ours, regions, strict=True):
        assert 0.0 < theirs[region]["Dice"] < 1.0
        assert ours[name]["dice"] == pytest.approx(theirs[region]["Dice"], abs=1e-12)
        assert ours[name]["iou"] == pytest.approx(theirs[region]["IoU"], abs=1e-12)
        assert ours[name]["ref_ml"] == pytest.approx(theirs[region]["n_ref"] * grid.voxel_volume_ml)
        assert ours[name]["pred_ml"] == pytest.approx(theirs[region]["n_pred"] * grid.voxel_volume_ml)


def test_compare_on_folders_averages_as_nnunets_evaluate_folder(tmp_path):
    # nnU-Net's compute_metrics_on_folder (what nnUNetv2_evaluate_folder runs) over three cases with
    # regions and an ignore label: the same mean per region and the same foreground mean
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    root, predictions = tmp_path / "ds", tmp_path / "predictions"
    write_brats_like_dataset(root)
    predictions.mkdir()
    for seed in (5, 6, 7):
        reference, predicted = brats_like_case(seed)
        grid = io.Volume(reference, spacing_xyz_mm=(1.0, 1.0, 1.2))
        io.write_image(grid, root / "labelsTr" / f"case{seed}.nii.gz")
        io.write_image(grid.with_array(predicted), predictions / f"case{seed}.nii.gz")
    regions = brats_like_regions()
    theirs = compute_metrics_on_folder(
        str(root / "labelsTr"), str(predictions), None, SimpleITKIO(), ".nii.gz", regions, ignore_label=4, num_processes=1
    )
    ours = compare_folders(predictions, root / "labelsTr", workers=2)
    assert ours["cases_scored"] == len(theirs["metric_per_case"]) == 3
    for name, region in zip(ours["mean"], regions, strict=True):
        assert ours["mean"][name]["dice"] == pytest.approx(theirs["mean"][region]["Dice"], abs=1e-12)
        assert ours["mean"][name]["iou"] == pytest.approx(theirs["mean"][region]["IoU"], abs=1e-12)
    assert ours["foreground_mean"]["dice"] == pytest.approx(theirs["foreground_mean"]["Dice"], abs=1e-12)
    assert 0.5 < ours["foreground_mean"]["dice"] < 1.0


def test_reorient_ras_segments_as_nnunet_does_the_image_reoriented_to_closest_ras(store, tiny_folders, images, references):
    # TotalSegmentator's first step, on an LPS-stored (DICOM-like) oblique image: reorient to RAS, nnU-Net, back
    card = import_model(tiny_folders["3d"], store, name="tiny-3d-ras", reorient="ras")
    segmenter = Segmenter.load(card.ref, device="cpu", store=store)
    volume = io.read_image(images["oblique"])
    reorder = segmenter.pipeline.reorder_for(volume)
    assert (reorder.source_ijk, reorder.flip_ijk) == ((0, 1, 2), (True, True, False))  # L -> R, P -> A
    # the reference's reorientation (SimpleITK's DICOMOrient) moved the voxels as DeepSeg's (nibabel's rule) does
    np.testing.assert_array_equal(reorder.apply(volume.array_zyx), io.read_image(images["oblique_ras"]).array_zyx)
    # the network sees what nnU-Net's preprocessing makes of the reoriented image, bit for bit
    np.testing.assert_array_equal(segmenter.pipeline.prepare([volume]).image_czyx, references["ras"]["network_input"])
    result = segmenter.segment([volume], options())
    assert result.labels.same_grid(volume)
    back = references["ras"]["labels"]
    assert io.Volume.from_sitk(back).same_grid(volume)
    reference = sitk.GetArrayFromImage(back)
    assert_parity(result.labels.array_zyx, reference)
    # a way back that forgot the flips would fail: the labels are far from symmetric under them
    assert float((np.flip(reference, (1, 2)) != reference).mean()) > 10 * (1 - MIN_AGREEMENT)


@pytest.mark.parametrize("model, reorient", [("3d", "none"), ("3d", "ras"), ("2d", "none"), ("resenc", "none")])
@pytest.mark.parametrize("image", ["phantom", "oblique", "sagittal"])
@pytest.mark.parametrize("frame", ["zero", "air"])
def test_the_network_grid_is_known_before_preprocessing(model, reorient, image, frame, store, tiny_folders, images):
    # the domain check's field-of-view finding needs nnU-Net's network grid without preprocessing: cropped to the
    # non-zero voxels (the zero frames), reoriented, transposed, resampled
    card = import_model(tiny_folders[model], store, name=f"tiny-{model}-grid-{reorient}", reorient=reorient)
    pipeline = Segmenter.load(card.ref, device="cpu", store=store).pipeline
    volume = io.read_image(images["phantom" if image == "sagittal" else image])
    array = volume.array_zyx if frame == "zero" else np.where(volume.array_zyx == 0, -1000, volume.array_zyx).astype(np.int16)
    # sagittal: voxel axis i runs toward Superior, j toward Left, k toward Posterior (reorient="ras" permutes them)
    direction = np.array([[0.0, 1, 0], [0, 0, 1], [1, 0, 0]]) if image == "sagittal" else volume.direction_lps
    volume = io.Volume(array, volume.spacing_xyz_mm, volume.origin_lps, direction)
    grid = pipeline.network_grid([volume])
    prepared = pipeline.prepare([volume])
    cropped = prepared.context["shape_after_crop"] != prepared.context["shape_before_crop"]
    assert cropped == (frame == "zero")
    assert grid.shape_zyx == prepared.context["network_shape"] == prepared.image_czyx.shape[1:]
    assert list(grid.spacing_zyx_mm) == list(prepared.context["network_spacing"])
    if cropped:
        return
    # each network axis spans the extent of the image axis it names (to within a voxel; the extents differ by more)
    extent_mm = dict(zip("zyx", np.asarray(volume.shape_zyx) * np.asarray(volume.spacing_xyz_mm[::-1]), strict=True))
    assert sorted(grid.input_axes) == ["x", "y", "z"]
    for size, spacing, name in zip(grid.shape_zyx, grid.spacing_zyx_mm, grid.input_axes, strict=True):
        assert abs(size * spacing - extent_mm[name]) <= spacing, (grid, extent_mm)


def test_the_network_grid_of_the_head_ct_is_its_cropped_head(segmenters, images):
    # background 0 around the head: nnU-Net crops it away, and the grid the domain check uses is the cropped one
    volume = io.read_image(images["head_ct"])
    grid = segmenters["3d"].pipeline.network_grid([volume])
    prepared = segmenters["3d"].pipeline.prepare([volume])
    assert segmenters["3d"].pipeline.network_input_channels == prepared.image_czyx.shape[0]
    assert prepared.context["shape_after_crop"] != prepared.context["shape_before_crop"]
    assert grid.shape_zyx == prepared.context["network_shape"]


def test_imported_models_run_one_tile_at_a_time_unless_asked(segmenters):
    assert segmenters["3d"].card.inference.batch_size == 1
    assert segmenters["3d"].window_config(options()).batch_size == 1
    assert segmenters["3d"].window_config(options(batch_size=3)).batch_size == 3  # deepseg segment --batch-size 3


def test_probabilities_and_uncertainty_match_nnunets_softmax(segmenters, images, references):
    reference = references[("3d", "phantom", False)]["probabilities"]
    volume = io.read_image(images["phantom"])
    result = segmenters["3d"].segment([volume], options(keep_probabilities=True))
    assert result.probabilities.shape == reference.shape
    difference = np.abs(result.probabilities.astype(np.float32) - reference)
    assert float(difference.mean()) < 2e-3 and float(np.percentile(difference, 99.9)) < 0.05
    uncertain = segmenters["3d"].segment([volume], options(uncertainty="tta"))
    entropy = uncertain.uncertainty.array_zyx
    assert entropy.shape == volume.shape_zyx and 0.0 <= float(entropy.min()) and float(entropy.max()) <= 1.0
    assert float(entropy[:, :4].max()) == 0.0  # the zero frame nnU-Net crops is certain background


def test_training_cases_are_preprocessed_as_nnunet_preprocesses_them(segmenters, references):
    phantom, expected = references["training_case"]
    image, labels = segmenters["3d"].pipeline.prepare_training_case([phantom.image], phantom.labels)
    np.testing.assert_array_equal(image, expected["data"])
    np.testing.assert_array_equal(labels, np.where(expected["seg"][0] < 0, 0, expected["seg"][0]))


def test_sliding_window_with_nnunets_settings_covers_the_padded_image():
    # an image smaller than the patch is padded at both ends (centred) and cropped back
    net = torch.nn.Conv3d(1, 2, 1)
    image = np.random.default_rng(0).normal(size=(1, 5, 9, 40)).astype(np.float32)
    config = SlidingWindowConfig((8, 8, 16), placement="nnunet", importance="nnunet", blend="logits", pad="center")
    slabs = []
    sliding_window_predict(net, image, 2, config, lambda z0, z1, s: slabs.append((z0, z1, s.shape)))
    assert slabs[0][0] == 0 and slabs[-1][1] == 5
    assert all(shape == (2, z1 - z0, 9, 40) for z0, z1, shape in slabs)
