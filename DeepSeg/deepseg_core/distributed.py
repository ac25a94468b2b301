"""One code path for one process and many: ranks under ``torchrun`` (DDP training, sharded segmentation).

``torchrun --nproc_per_node N [--nnodes M ...] -m deepseg_core ...`` sets ``WORLD_SIZE``, ``RANK`` and
``LOCAL_RANK``; the process group is started on first use (gloo on CPUs, NCCL with CUDA), and each
rank takes the GPU of its local rank.
"""

from __future__ import annotations

import os

import torch


def launched_world_size() -> int:
    """How many processes ``torchrun`` started (``WORLD_SIZE``; 1 without it), before any process group."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank_world() -> tuple[int, int]:
    """``(rank, world size)``; under ``torchrun`` (WORLD_SIZE > 1) the process group is started."""
    world = launched_world_size()
    if world <= 1:
        return 0, 1
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend=backend)
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def rank_device(requested: str, world: int) -> str:
    """The device of this rank: with several ranks and CUDA, ``cuda:<LOCAL_RANK>``; else as requested."""
    if world > 1 and requested in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return requested


def barrier(world: int) -> None:
    """Wait for every rank (no-op for one process)."""
    if world > 1:
        torch.distributed.barrier()


def finish(world: int) -> None:
    """Leave the process group (no-op for one process)."""
    if world > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
