#!/usr/bin/env python
"""Write a MONAI bundle laid out like the model zoo's ``spleen_ct_segmentation``, trained on DeepSeg phantoms.

    python scripts/make_tiny_monai_bundle.py [--out DIR] [--full] [--iterations N]

The bundle (what the zoo ships, minus the download list):

    LICENSE
    configs/metadata.json        network_data_format with the output channel_def (background, liver, liver lesion)
    configs/inference.json       the zoo's spleen inference.json: LoadImaged, EnsureChannelFirstd,
                                 Orientationd(RAS), Spacingd([1.5, 1.5, 2.0], bilinear),
                                 ScaleIntensityRanged(-57..164 -> 0..1, clip), EnsureTyped;
                                 SlidingWindowInferer(overlap 0.5, sw_batch_size 4); Activationsd(softmax),
                                 Invertd(nearest_interp=False), AsDiscreted(argmax), SaveImaged;
                                 SupervisedEvaluator + CheckpointLoader, as the zoo has them
    configs/logging.conf
    docs/README.md
    models/model.pt              torch.save(net.state_dict()), MONAI's UNet

Only the network size and the ROI differ from the zoo: the tiny bundle has a UNet with channels
(8, 16, 32), strides (2, 2), one residual unit and ROI 48^3; ``--full`` writes the zoo's own
network (channels 16..256, strides 2 x 4, two residual units, ROI 96^3). The weights are trained
briefly (Dice + cross-entropy, Adam) on DeepSeg phantoms (``deepseg_core.phantoms``) rendered at
the bundle's spacing in the orientation the network sees after Orientationd(RAS), with the ct-A,
ct-B and ct-C scanner profiles and a brain-like contrast, so that liver and lesions are found,
something is found in a real head CT, and the labels are not degenerate.

Without ``--out`` the bundle is cached in ``Testing/data/cache/monai/<key>/tiny_bundle`` (or
``full_bundle``), where ``<key>`` hashes this script, ``deepseg_core/phantoms.py`` and the torch,
MONAI and numpy versions; an existing cache entry is reused. The path is printed.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "DeepSeg"))

CACHE = REPO / "Testing" / "data" / "cache" / "monai"
PIXDIM = [1.5, 1.5, 2.0]
A_MIN, A_MAX = -57, 164
LABELS = {"0": "background", "1": "liver", "2": "liver lesion"}
TINY = {"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1, "roi": [48, 48, 48], "crop": 48, "iterations": 120}
FULL = {
    "channels": [16, 32, 64, 128, 256],
    "strides": [2, 2, 2, 2],
    "num_res_units": 2,
    "roi": [96, 96, 96],
    "crop": 64,
    "iterations": 40,
}

# The zoo's spleen_ct_segmentation configs/inference.json (model-zoo dfae206, bundle 0.5.9); the
# network_def and the inferer's roi_size are filled in per size.
INFERENCE: dict = {
    "imports": ["$import glob", "$import numpy", "$import os"],
    "bundle_root": ".",
    "image_key": "image",
    "output_dir": "$@bundle_root + '/eval'",
    "output_ext": ".nii.gz",
    "output_dtype": "$numpy.float32",
    "output_postfix": "trans",
    "separate_folder": True,
    "load_pretrain": True,
    "dataset_dir": "/workspace/data/Task09_Spleen",
    "datalist": "$list(sorted(glob.glob(@dataset_dir + '/imagesTs/*.nii.gz')))",
    "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
    "network_def": {
        "_target_": "UNet",
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": len(LABELS),
        "channels": None,
        "strides": None,
        "num_res_units": None,
        "norm": "batch",
    },
    "network": "$@network_def.to(@device)",
    "preprocessing": {
        "_target_": "Compose",
        "transforms": [
            {"_target_": "LoadImaged", "keys": "@image_key"},
            {"_target_": "EnsureChannelFirstd", "keys": "@image_key"},
            {"_target_": "Orientationd", "keys": "@image_key", "axcodes": "RAS"},
            {"_target_": "Spacingd", "keys": "@image_key", "pixdim": PIXDIM, "mode": "bilinear"},
            {
                "_target_": "ScaleIntensityRanged",
                "keys": "@image_key",
                "a_min": A_MIN,
                "a_max": A_MAX,
                "b_min": 0,
                "b_max": 1,
                "clip": True,
            },
            {"_target_": "EnsureTyped", "keys": "@image_key"},
        ],
    },
    "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]", "transform": "@preprocessing"},
    "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False, "num_workers": 4},
    "inferer": {"_target_": "SlidingWindowInferer", "roi_size": None, "sw_batch_size": 4, "overlap": 0.5},
    "postprocessing": {
        "_target_": "Compose",
        "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {
                "_target_": "Invertd",
                "keys": "pred",
                "transform": "@preprocessing",
                "orig_keys": "@image_key",
                "nearest_interp": False,
                "to_tensor": True,
            },
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {
                "_target_": "SaveImaged",
                "keys": "pred",
                "output_dir": "@output_dir",
                "output_ext": "@output_ext",
                "output_dtype": "@output_dtype",
                "output_postfix": "@output_postfix",
                "separate_folder": "@separate_folder",
            },
        ],
    },
    "handlers": [{"_target_": "StatsHandler", "iteration_log": False}],
    "evaluator": {
        "_target_": "SupervisedEvaluator",
        "device": "@device",
        "val_data_loader": "@dataloader",
        "network": "@network",
        "inferer": "@inferer",
        "postprocessing": "@postprocessing",
        "val_handlers": "@handlers",
        "amp": True,
    },
    "checkpointloader": {
        "_target_": "CheckpointLoader",
        "load_path": "$@bundle_root + '/models/model.pt'",
        "load_dict": {"model": "@network"},
    },
    "initialize": ["$monai.utils.set_determinism(seed=123)", "$@checkpointloader(@evaluator) if @load_pretrain else None"],
    "run": ["$@evaluator.run()"],
}

LOGGING_CONF = """[loggers]
keys=root

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[handler_consoleHandler]
class=StreamHandler
level=INFO
formatter=fullFormatter
args=(sys.stdout,)

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""


def inference_config(size: dict) -> dict:
    """The zoo's inference.json with this size's network and ROI."""
    config = copy.deepcopy(INFERENCE)
    for key in ("channels", "strides", "num_res_units"):
        config["network_def"][key] = size[key]
    config["inferer"]["roi_size"] = size["roi"]
    return config


def metadata(size: dict, full: bool) -> dict:
    """metadata.json in the zoo's schema (spleen's fields, this model's names and shapes)."""
    import monai
    import torch

    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json",
        "version": "0.1.0",
        "changelog": {"0.1.0": "phantom liver model laid out like spleen_ct_segmentation 0.5.9 (DeepSeg test data)"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "optional_packages_version": {"nibabel": "5.4.2", "pytorch-ignite": "0.5.5"},
        "name": "Phantom liver CT segmentation" + (" (full spleen UNet)" if full else ""),
        "task": "Liver and liver lesion segmentation of DeepSeg's CT phantoms",
        "description": "A UNet in the layout of the model zoo's spleen_ct_segmentation, trained briefly on DeepSeg phantoms; "
        "test data, not a medical model",
        "authors": "DeepSeg",
        "copyright": "Copyright (c) DeepSeg",
        "data_source": "deepseg_core.phantoms.generate_phantom (synthetic)",
        "data_type": "nibabel",
        "image_classes": "single channel data, intensity scaled to [0, 1]",
        "label_classes": "single channel data, 1 is liver, 2 is liver lesion, 0 is everything else",
        "pred_classes": "3 channels OneHot data, channel 1 is liver, channel 2 is liver lesion, channel 0 is background",
        "eval_metrics": {"mean_dice": None},
        "intended_use": "Testing only",
        "references": [],
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "hounsfield",
                    "modality": "CT",
                    "num_channels": 1,
                    "spatial_shape": size["roi"],
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": True,
                    "channel_def": {"0": "image"},
                }
            },
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "segmentation",
                    "num_channels": len(LABELS),
                    "spatial_shape": size["roi"],
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": True,
                    "channel_def": LABELS,
                }
            },
        },
    }


def training_cases(count: int, roi: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Phantoms at the bundle's spacing, as MONAI's network sees them: ``(N, 1, X, Y, Z)`` scaled images, labels.

    Phantoms have an identity LPS direction; Orientationd(RAS) flips x and y, so the arrays are
    flipped the same way here. The z extent equals the ROI's; x and y are larger (random crops).
    """
    from deepseg_core.phantoms import ScannerProfile, generate_phantom

    images, labels = [], []
    # ct-A/B/C, and a brain-like contrast (soft tissue at ~38 HU in ~0-12 HU surroundings) so that a
    # real head CT gets a sizeable segmentation too, with boundaries on which the parity tests bite
    head_like = ScannerProfile("ct-head-like", "CT", 0.0, 12.0, 38.0, (-25.0, -12.0), 0.25, 5.0, 0.8, 0.0)
    profiles = ("ct-A", "ct-B", "ct-C", head_like)
    shape_zyx = (roi[2], int(roi[1] * 1.6), int(roi[0] * 1.6))
    for seed in range(count):
        profile = profiles[seed % len(profiles)]
        phantom = generate_phantom(seed=1000 + seed, profile=profile, shape_zyx=shape_zyx, spacing_xyz_mm=tuple(PIXDIM))
        image = phantom.image.array_zyx.transpose(2, 1, 0)[::-1, ::-1, :]
        label = phantom.labels.array_zyx.transpose(2, 1, 0)[::-1, ::-1, :]
        images.append(np.clip((image - A_MIN) / (A_MAX - A_MIN), 0.0, 1.0).astype(np.float32)[None])
        labels.append(label.astype(np.int64))
    return np.stack(images), np.stack(labels)


def train(net: Any, size: dict, iterations: int, seed: int = 0, log_every: int = 20) -> float:
    """Brief Dice + cross-entropy training on crops of phantoms, half of them centred on a lesion voxel
    (lesions are small; without this a short training never finds them); returns the last loss."""
    import torch

    roi = size["roi"]
    crop = size["crop"]
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    images, labels = training_cases(16, roi)
    lesions = [np.argwhere(case == 2) for case in labels]
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    net.train()
    loss_value = float("nan")
    batch = 2 if crop > 48 else 4
    for iteration in range(iterations):
        xs, ys = [], []
        for _ in range(batch):
            case = int(rng.integers(len(images)))
            if len(xs) % 2 and len(lesions[case]):
                centre = lesions[case][int(rng.integers(len(lesions[case])))]
                x0, y0, z0 = (int(np.clip(c - crop // 2, 0, n - crop)) for c, n in zip(centre, images.shape[2:], strict=True))
            else:
                x0, y0, z0 = (int(rng.integers(n - crop + 1)) for n in images.shape[2:])
            xs.append(images[case, :, x0 : x0 + crop, y0 : y0 + crop, z0 : z0 + crop])
            ys.append(labels[case, x0 : x0 + crop, y0 : y0 + crop, z0 : z0 + crop])
        x = torch.from_numpy(np.ascontiguousarray(np.stack(xs)))
        y = torch.from_numpy(np.ascontiguousarray(np.stack(ys)))
        logits = net(x)
        probs = torch.softmax(logits, dim=1)
        onehot = torch.nn.functional.one_hot(y, logits.shape[1]).permute(0, 4, 1, 2, 3).float()
        dims = (0, 2, 3, 4)
        dice = 1 - ((2 * (probs * onehot).sum(dims) + 1) / (probs.sum(dims) + onehot.sum(dims) + 1))[1:].mean()
        loss = torch.nn.functional.cross_entropy(logits, y) + dice
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss_value = loss.item()
        if log_every and (iteration % log_every == 0 or iteration == iterations - 1):
            print(f"  iteration {iteration:4d}  loss {loss_value:.4f}", flush=True)
    net.eval()
    return loss_value


def write_bundle(out: Path, *, full: bool = False, iterations: int | None = None, seed: int = 0) -> Path:
    """Write the bundle into ``out`` (created; must not exist) and return it."""
    import torch
    from monai.networks.nets import UNet

    size = FULL if full else TINY
    config = inference_config(size)
    out.mkdir(parents=True)
    for sub in ("configs", "models", "docs"):
        (out / sub).mkdir()
    (out / "configs" / "inference.json").write_text(json.dumps(config, indent=4) + "\n", encoding="utf-8")
    (out / "configs" / "metadata.json").write_text(json.dumps(metadata(size, full), indent=4) + "\n", encoding="utf-8")
    (out / "configs" / "logging.conf").write_text(LOGGING_CONF, encoding="utf-8")
    (out / "LICENSE").write_text("Test data made by DeepSeg's scripts/make_tiny_monai_bundle.py; Apache-2.0.\n", encoding="utf-8")
    (out / "docs" / "README.md").write_text(
        "# Phantom liver CT segmentation\n\nLaid out like the MONAI model zoo's spleen_ct_segmentation. Run with\n"
        "`python -m monai.bundle run --config_file configs/inference.json --datalist \"['/abs/image.nii.gz']\"`.\n",
        encoding="utf-8",
    )
    net_args = {k: v for k, v in config["network_def"].items() if k != "_target_"}
    torch.manual_seed(seed)
    net = UNet(**net_args)
    started = time.perf_counter()
    loss = train(net, size, size["iterations"] if iterations is None else iterations, seed=seed)
    print(f"trained in {time.perf_counter() - started:.1f} s, last loss {loss:.4f}", flush=True)
    torch.save(net.state_dict(), out / "models" / "model.pt")
    return out


def cache_key(full: bool = False) -> str:
    """Hash of what determines the bundle: this script, the phantom generator, torch / MONAI / numpy versions."""
    import monai
    import torch

    digest = hashlib.sha256()
    digest.update(Path(__file__).read_bytes())
    digest.update((REPO / "DeepSeg" / "deepseg_core" / "phantoms.py").read_bytes())
    digest.update(f"{torch.__version__} {monai.__version__} {np.__version__} full={full}".encode())
    return digest.hexdigest()[:16]


def ensure_bundle(full: bool = False) -> Path:
    """The cached bundle, written first when missing (atomically: a temporary folder renamed into place)."""
    target = CACHE / cache_key(full) / ("full_bundle" if full else "tiny_bundle")
    if (target / "models" / "model.pt").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".bundle.", dir=target.parent))
    try:
        write_bundle(staging / "bundle", full=full)
        os.replace(staging / "bundle", target)
    except OSError:
        if not (target / "models" / "model.pt").is_file():  # another process may have finished first
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write here instead of the cache (must not exist)")
    parser.add_argument("--full", action="store_true", help="the zoo's full spleen UNet (16..256 channels, ROI 96^3)")
    parser.add_argument("--iterations", type=int, help="training iterations (default: 120 tiny, 40 full)")
    args = parser.parse_args()
    if args.out is not None:
        path = write_bundle(args.out, full=args.full, iterations=args.iterations)
    elif args.iterations is not None:
        parser.error("--iterations needs --out (the cache holds the default recipe only)")
    else:
        path = ensure_bundle(full=args.full)
    print(path)


if __name__ == "__main__":
    main()
