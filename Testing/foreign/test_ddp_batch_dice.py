"""Batch Dice under DDP counts the global batch, as nnU-Net's trainer does (``ddp=True``: its
``AllGatherGrad`` gathers TP / FP / FN of every rank before the ratio).

Two CPU processes (gloo, ``torch.distributed.run``) each take half of one seeded batch
(``ddp_dice_worker.py``). On each rank DeepSeg's soft Dice, its Dice + CE and its region loss, counted
across ranks, are compared with nnU-Net's own losses built as its trainer builds them under DDP, and
with one process computing DeepSeg's loss on the whole batch.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from deepseg_core.losses import SoftDiceLoss

pytestmark = pytest.mark.needs_torch

WORKER = Path(__file__).with_name("ddp_dice_worker.py")
sys.path.insert(0, str(WORKER.parent))

from ddp_dice_worker import BATCH, global_batch  # noqa: E402

WORLD = 2


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict[str, np.ndarray]]:
    pytest.importorskip("nnunetv2")
    out = tmp_path_factory.mktemp("ddp_dice")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD)]
    command += [str(WORKER), str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return [dict(np.load(out / f"rank{rank}.npz")) for rank in range(WORLD)]


def test_each_rank_computes_the_whole_batchs_dice_and_its_gradient(ranks):
    logits, labels = global_batch()
    logits.requires_grad_(True)
    whole_loss = SoftDiceLoss()(logits, labels)
    whole_loss.backward()
    whole = float(whole_loss.detach())
    share = BATCH // WORLD
    for rank, result in enumerate(ranks):
        assert result["dice_value"] == pytest.approx(whole, abs=1e-6)
        # each rank's gradient is WORLD times its part of the whole batch's: DDP's average of the
        # parameters' gradients over the ranks then gives the whole batch's gradient
        expected = logits.grad[rank * share : (rank + 1) * share].numpy() * WORLD
        np.testing.assert_allclose(result["dice_grad"], expected, atol=1e-7)
        # the test can fail: a rank's own half gives another Dice
        assert abs(result["dice_own_rank_value"] - whole) > 0.01


@pytest.mark.parametrize("name", ["dice", "dice_ce", "regions"])
def test_deepseg_matches_nnunets_ddp_loss_on_every_rank(ranks, name):
    for result in ranks:
        # nnU-Net returns -Dice where DeepSeg returns 1 - Dice: the same gradients
        assert result[f"{name}_value"] == pytest.approx(result[f"nnunet_{name}_value"] + 1.0, abs=2e-6)
        np.testing.assert_allclose(result[f"{name}_grad"], result[f"nnunet_{name}_grad"], atol=1e-7)


def test_without_a_process_group_the_counts_are_the_batchs_own():
    logits, labels = global_batch()
    assert not torch.distributed.is_initialized()
    assert float(SoftDiceLoss(across_ranks=True)(logits, labels)) == float(SoftDiceLoss()(logits, labels))


@pytest.mark.parametrize("across_ranks", [True, False])
def test_a_ddp_run_counts_dice_over_all_ranks(across_ranks):
    # retrain passes across_ranks=(world > 1); DeepSeg's own default loss has a batch-Dice term
    from deepseg_core.demo import DEFAULT_MODEL
    from deepseg_core.model_store import read_model_folder
    from deepseg_core.training.engine import RetrainConfig, training_objective

    objective = training_objective(read_model_folder(DEFAULT_MODEL), RetrainConfig(), None, across_ranks=across_ranks)
    dice_terms = [term for term in objective.loss.terms if isinstance(term, SoftDiceLoss)]
    assert len(dice_terms) == 1 and dice_terms[0].reduction == "batch"
    assert dice_terms[0].across_ranks is across_ranks
