"""MONAI bundles: import (card, provenance, refusals) and parity with MONAI's own bundle inference.

The bundle is ``scripts/make_tiny_monai_bundle.py``'s: the model zoo's spleen_ct_segmentation
layout and inference.json with a small UNet trained on DeepSeg phantoms (cached). The reference
is ``monai.bundle.run`` on the bundle's own configs, in a fresh process, exactly as a zoo user runs
it; DeepSeg segments the same files after ``deepseg models import``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

pytest.importorskip("monai")
pytest.importorskip("nibabel")
import monai_fixtures as mf
import torch

from deepseg_core.errors import ConfigError
from deepseg_core.importers import import_model
from deepseg_core.importers.monai_bundle import import_bundle
from deepseg_core.inference.pipelines import Geometry, pipeline_for
from deepseg_core.inference.predictor import Segmenter, SegmentOptions
from deepseg_core.inference.sliding_window import SlidingWindowConfig, sliding_window_predict
from deepseg_core.io import Volume, read_image
from deepseg_core.model_card import ModelError
from deepseg_core.model_store import ModelStore, load_network
from deepseg_core.nets.monai_network import MonaiNetConfig, MonaiNetwork
from deepseg_core.pipelines import monai_bundle as mb

pytestmark = pytest.mark.needs_torch

REPO = Path(__file__).resolve().parents[2]
HEAD_CT = "ct_brain_atlas_1mm.nii.gz"
LABEL_VALUES = (0, 1, 2)

# The variant exercises what the zoo's spleen config does not: a foreground crop padded with zeros,
# Gaussian tile weights, replicate padding of images smaller than the ROI, and labels taken before
# Invertd and resampled back with nearest neighbours.
VARIANT = {
    "preprocessing::transforms::5": {
        "_target_": "CropForegroundd",
        "keys": "@image_key",
        "source_key": "@image_key",
        "margin": 10,
    },
    "preprocessing::transforms::6": {"_target_": "EnsureTyped", "keys": "@image_key"},
    "inferer": {
        "_target_": "SlidingWindowInferer",
        "roi_size": [48, 48, 48],
        "sw_batch_size": 3,
        "overlap": 0.25,
        "mode": "gaussian",
        "padding_mode": "replicate",
    },
    "postprocessing::transforms::1": {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
    "postprocessing::transforms::2": {
        "_target_": "Invertd",
        "keys": "pred",
        "transform": "@preprocessing",
        "orig_keys": "@image_key",
        "nearest_interp": True,
        "to_tensor": True,
    },
}


def torch_options(**kwargs) -> SegmentOptions:
    """Options that run the network in torch, as MONAI does (no exported CPU backend)."""
    if "backend" in SegmentOptions.__dataclass_fields__:
        kwargs["backend"] = "torch"
    return SegmentOptions(device="cpu", **kwargs)


def head_ct_path() -> Path:
    """The real head CT, checked like Testing/realdata does (fails, never skips, when missing)."""
    spec = importlib.util.spec_from_file_location("real_images", REPO / "Testing" / "realdata" / "real_images.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.real_file(HEAD_CT)


# ------------------------------------------------------------------------------------------------
# fixtures (module scope: the bundle, one import, one MONAI process for every reference)


@pytest.fixture(scope="module")
def bundle() -> Path:
    return mf.bundle_script().ensure_bundle()


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("monai")


@pytest.fixture(scope="module")
def store(work) -> ModelStore:
    return ModelStore(work / "store")


@pytest.fixture(scope="module")
def imported(bundle, store):
    return import_model(bundle, store)


@pytest.fixture(scope="module")
def variant(bundle, work, store):
    folder = mf.variant_bundle(bundle, work / "variant_bundle", VARIANT)
    return folder, import_bundle(folder, store, name="variant")


@pytest.fixture(scope="module")
def sigmoid_bundle(bundle, work, store):
    """One sigmoid output thresholded at 0.5 after Invertd (random weights: every boundary is a test)."""
    from monai.networks.nets import UNet

    folder = mf.variant_bundle(
        bundle,
        work / "sigmoid_bundle",
        {
            "network_def::out_channels": 1,
            "postprocessing::transforms::0": {"_target_": "Activationsd", "keys": "pred", "sigmoid": True},
            "postprocessing::transforms::2": {"_target_": "AsDiscreted", "keys": "pred", "threshold": 0.5},
        },
    )
    metadata = json.loads((folder / "configs" / "metadata.json").read_text())
    metadata["network_data_format"]["outputs"]["pred"].update(num_channels=1, channel_def={"0": "liver"})
    (folder / "configs" / "metadata.json").write_text(json.dumps(metadata))
    config = json.loads((folder / "configs" / "inference.json").read_text())["network_def"]
    torch.manual_seed(3)
    net = UNet(**{k: v for k, v in config.items() if k != "_target_"})
    torch.save(net.state_dict(), folder / "models" / "model.pt")
    return folder, import_bundle(folder, store, name="sigmoid")


@pytest.fixture(scope="module")
def inputs(work) -> dict[str, Path]:
    paths = mf.phantom_inputs(work / "inputs")
    # already at the bundle's spacing: Spacingd leaves it alone, Orientationd flips two axes
    from deepseg_core.io import write_image
    from deepseg_core.phantoms import generate_phantom

    native = generate_phantom(seed=5, profile="ct-C", shape_zyx=(40, 80, 88), spacing_xyz_mm=(1.5, 1.5, 2.0))
    volume = Volume(native.image.array_zyx.astype(np.int16), (1.5, 1.5, 2.0), (10.0, -20.0, 30.0))
    paths["native_spacing"] = write_image(volume, work / "inputs" / "native_spacing.nii.gz")
    paths["head_ct"] = head_ct_path()
    return paths


ZOO_CASES = ("oblique_lps", "sagittal_pir", "native_spacing", "head_ct")
VARIANT_CASES = ("oblique_lps", "sagittal_pir")


@pytest.fixture(scope="module")
def monai_reference(bundle, variant, sigmoid_bundle, inputs, work) -> dict[str, Path]:
    """MONAI's own labels: ``{("zoo" | "variant" | "sigmoid", case): path}``, all from one MONAI process."""
    runs = {"zoo": (bundle, ZOO_CASES), "variant": (variant[0], VARIANT_CASES), "sigmoid": (sigmoid_bundle[0], VARIANT_CASES)}
    mf.run_monai_bundles(
        [mf.monai_run_args(folder, [inputs[c] for c in cases], work / f"monai_{kind}") for kind, (folder, cases) in runs.items()],
        work,
    )
    return {(kind, c): mf.monai_output(work / f"monai_{kind}", inputs[c]) for kind, (_, cases) in runs.items() for c in cases}


@pytest.fixture(scope="module")
def segmenters(imported, variant, sigmoid_bundle, store) -> dict[str, Segmenter]:
    return {
        "zoo": Segmenter.load(imported.ref, device="cpu", store=store),
        "variant": Segmenter.load(variant[1].ref, device="cpu", store=store),
        "sigmoid": Segmenter.load(sigmoid_bundle[1].ref, device="cpu", store=store),
    }


# ------------------------------------------------------------------------------------------------
# import: card, provenance, stored weights


def test_card_describes_the_bundle_and_records_every_file_read(imported, bundle, store):
    card = imported
    assert card.name == "phantom-liver-ct-segmentation"
    assert [(label.value, label.name) for label in card.labels] == [(1, "liver"), (2, "liver lesion")]
    assert card.inputs.modality == "CT" and card.inputs.channels == ("CT",)
    assert card.preprocessing.target_spacing_xyz_mm == (1.5, 1.5, 2.0)
    norm = card.preprocessing.normalization
    assert (norm.scheme, norm.window, norm.mean, norm.std) == ("ct", (-57.0, 164.0), -57.0, 221.0)
    assert card.inference.patch_size_zyx == (48, 48, 48) and card.inference.overlap == 0.5 and card.inference.batch_size == 4
    assert card.architecture.name == "monai_network"
    assert card.architecture.config["network_def"]["_target_"] == "monai.networks.nets.UNet"
    steps = card.pipeline["config"]["steps"]
    assert [s["op"] for s in steps] == ["orientation", "spacing", "scale_intensity_range"]
    assert card.pipeline["config"]["postprocessing"] == {
        "activation": "softmax",
        "argmax_before_invert": False,
        "invert_interpolation": "linear",
    }
    source = card.source
    assert source["format"] == "monai_bundle" and source["bundle_version"] == "0.1.0"
    expected = {
        rel: hashlib.sha256((bundle / rel).read_bytes()).hexdigest()
        for rel in ("configs/metadata.json", "configs/inference.json", "models/model.pt")
    }
    assert source["files"] == expected
    # the store holds the card and safetensors only, never the pickle
    folder = store.folder(card.ref)
    assert sorted(p.name for p in folder.iterdir()) == ["model.json", "weights.safetensors"]


def test_importing_the_same_files_again_returns_the_stored_version(imported, bundle, store):
    again = import_model(bundle, store)
    assert again.ref == imported.ref
    assert store.versions(imported.name) == [imported.version]


def test_stored_network_is_monais_network_with_the_bundles_weights(imported, bundle, store):
    _, net = load_network(store.folder(imported.ref))
    from monai.networks.nets import UNet

    assert isinstance(net, MonaiNetwork) and isinstance(net.net, UNet)
    original = torch.load(bundle / "models" / "model.pt", map_location="cpu", weights_only=True)
    for key, tensor in original.items():
        assert torch.equal(net.net.state_dict()[key], tensor), key
    # DeepSeg's (B, C, Z, Y, X) tiles reach the MONAI network as (B, C, X, Y, Z)
    x = torch.randn(1, 1, 16, 24, 32)
    with torch.no_grad():
        expected = net.net(x.permute(0, 1, 4, 3, 2)).permute(0, 1, 4, 3, 2)
        np.testing.assert_allclose(net(x).numpy(), expected.numpy(), atol=1e-5)


CACHED_RUN = """
import json, sys
from pathlib import Path
from deepseg_core.inference.predictor import Segmenter, SegmentOptions
from deepseg_core.io import read_image, write_image
from deepseg_core.model_store import ModelStore
args = json.loads(sys.argv[1])
segmenter = Segmenter.load(args["ref"], device="cpu", store=ModelStore(args["store"]))
segmenter.cache_dir = Path(args["cache"])
result = segmenter.segment([read_image(args["image"])], SegmentOptions(device="cpu", backend="openvino"))
write_image(result.labels, args["labels"])
monai = sorted(name for name in sys.modules if name == "monai" or name.startswith("monai."))
print(json.dumps({"monai": monai, "built": segmenter.network_built, "backend": result.backend,
                  "digest": segmenter.weights_sha256()}))
"""


@pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="OpenVINO not installed")
def test_a_run_whose_graph_is_cached_does_not_import_monai(imported, store, inputs, work):
    from deepseg_core.inference.backends import weights_digest

    segmenter = Segmenter.load(imported.ref, device="cpu", store=store)
    segmenter.cache_dir = work / "compiled_for_the_cached_run"
    assert [stage["exported"] for stage in segmenter.prepare_backend(SegmentOptions(backend="openvino"))] == [True]
    expected = segmenter.segment([read_image(inputs["oblique_lps"])], torch_options())
    args = {
        "ref": imported.ref,
        "store": str(store.root),
        "cache": str(segmenter.cache_dir),
        "image": str(inputs["oblique_lps"]),
        "labels": str(work / "cached_run_labels.nii.gz"),
    }
    run = subprocess.run(
        [sys.executable, "-c", CACHED_RUN, json.dumps(args)], capture_output=True, text=True, timeout=600, check=False
    )
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    # the graph computed every tile: the network, and MONAI with it, were never needed
    assert report == {"monai": [], "built": False, "backend": "openvino", "digest": weights_digest(segmenter.net)}
    labels = read_image(args["labels"]).array_zyx
    assert (labels == expected.labels.array_zyx).mean() >= 0.999


def test_a_checkpoint_dict_with_a_model_entry_imports(bundle, work):
    folder = mf.variant_bundle(bundle, work / "checkpoint_dict", {})
    state = torch.load(folder / "models" / "model.pt", weights_only=True)
    torch.save({"model": state, "epoch": 3, "best_metric": 0.9}, folder / "models" / "model.pt")
    card = import_bundle(folder, ModelStore(work / "store_checkpoint"), name="from-checkpoint")
    assert card.ref == "from-checkpoint:1"


def test_a_yaml_inference_config_is_read_with_pyyaml_or_refused_clearly(bundle, work):
    folder = mf.variant_bundle(bundle, work / "yaml_bundle", {})
    config = folder / "configs" / "inference.json"
    (folder / "configs" / "inference.yaml").write_text(config.read_text())  # JSON is YAML
    config.unlink()
    if importlib.util.find_spec("yaml") is None:
        with pytest.raises(ModelError, match="PyYAML"):
            import_bundle(folder, ModelStore(work / "store_yaml"), name="yaml")
    else:
        card = import_bundle(folder, ModelStore(work / "store_yaml"), name="yaml")
        assert card.source["inference_config"] == "configs/inference.yaml"


# ------------------------------------------------------------------------------------------------
# refusals


def test_python_expressions_in_network_def_are_refused_without_running_them(bundle, work):
    marker = work / "expression_ran"
    folder = mf.variant_bundle(
        bundle,
        work / "expression_bundle",
        {
            "network_def::channels": f"$__import__('pathlib').Path({str(marker)!r}).touch() or [8, 16, 32]",
            "network_def::num_res_units": "@units",
            "units": "$1",
        },
    )
    with pytest.raises(ModelError) as caught:
        import_bundle(folder, ModelStore(work / "store_refused"))
    message = str(caught.value)
    assert "network_def::channels: Python expression" in message
    assert "network_def::num_res_units -> @units: Python expression '$1'" in message
    assert "2 item(s)" in message
    assert not marker.exists()


def test_network_classes_outside_monai_networks_nets_are_refused(bundle, work):
    folder = mf.variant_bundle(
        bundle,
        work / "target_bundle",
        {
            "network_def::_target_": "torch.nn.Identity",
            "network_def::act": {"_target_": "os.system", "command": "true"},
        },
    )
    with pytest.raises(ModelError) as caught:
        import_bundle(folder, ModelStore(work / "store_refused"))
    message = str(caught.value)
    assert "'torch.nn.Identity' is not a network class of monai.networks.nets" in message
    assert "network_def::act: _target_ 'os.system' is not a network class of monai.networks.nets" in message
    # a MONAI network asked to download weights while it is built
    folder = mf.variant_bundle(bundle, work / "pretrained_bundle", {"network_def::pretrained": True})
    with pytest.raises(ModelError, match="pretrained: True would fetch or read weights"):
        import_bundle(folder, ModelStore(work / "store_refused"))


def test_unsupported_transforms_are_listed_all_in_one_error(bundle, work):
    folder = mf.variant_bundle(
        bundle,
        work / "unsupported_bundle",
        {
            "preprocessing::transforms::6": {"_target_": "RandFlipd", "keys": "@image_key", "prob": 0.5},
            "preprocessing::transforms::7": {"_target_": "Lambdad", "keys": "@image_key", "func": "$lambda x: x * 2"},
            "preprocessing::transforms::8": {"_target_": "scripts.custom.Normalize", "keys": "@image_key"},
            "preprocessing::transforms::3::diagonal": True,
            "postprocessing::transforms::4": {
                "_target_": "KeepLargestConnectedComponentd",
                "keys": "pred",
                "applied_labels": [1],
            },
            "inferer": {"_target_": "SliceInferer", "roi_size": [48, 48]},
        },
    )
    with pytest.raises(ModelError) as caught:
        import_bundle(folder, ModelStore(work / "store_refused"))
    message = str(caught.value)
    for item in (
        "preprocessing[3]: Spacingd: diagonal=True",
        "preprocessing[6]: RandFlipd (a random transform)",
        "preprocessing[7]: Lambdad (runs a Python function from the config)",
        "preprocessing[8]: 'scripts.custom.Normalize' is not a MONAI transform",
        "inferer: 'SliceInferer' (only SlidingWindowInferer is reproduced)",
        "postprocessing[4]: 'KeepLargestConnectedComponentd' (label post-processing is not reproduced)",
    ):
        assert item in message, item
    assert "6 item(s)" in message and "(6)" in message


def test_a_bundle_without_invertd_is_refused(bundle, work):
    folder = mf.variant_bundle(
        bundle,
        work / "no_invert_bundle",
        {"postprocessing::transforms": [{"_target_": "Activationsd", "keys": "pred", "softmax": True}]},
    )
    with pytest.raises(ModelError, match="no Invertd"):
        import_bundle(folder, ModelStore(work / "store_refused"))


def _mapped(bundle: Path, folder: Path, changes: dict):
    from deepseg_core.importers.monai_bundle import map_bundle, read_bundle

    return map_bundle(read_bundle(mf.variant_bundle(bundle, folder, changes)))


def test_device_arguments_are_not_evaluated_and_do_not_block_the_import(bundle, work):
    """wholeBody_ct_segmentation's inferer has ``"device": "$torch.device(...)"``: where a computation runs never
    changes the labels, so such expressions are skipped rather than refused (and never evaluated)."""
    expression = "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')"
    mapping = _mapped(
        bundle,
        work / "device_bundle",
        {
            "inferer::device": expression,
            "inferer::sw_device": expression,
            "preprocessing::transforms::5::device": expression,
            "postprocessing::transforms::1::device": expression,
        },
    )
    assert mapping.pipeline_config["inferer"]["roi_size_xyz"] == [48, 48, 48]
    # any other argument written as an expression is still refused
    with pytest.raises(ModelError, match=r"inferer SlidingWindowInferer.overlap"):
        _mapped(bundle, work / "device_bundle", {"inferer::overlap": "$0.5"})


def test_postprocessing_of_other_keys_than_the_prediction_is_skipped(bundle, work):
    """A bundle's evaluation transforms on ``label`` do not touch ``pred``: they neither block the import nor
    change its settings."""
    transforms = [
        {"_target_": "AsDiscreted", "keys": "label", "to_onehot": 3},
        {"_target_": "KeepLargestConnectedComponentd", "keys": "label", "applied_labels": [1]},
    ]
    mapping = _mapped(
        bundle,
        work / "label_keys_bundle",
        {"postprocessing::transforms::4": transforms[0], "postprocessing::transforms::5": transforms[1]},
    )
    base = _mapped(bundle, work / "label_keys_base", {})
    assert mapping.pipeline_config["postprocessing"] == base.pipeline_config["postprocessing"]
    with pytest.raises(ModelError, match="KeepLargestConnectedComponentd"):  # on the prediction it is refused
        _mapped(
            bundle, work / "label_keys_bundle", {"postprocessing::transforms::4": {**transforms[1], "keys": ["pred", "label"]}}
        )


@pytest.mark.parametrize(
    "discrete, refusal",
    [
        ({"argmax": True, "threshold": 0.5}, "argmax with a threshold"),
        ({"threshold": 0.5}, "a 0.5 threshold after softmax activation"),
    ],
)
def test_thresholds_that_monai_applies_per_channel_are_refused(bundle, work, discrete, refusal):
    with pytest.raises(ModelError, match=refusal):
        _mapped(
            bundle,
            work / "threshold_bundle",
            {"postprocessing::transforms::2": {"_target_": "AsDiscreted", "keys": "pred", **discrete}},
        )


def test_invertd_without_nearest_interp_inverts_a_nearest_spacingd_with_nearest_as_monai_does(bundle, work):
    """MONAI's inverse of Spacingd reuses the forward pass's mode; ``nearest_interp`` only forces nearest. So
    labels taken before such an Invertd stay labels in MONAI, and DeepSeg takes them the same way."""
    from monai.transforms import Compose, EnsureChannelFirstd, Invertd, Spacingd

    image = torch.arange(4 * 5 * 6, dtype=torch.float32).reshape(4, 5, 6)
    from monai.data import MetaTensor

    data = {"image": MetaTensor(image, affine=torch.diag(torch.tensor([1.0, 1.0, 1.0, 1.0])))}
    forward = Compose(
        [EnsureChannelFirstd("image", channel_dim="no_channel"), Spacingd("image", (0.7, 1.3, 1.0), mode="nearest")]
    )
    out = forward(data)
    labels = (out["image"] % 3).clone()
    out["pred"] = labels
    inverted = Invertd("pred", forward, orig_keys="image", nearest_interp=False)(out)["pred"]
    assert set(np.unique(np.asarray(inverted))) <= {0.0, 1.0, 2.0}  # no value between labels: nearest

    changes = {
        "preprocessing::transforms::3::mode": "nearest",
        "postprocessing::transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {
                "_target_": "Invertd",
                "keys": "pred",
                "transform": "@preprocessing",
                "orig_keys": "@image_key",
                "nearest_interp": False,
            },
        ],
    }
    post = _mapped(bundle, work / "nearest_spacing_bundle", changes).pipeline_config["postprocessing"]
    assert post == {"activation": "softmax", "argmax_before_invert": True, "invert_interpolation": "nearest"}
    # with a bilinear Spacingd the same postprocessing would interpolate labels: refused as before
    with pytest.raises(ModelError, match="fractional label values"):
        _mapped(bundle, work / "nearest_spacing_bundle", {"postprocessing::transforms": changes["postprocessing::transforms"]})


def test_a_crop_before_the_orientation_is_refused():
    """The crop box is taken on the grid as stored; an orientation after it would reorder the cropped image
    against the uncropped grid (labels moved in an image stored in LPS order, as Slicer's DICOM is)."""
    config = {
        "steps": [
            {"op": "crop_foreground", "margin_xyz": [0, 0, 0], "allow_smaller": True},
            {"op": "orientation", "axcodes": "RAS"},
        ],
        "inferer": {"roi_size_xyz": [16, 16, 16]},
    }
    with pytest.raises(ConfigError, match=r"crop_foreground before orientation is not reproduced"):
        mb.parse_config(config)
    mb.parse_config({**config, "steps": config["steps"][::-1]})


def test_a_one_sided_clip_of_scale_intensity_range_is_monais():
    from monai.transforms import ScaleIntensityRange

    from deepseg_core.pipelines.monai_bundle.intensity import scale_intensity_range

    x = torch.tensor([-1000.0, -57.0, 50.0, 164.0, 900.0])
    for b_min, b_max in ((0.0, None), (None, 1.0), (0.0, 1.0)):
        step = {"a_min": -57, "a_max": 164, "b_min": b_min, "b_max": b_max, "clip": True}
        expected = ScaleIntensityRange(-57, 164, b_min, b_max, clip=True)(x)
        torch.testing.assert_close(scale_intensity_range(x, step), torch.as_tensor(expected), rtol=0, atol=1e-6)


def test_a_network_def_this_monai_cannot_build_is_a_clear_error(bundle, work):
    """SwinUNETR's ``img_size`` was removed in MONAI 1.5, so the zoo's swin_unetr_btcv_segmentation cannot be built
    by MONAI 1.6: the import says so, with MONAI's reason, instead of ending in a traceback."""
    folder = mf.variant_bundle(bundle, work / "unbuildable_bundle", {"network_def::img_size": 96})
    with pytest.raises(ModelError, match=r"MONAI \S+ cannot build the bundle's network_def") as caught:
        import_bundle(folder, ModelStore(work / "store_refused"))
    assert "img_size" in str(caught.value) and "monai_version" in str(caught.value)


def test_a_torchscript_only_bundle_is_refused(bundle, work):
    folder = mf.variant_bundle(bundle, work / "torchscript_bundle", {})
    (folder / "models" / "model.pt").unlink()
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(folder / "models" / "model.ts"))
    with pytest.raises(ModelError, match=r"only a TorchScript export \(models/model.ts\)"):
        import_bundle(folder, ModelStore(work / "store_refused"))


class _RunsCodeWhenUnpickled:
    """A pickle payload that would create a file if anything unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_an_unsafe_pickle_in_model_pt_is_refused_without_running_it(bundle, work):
    marker = work / "pickle_ran"
    folder = mf.variant_bundle(bundle, work / "pickle_bundle", {})
    state = torch.load(folder / "models" / "model.pt", weights_only=True)
    torch.save({"model": state, "extra": _RunsCodeWhenUnpickled(marker)}, folder / "models" / "model.pt")
    with pytest.raises(ModelError) as caught:
        import_bundle(folder, ModelStore(work / "store_refused"))
    assert "weights_only=True" in str(caught.value) and "Unsupported global: GLOBAL" in str(caught.value)
    assert not marker.exists()


def test_import_options_and_a_missing_monai_are_clear_errors(bundle, work, monkeypatch):
    with pytest.raises(ModelError, match="takes no import options"):
        import_bundle(bundle, ModelStore(work / "store_refused"), folds=(0,))
    from deepseg_core.nets import monai_network

    monkeypatch.setattr(monai_network, "monai_available", lambda: False)
    with pytest.raises(ConfigError, match=r"needs MONAI.*pip install"):
        MonaiNetwork(MonaiNetConfig(network_def={"_target_": "UNet"}))


def test_an_edited_card_cannot_smuggle_code_into_the_network(work):
    config = MonaiNetConfig(network_def={"_target_": "monai.networks.nets.UNet", "spatial_dims": "$print('x') or 3"})
    with pytest.raises(ConfigError, match="Python expression"):
        MonaiNetwork(config)


# ------------------------------------------------------------------------------------------------
# MONAI's semantics, piece by piece


def test_tile_starts_and_gaussian_weights_are_monais(work):
    from monai.data.utils import compute_importance_map, dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    for length, patch, overlap in [
        (135, 48, 0.5),
        (48, 48, 0.5),
        (100, 32, 0.25),
        (91, 96 - 5, 0.6),
        (77, 20, 0.0),
        (64, 7, 0.9),
    ]:
        interval = _get_scan_interval((length,), (patch,), 1, (overlap,))
        expected = [s[0].start for s in dense_patch_slices((length,), (patch,), interval)]
        assert mb.monai_tile_starts(length, patch, overlap) == expected, (length, patch, overlap)
    for patch_zyx, sigma in [((48, 40, 32), 0.125), ((17, 96, 33), 0.3)]:
        monai_map = compute_importance_map(patch_zyx[::-1], mode="gaussian", sigma_scale=sigma)
        assert torch.equal(mb.monai_gaussian_importance(patch_zyx, sigma), monai_map.permute(2, 1, 0))


@pytest.mark.parametrize("mode, padding", [("constant", "constant"), ("gaussian", "replicate"), ("gaussian", "reflect")])
def test_sliding_window_blends_logits_as_monais_inferer(mode, padding):
    from monai.inferers import sliding_window_inference

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(2, 3, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv3d(3, 3, 3, padding=1)).eval()
    image = torch.randn(2, 19, 45, 38)  # (C, Z, Y, X): z smaller than the ROI -> padded
    roi_xyz = (24, 20, 28)
    config = SlidingWindowConfig(
        patch_size_zyx=roi_xyz[::-1],
        overlap=0.4,
        batch_size=3,
        placement="monai",
        importance="monai_gaussian" if mode == "gaussian" else "constant",
        blend="logits",
        pad=mb.PAD_FOR_MONAI[padding],
        sigma_scale=0.2,
    )
    slabs = {}
    sliding_window_predict(net, image.numpy(), 3, config, lambda z0, z1, b: slabs.__setitem__(z0, b))
    ours = np.concatenate([slabs[z] for z in sorted(slabs)], axis=1)

    def transposed(x):  # MONAI's (B, C, X, Y, Z) in, same order out
        return net(x.permute(0, 1, 4, 3, 2)).permute(0, 1, 4, 3, 2)

    with torch.no_grad():
        theirs = sliding_window_inference(
            image.permute(0, 3, 2, 1)[None], roi_xyz, 3, transposed, overlap=0.4, mode=mode, sigma_scale=0.2, padding_mode=padding
        )[0].permute(0, 3, 2, 1)
    np.testing.assert_allclose(ours, theirs.numpy(), atol=2e-6)


def test_orientation_is_nibabels_closest_axes_permutation():
    import nibabel as nib

    rng = np.random.default_rng(4)
    shape_zyx = (5, 6, 7)
    array = rng.normal(size=shape_zyx)
    for trial in range(40):
        direction = np.linalg.qr(rng.normal(size=(3, 3)))[0]
        if trial % 2:  # an axis permutation with flips, slightly rotated
            direction = np.eye(3)[:, rng.permutation(3)] * rng.choice([-1, 1], size=3)
            direction = direction @ mf.rotation_z(rng.uniform(-30, 30))
        grid = Geometry(shape_zyx, (0.7, 1.1, 2.3), (4.0, -2.0, 9.0), tuple(direction.ravel()))
        for codes in ("RAS", "LPS", "PIR"):
            reorder = mb.AxisReorder.towards(direction, codes)
            affine = mb.ijk_to_ras(grid)
            transform = nib.orientations.ornt_transform(nib.io_orientation(affine), nib.orientations.axcodes2ornt(codes))
            expected = nib.orientations.apply_orientation(array.transpose(2, 1, 0), transform)
            np.testing.assert_array_equal(reorder.apply(array).transpose(2, 1, 0), expected)
            expected_affine = affine @ nib.orientations.inv_ornt_aff(transform, shape_zyx[::-1])
            np.testing.assert_allclose(mb.ijk_to_ras(reorder.geometry(grid)), expected_affine, atol=1e-9)
            np.testing.assert_array_equal(reorder.undo(reorder.apply(array)), array)


def _monai_preprocessing(folder: Path, image: Path):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(folder / "configs" / "inference.json"))
    parser.read_meta(str(folder / "configs" / "metadata.json"))
    parser["bundle_root"] = str(folder)
    return parser.get_parsed_content("preprocessing")({"image": str(image)})["image"]


def test_preprocessing_equals_monais_transforms(bundle, variant, work, inputs, store):
    """Orientation (other axcodes too), Spacingd (centre-aligned oblique case), every intensity step, the crop."""
    intensity = mf.variant_bundle(
        bundle,
        work / "intensity_bundle",
        {
            "preprocessing::transforms::2::axcodes": "LPI",
            "preprocessing::transforms::3::pixdim": [1.1, 1.3, 1.7],
            "preprocessing::transforms::4": {
                "_target_": "ScaleIntensityRangePercentilesd",
                "keys": "@image_key",
                "lower": 5,
                "upper": 95,
                "b_min": 0.0,
                "b_max": 1.0,
                "clip": True,
            },
            "preprocessing::transforms::5": {
                "_target_": "CropForegroundd",
                "keys": "@image_key",
                "source_key": "@image_key",
                "margin": [3, 2, 1],
                "allow_smaller": True,
            },
            "preprocessing::transforms::6": {"_target_": "NormalizeIntensityd", "keys": "@image_key", "nonzero": True},
            "preprocessing::transforms::7": {"_target_": "ScaleIntensityd", "keys": "@image_key", "minv": -1.0, "maxv": 1.0},
        },
    )
    card = import_bundle(intensity, store, name="intensity")
    for folder, card_, case in (
        (bundle, None, "oblique_lps"),
        (variant[0], variant[1], "oblique_lps"),
        (intensity, card, "sagittal_pir"),
    ):
        card_ = card_ or store.card("phantom-liver-ct-segmentation")
        pipeline = pipeline_for(card_, 3, 1)
        ours = pipeline.prepare([read_image(inputs[case])]).image_czyx
        theirs = np.asarray(_monai_preprocessing(folder, inputs[case])).transpose(0, 3, 2, 1)
        assert ours.shape == theirs.shape, (folder.name, ours.shape, theirs.shape)
        assert pipeline.network_input_channels == ours.shape[0]  # what an export before any input is made for
        np.testing.assert_allclose(ours, theirs, atol=2e-5, err_msg=folder.name)


def test_prepare_training_case_resamples_labels_with_the_image(store, imported, work):
    from deepseg_core.phantoms import generate_phantom

    phantom = generate_phantom(seed=3, profile="ct-A", shape_zyx=(30, 70, 66), spacing_xyz_mm=(1.2, 1.1, 2.4))
    direction = mf.rotation_z(10.0)
    image = Volume(phantom.image.array_zyx, (1.2, 1.1, 2.4), (5.0, 6.0, 7.0), direction)
    label = image.with_array(phantom.labels.array_zyx)
    pipeline = pipeline_for(imported, 3, 1)
    image_czyx, label_zyx = pipeline.prepare_training_case([image], label)
    assert image_czyx.shape[1:] == label_zyx.shape and image_czyx.dtype == np.float32
    assert label_zyx.dtype == phantom.labels.array_zyx.dtype and set(np.unique(label_zyx)) == {0, 1, 2}
    # the liver's physical volume is kept (nearest resampling, 1.5 x 1.5 x 2.0 mm voxels)
    liver_ml = (label_zyx == 1).sum() * 1.5 * 1.5 * 2.0 / 1000
    truth_ml = (phantom.labels.array_zyx == 1).sum() * 1.2 * 1.1 * 2.4 / 1000
    assert abs(liver_ml - truth_ml) / truth_ml < 0.03
    # intensities and labels stay aligned: the liver is bright in the scaled image
    assert image_czyx[0][label_zyx == 1].mean() > image_czyx[0][label_zyx == 0].mean() + 0.1


@pytest.mark.parametrize("interpolation", ["linear", "nearest"])
def test_the_way_back_streams_slab_by_slab_with_bounded_memory(interpolation):
    """Uneven slabs give what one slab gives; only a few model slices are held at once."""
    rng = np.random.default_rng(2)
    oriented = Geometry((41, 37, 29), (0.9, 1.1, 1.3), (3.0, -4.0, 5.0), tuple(mf.rotation_z(15.0).ravel()))
    model = mb.spacing_grid(oriented, (1.5, 1.5, 2.0))
    crop = mb.CropBox((2, -3, 1), (model.shape_zyx[0] - 1, model.shape_zyx[1] + 2, model.shape_zyx[2] - 2))
    logits = rng.normal(size=(3, *(b - a for a, b in zip(crop.start_zyx, crop.stop_zyx, strict=True)))).astype(np.float32)

    def collect(depths):
        collector = mb.BundleGridCollector(
            model_grid=model,
            oriented_grid=oriented,
            reorder=mb.AxisReorder((2, 0, 1), (True, False, True)),
            crop=crop,
            channels=3,
            postprocessing=mb.PostprocessingSettings("softmax", interpolation == "nearest", interpolation),
            keep_probabilities=True,
            uncertainty=True,
        )
        z = 0
        for depth in depths:
            stop = min(z + depth, logits.shape[1])
            collector.add(z, stop, logits[:, z:stop].copy())
            z = stop
            if z == logits.shape[1]:
                break
        return collector, collector.finish()

    _, whole = collect([logits.shape[1]])
    streamed_collector, streamed = collect([2, 1, 3] * 40)
    np.testing.assert_array_equal(streamed.labels_zyx, whole.labels_zyx)
    np.testing.assert_array_equal(streamed.probabilities, whole.probabilities)
    np.testing.assert_allclose(streamed.entropy_zyx, whole.entropy_zyx, atol=1e-6)
    assert streamed.labels_zyx.shape == mb.AxisReorder((2, 0, 1), (True, False, True)).undo(np.zeros(oriented.shape_zyx)).shape
    assert streamed_collector.max_buffered_slices <= 3 + 3
    # far outside the crop box every probability is 0, as Invertd pads: background there
    probs = np.asarray(whole.probabilities, dtype=np.float32)
    empty = probs.sum(axis=0) == 0
    assert empty.any() and not whole.labels_zyx[empty].any()


# ------------------------------------------------------------------------------------------------
# parity with MONAI's own bundle inference


def _segment_and_compare(segmenter: Segmenter, image_path: Path, reference: Path) -> dict:
    volume = read_image(image_path)
    result = segmenter.segment([volume], torch_options())
    monai_image = sitk.ReadImage(str(reference))
    theirs = sitk.GetArrayFromImage(monai_image).astype(np.int64)
    assert np.allclose(monai_image.GetOrigin(), volume.origin_lps, atol=1e-3)
    assert np.allclose(np.reshape(monai_image.GetDirection(), (3, 3)), volume.direction_lps, atol=1e-5)
    assert np.allclose(monai_image.GetSpacing(), volume.spacing_xyz_mm, atol=1e-5)
    return {"ours": result.labels.array_zyx, "theirs": theirs, **mf.compare_labels(result.labels.array_zyx, theirs, LABEL_VALUES)}


@pytest.mark.parametrize("case", ZOO_CASES)
def test_labels_match_monais_bundle_run_with_the_zoos_config(case, segmenters, monai_reference, inputs):
    compared = _segment_and_compare(segmenters["zoo"], inputs[case], monai_reference[("zoo", case)])
    assert compared["voxels_ours_theirs"][1][1] > 1000, "the reference should segment some liver (non-degenerate labels)"
    assert compared["agreement"] >= 0.995, compared
    for value, dice in compared["dice"].items():
        assert dice >= 0.99, (value, compared)


@pytest.mark.parametrize("case", VARIANT_CASES)
def test_labels_match_monais_bundle_run_with_crop_gaussian_and_nearest_inversion(case, segmenters, monai_reference, inputs):
    compared = _segment_and_compare(segmenters["variant"], inputs[case], monai_reference[("variant", case)])
    assert compared["agreement"] >= 0.995, compared
    for value, dice in compared["dice"].items():
        assert dice >= 0.99, (value, compared)
    # Any difference lies on a plane of input voxels exactly half-way between two model voxels,
    # where MONAI's nearest-neighbour choice is decided by rounding in grid_sample (DeepSeg: ties to even).
    volume = read_image(inputs[case])
    reorder = mb.AxisReorder.towards(volume.direction_lps, "RAS")
    oriented = reorder.geometry(mb.grid_of(volume))
    ratio, shift = mb.index_mapping(mb.spacing_grid(oriented, (1.5, 1.5, 2.0)), oriented)
    differing = reorder.apply(compared["ours"] != compared["theirs"])
    on_tie = np.zeros(differing.shape, dtype=bool)
    for axis in range(3):
        positions = np.arange(differing.shape[axis]) * ratio[axis] + shift[axis]
        tie = np.abs(positions - np.floor(positions) - 0.5) < 1e-5
        on_tie |= tie.reshape([-1 if a == axis else 1 for a in range(3)])
    assert not (differing & ~on_tie).any(), "a difference away from a nearest-neighbour tie"


@pytest.mark.parametrize("case", VARIANT_CASES)
def test_labels_match_monais_bundle_run_with_one_sigmoid_output(case, segmenters, monai_reference, inputs, sigmoid_bundle):
    card = sigmoid_bundle[1]
    assert [(label.value, label.name) for label in card.labels] == [(1, "liver")]
    assert card.architecture.config["single_logit"] and card.pipeline["config"]["postprocessing"]["activation"] == "sigmoid"
    compared = _segment_and_compare(segmenters["sigmoid"], inputs[case], monai_reference[("sigmoid", case)])
    assert min(compared["voxels_ours_theirs"][1]) > 1000 and min(compared["voxels_ours_theirs"][0]) > 1000, compared
    assert compared["agreement"] >= 0.995, compared
    assert min(compared["dice"][v] for v in (0, 1)) >= 0.99, compared


def test_probabilities_come_back_on_the_input_grid_and_sum_to_one(segmenters, inputs):
    volume = read_image(inputs["sagittal_pir"])
    options = torch_options(keep_probabilities=True)
    result = segmenters["zoo"].segment([volume], options)
    probs = np.asarray(result.probabilities, dtype=np.float32)
    assert probs.shape == (3, *volume.shape_zyx)
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=2e-3)
    agree = (np.argmax(probs, axis=0) == result.labels.array_zyx).mean()
    assert agree > 0.999  # float16 rounding may flip exact near-ties only


def test_cli_import_prints_the_imported_version(bundle, work, engine_python):
    store_dir = work / "cli_store"
    done = subprocess.run(
        [engine_python, "-m", "deepseg_core", "models", "import", str(bundle), "--models-dir", str(store_dir)]
        + ["--name", "cli-bundle", "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO / "DeepSeg")},
        cwd=work,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    events = [json.loads(line) for line in done.stdout.strip().splitlines()]
    event = events[0]
    assert event["event"] == "imported" and event["model"] == "cli-bundle:1"
    assert event["source"]["format"] == "monai_bundle" and event["labels"] == ["liver", "liver lesion"]
    # then the bundle's network is exported and compiled for this computer's CPU runtime (on CUDA: nothing to do)
    if not torch.cuda.is_available():
        assert [e["event"] for e in events[1:]] == ["status", "prepared"]
        assert [stage["backend"] for stage in events[-1]["stages"]] == ["openvino"]


@pytest.mark.parametrize("kind", ["zoo", "variant"])
@pytest.mark.parametrize("case", ZOO_CASES)
def test_the_network_grid_is_known_before_preparing_the_image(kind, case, segmenters, inputs):
    # the domain check's field-of-view finding needs the model grid without running the bundle's transforms
    volume = read_image(inputs[case])
    grid = segmenters[kind].pipeline.network_grid([volume])
    model_grid = segmenters[kind].pipeline.prepare([volume]).context["model_grid"]
    assert grid.shape_zyx == tuple(model_grid.shape_zyx)
    np.testing.assert_allclose(grid.spacing_zyx_mm, model_grid.spacing_xyz_mm[::-1], rtol=1e-12)
    # each network axis spans the extent of the image axis it names (to within a voxel)
    extent_mm = dict(zip("zyx", np.asarray(volume.shape_zyx) * np.asarray(volume.spacing_xyz_mm[::-1]), strict=True))
    assert sorted(grid.input_axes) == ["x", "y", "z"]
    for size, spacing, name in zip(grid.shape_zyx, grid.spacing_zyx_mm, grid.input_axes, strict=True):
        assert abs(size * spacing - extent_mm[name]) <= spacing, (grid, extent_mm)
