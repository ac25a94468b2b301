"""Training checkpoints and per-process random states (safetensors + JSON, never pickle).

A checkpoint folder (``last/``, ``best/``) holds the weights and the optimiser tensors as
safetensors, everything else (epoch, scheduler, history, world size) in ``state.json``, and one
``ranks/rank-R.json`` per process with its random state (numpy generator of the patch sampler and
augmentation, torch CPU / CUDA generators of dropout, Python ``random``). A checkpoint is written
beside the folder and swapped in, so the previous one survives any failure; rank 0 gathers the
ranks' states (a collective) and writes them inside the same swap, and each rank restores its own.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, DeepSegError
from ..fileutil import atomic_write_text

log = logging.getLogger(__name__)


def _staged(folder: Path) -> Path:
    """Where :func:`stage_checkpoint` writes ``folder``'s next checkpoint."""
    return folder.with_name(folder.name + ".tmp")


def _previous(folder: Path) -> Path:
    """Where :func:`swap_in_checkpoint` keeps ``folder``'s checkpoint between its two renames."""
    return folder.with_name(folder.name + ".old")


def save_checkpoint(
    folder: Path,
    net: nn.Module,
    optimiser: torch.optim.Optimizer,
    state: dict[str, Any],
    rank_states: list[dict[str, Any]] | None = None,
) -> None:
    """Write a checkpoint next to ``folder`` and swap it in; the previous one survives any write failure.

    ``rank_states``: every process's random state, index = rank (:func:`random_state`).
    """
    stage_checkpoint(folder, net, optimiser, state, rank_states)
    swap_in_checkpoint(folder)


def stage_checkpoint(
    folder: Path,
    net: nn.Module,
    optimiser: torch.optim.Optimizer,
    state: dict[str, Any],
    rank_states: list[dict[str, Any]] | None = None,
) -> None:
    """Write a checkpoint beside ``folder`` (``<folder>.tmp``, its ``state.json`` last) without swapping it in:
    :func:`swap_in_checkpoint` does that. Between the two another checkpoint can be saved, so that one swap
    waits for the other (``best/`` waits for ``last/``, see :func:`recover_checkpoint`)."""
    staging = _staged(folder)
    try:
        _write_checkpoint_files(staging, net, optimiser, state, rank_states or [])
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        previous = "The previous checkpoint there is intact" if folder.exists() else "No earlier checkpoint exists"
        raise DeepSegError(
            f"could not write the checkpoint ({exc.strerror or exc})",
            subject=folder,
            hint=f"{previous}. Free disk space (or choose another --checkpoints folder), then run again with --resume.",
        ) from exc


def swap_in_checkpoint(folder: Path) -> None:
    """Replace ``folder`` by the checkpoint :func:`stage_checkpoint` wrote beside it (two renames)."""
    staging, old = _staged(folder), _previous(folder)
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(staging, folder)
    shutil.rmtree(old, ignore_errors=True)


def forget_best(folder: Path) -> None:
    """Remove ``folder`` (``best/``) and what a killed swap of it left: a new run in the checkpoint folder starts
    without the best epoch of the run before it, which its own ``last/`` replaces too."""
    for path in (folder, _previous(folder)):
        shutil.rmtree(path, ignore_errors=True)
    forget_staged(folder)


def forget_staged(folder: Path) -> None:
    """Remove a checkpoint staged beside ``folder`` (:func:`stage_checkpoint`) and not swapped in."""
    shutil.rmtree(_staged(folder), ignore_errors=True)


def recover_checkpoint(folder: Path, committed: dict[str, Any] | None = None) -> None:
    """Finish or undo what a kill left of a checkpoint's save.

    A kill between the two renames of :func:`swap_in_checkpoint` leaves only ``<folder>.old``: it is put back.
    With ``committed`` (``last/``'s state, for ``best/``): ``best/`` is staged before ``last/`` is saved and
    swapped in after, so a complete staged checkpoint of ``last/``'s run and epoch is swapped in, as the run
    would have done. Any other staged one is removed: one of a later epoch, whose ``last/`` never came (the
    resume replays that epoch and, on CUDA, may score it otherwise), one of another run (a new run killed
    before its first ``last/``, beside the previous run's), or one written in part.
    """
    staging, old = _staged(folder), _previous(folder)
    if committed is not None and staging.exists():
        try:
            staged = json.loads((staging / "state.json").read_text())
        except (OSError, ValueError):
            staged = {}  # written only in part: state.json comes last
        if staged.get("epoch") == committed.get("epoch") and staged.get("run_id") == committed.get("run_id"):
            log.info("%s: finishing the save of epoch %s that a stop interrupted", folder, staged["epoch"])
            swap_in_checkpoint(folder)
            return
        log.info("%s: dropping a checkpoint staged for epoch %s, which last/ does not hold", folder, staged.get("epoch"))
        forget_staged(folder)
    if not folder.exists() and (old / "state.json").exists():
        os.replace(old, folder)


RANK_STATES = "ranks"


def _write_checkpoint_files(
    staging: Path, net: nn.Module, optimiser: torch.optim.Optimizer, state: dict[str, Any], rank_states: list[dict[str, Any]]
) -> None:
    from safetensors.torch import save_file

    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, str(staging / "weights.safetensors"))
    opt = optimiser.state_dict()
    tensors = {}
    plain_state = {}
    for param_id, entries in opt["state"].items():
        plain_state[str(param_id)] = {}
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{param_id}.{key}"] = value.detach().cpu().contiguous()
            else:
                plain_state[str(param_id)][key] = value
    save_file(tensors, str(staging / "optimizer.safetensors"))
    if rank_states:
        (staging / RANK_STATES).mkdir()
        for rank, random_state in enumerate(rank_states):
            (staging / RANK_STATES / f"rank-{rank}.json").write_text(json.dumps(random_state))
    state = {**state, "optimizer": {"param_groups": opt["param_groups"], "state": plain_state}}
    (staging / "state.json").write_text(json.dumps(state, indent=1))


def load_checkpoint(folder: Path, net: nn.Module, optimiser: torch.optim.Optimizer) -> dict[str, Any]:
    """Weights and optimiser state into ``net`` / ``optimiser``; returns ``state.json``.

    A checkpoint written before per-rank random states keeps torch's in ``optimizer.safetensors``
    as ``__torch_rng``: it is returned as ``state["legacy_torch_rng"]``.
    """
    from safetensors.torch import load_file

    net.load_state_dict(load_file(str(folder / "weights.safetensors")))
    tensors = load_file(str(folder / "optimizer.safetensors"))
    state = json.loads((folder / "state.json").read_text())
    opt_state: dict[int, dict[str, Any]] = {}
    for param_id, entries in state["optimizer"]["state"].items():
        opt_state[int(param_id)] = dict(entries)
    for key, value in tensors.items():
        if key == "__torch_rng":
            state["legacy_torch_rng"] = value
            continue
        param_id, name = key.split(".", 1)
        opt_state.setdefault(int(param_id), {})[name] = value
    optimiser.load_state_dict({"state": opt_state, "param_groups": state["optimizer"]["param_groups"]})
    return state


def network_description(name: str, config: dict[str, Any]) -> dict[str, Any]:
    """The architecture a checkpoint's weights belong to, as ``state.json`` stores it (JSON types)."""
    return json.loads(json.dumps({"name": name, "config": config}))


def check_same_network(folder: Path, name: str, config: dict[str, Any]) -> None:
    """Refuse to resume from ``folder`` (``last/``) into another network than the one it was written from.

    A resumed run rebuilds its network from the settings it is given. Different settings (another
    base, dropout ticked or unticked, another dropout probability) give other layers. The weights
    would then fail to load with torch's key list, or load into a network the stopped run never
    trained. Checkpoints written before the architecture was recorded are not checked here."""
    written = json.loads((folder / "state.json").read_text()).get("network")
    if written is None:
        return
    wanted = network_description(name, config)
    if written == wanted:
        return
    if written["name"] != wanted["name"]:
        before, now = f"a {written['name']} network", f"a {wanted['name']} network"
    else:
        keys = sorted(k for k in {*written["config"], *wanted["config"]} if written["config"].get(k) != wanted["config"].get(k))
        before = ", ".join(f"{k}={written['config'].get(k)!r}" for k in keys)
        now = ", ".join(f"{k}={wanted['config'].get(k)!r}" for k in keys)
    raise ConfigError(
        "the stopped run trained another network than this run's settings build",
        subject=folder.parent,
        expected=f"the stopped run's network: {before}",
        found=now,
        hint="Resume with the stopped run's settings (the same base model and dropout), or start without resuming"
        " (untick Resume in the panel; leave out --resume) to train anew.",
    )


def check_same_run(folder: Path, run: dict[str, Any], config: dict[str, Any], stored_as: str | None = None) -> None:
    """Refuse to resume from ``folder`` (``last/``) a run that finished and was stored, or one started with another
    base version, dataset, training or validation cases (their ids, and their contents by the ``*_case_digests``),
    device type or new model name than ``run`` (as ``state.json`` stores it under ``run``), or other
    settings than ``config`` (``to_dict`` of the run's config, as ``state.json`` stores it under ``config``).

    A run counts as stored when :func:`mark_stored` recorded it, or when ``stored_as`` names the version the store
    holds from it (a kill between storing and recording leaves only that). Resuming continues the stopped run
    exactly; with other settings or other data it would store a version that neither run describes (a finished
    run resumed stores its weights again as a new version). Checkpoints written before the run, or before the
    cases' digests, were recorded are not checked for what they lack."""
    state = json.loads((folder / "state.json").read_text())
    stored = state.get("stored_as") or stored_as
    if stored:
        raise ConfigError(
            f"the run in this checkpoint folder finished and was stored as {stored}: there is nothing to resume",
            subject=folder.parent,
            hint=f"{stored} is in the model store (compare, promote or roll back it there). Start without resuming"
            " (untick Resume in the panel; leave out --resume) to train anew.",
        )
    if state.get("run") is None:
        return
    # what a checkpoint written before a run entry was recorded lacks is not compared
    written = {**state["run"], "config": state.get("config")}
    wanted = json.loads(json.dumps({**{key: value for key, value in run.items() if key in state["run"]}, "config": config}))
    changed_cases: list[str] = []
    for digests in ("training_case_digests", "validation_case_digests"):
        written_digests, wanted_digests = written.pop(digests, None) or {}, wanted.pop(digests, None) or {}
        # a case the other run lacks is reported by training_cases / validation_cases; here only cases both have
        changed_cases += sorted(
            case for case, digest in written_digests.items() if case in wanted_digests and wanted_digests[case] != digest
        )
    before, now = _flat(written), _flat(wanted)
    differing = [key for key in sorted({*before, *now}) if before.get(key) != now.get(key)]
    if not differing and not changed_cases:
        return
    expected = [_setting(key, before.get(key), now.get(key)) for key in differing]
    found = [_setting(key, now.get(key), before.get(key)) for key in differing]
    if changed_cases:
        listed = ", ".join(changed_cases[:5]) + (", ..." if len(changed_cases) > 5 else "")
        expected.append(f"case(s) {listed} as they were when it started")
        found.append(f"{listed} replaced or edited since (image or labels differ)")
    raise ConfigError(
        "the stopped run was started with other settings than this run's"
        if differing
        else "the stopped run's cases changed since it started",
        subject=folder.parent,
        expected="the stopped run's: " + "; ".join(expected),
        found="; ".join(found),
        hint="Resume with the stopped run's settings (the same base version, dataset cases, device and training settings),"
        " or start without resuming (untick Resume in the panel; leave out --resume) to train anew"
        + (" on the corrected cases." if changed_cases else "."),
    )


def run_id_of(folder: Path) -> str | None:
    """The training run id that ``folder/state.json`` (``last/``) records, or None (none there, or written before
    run ids were recorded). The stored version's card records the same id (``metrics.training.run_id``)."""
    try:
        return json.loads((folder / "state.json").read_text()).get("run_id")
    except (OSError, ValueError):
        return None


def _setting(key: str, value: Any, other: Any) -> str:
    """``key=value``; a list (the training cases) as its length and what it has that ``other`` lacks."""
    if isinstance(value, list) and isinstance(other, list):
        extra = [item for item in value if item not in other]
        return f"{key}: {len(value)}" + (
            f" ({', '.join(map(str, extra[:5]))}{', ...' if len(extra) > 5 else ''} not in the other)" if extra else ""
        )
    return f"{key}={value!r}"


def _flat(run: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in run.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def mark_stored(folder: Path, ref: str) -> None:
    """Record in ``folder/state.json`` (``last/``) that the run's version was stored as ``ref``, so that a resume
    does not store it a second time (:func:`check_same_run`). Best effort: the version is stored either way."""
    path = folder / "state.json"
    try:
        state = json.loads(path.read_text())
        atomic_write_text(path, json.dumps({**state, "stored_as": ref}, indent=1))
    except (OSError, ValueError, DeepSegError) as exc:
        log.warning("could not record in %s that the run was stored as %s (%s)", path, ref, exc)


def check_resumable(folder: Path, rank: int, world: int) -> None:
    """Refuse to resume from ``folder`` (``last/``) when it is missing or from another world size.

    Rank 0 first puts back a checkpoint a kill left half-swapped; the others wait for it.
    """
    if rank == 0:
        recover_checkpoint(folder)
        if (folder / "state.json").exists():
            recover_checkpoint(folder.with_name("best"), json.loads((folder / "state.json").read_text()))
    if world > 1:
        torch.distributed.barrier()
    if not (folder / "state.json").exists():
        raise ConfigError("nothing to resume", subject=folder.parent, expected="last/state.json", hint="Start without --resume.")
    written_by = int(json.loads((folder / "state.json").read_text()).get("world_size", 1))
    if written_by != world:
        raise ConfigError(
            "the checkpoint was written by a run with another number of processes, so its per-process random "
            "states (patch draws, augmentation, dropout) cannot be handed out",
            subject=folder.parent,
            expected=f"{written_by} process(es) (WORLD_SIZE), as in the run that wrote it",
            found=f"{world} process(es)",
            hint=f"Resume with {written_by} process(es) in all (nodes x --nproc_per_node of torchrun), or start a new run"
            " without --resume (or in another --checkpoints folder).",
        )


def random_state(rng: np.random.Generator, device: torch.device) -> dict[str, Any]:
    """This process's random state as JSON data: the numpy generator that draws patches and their
    augmentation, torch's CPU generator (and the CUDA one of ``device``; dropout), Python ``random``."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "numpy": rng.bit_generator.state,
        "torch_cpu": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode("ascii"),
        "python": [version, list(internal), gauss],
    }
    if device.type == "cuda":
        state["torch_cuda"] = base64.b64encode(torch.cuda.get_rng_state(device).numpy().tobytes()).decode("ascii")
    return state


def set_random_state(state: dict[str, Any], rng: np.random.Generator, device: torch.device) -> None:
    """Inverse of :func:`random_state`."""

    def as_tensor(text: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)

    rng.bit_generator.state = state["numpy"]
    torch.set_rng_state(as_tensor(state["torch_cpu"]))
    if device.type == "cuda" and "torch_cuda" in state:
        torch.cuda.set_rng_state(as_tensor(state["torch_cuda"]), device)
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def restore_random_state(folder: Path, state: dict[str, Any], rank: int, rng: np.random.Generator, device: torch.device) -> None:
    """Restore this rank's own random state from checkpoint ``folder`` (``state``: its state.json)."""
    path = folder / RANK_STATES / f"rank-{rank}.json"
    if path.exists():
        set_random_state(json.loads(path.read_text()), rng, device)
    elif "numpy_rng" in state and "legacy_torch_rng" in state:  # written before per-rank states (one process)
        rng.bit_generator.state = state["numpy_rng"]
        torch.set_rng_state(state["legacy_torch_rng"])
    else:
        raise ConfigError(
            f"the checkpoint lacks the random state of process {rank}", subject=path, hint="Start without --resume."
        )


def gather_random_states(rng: np.random.Generator, device: torch.device, rank: int, world: int) -> list[dict[str, Any]]:
    """Every rank's :func:`random_state`, index = rank, on rank 0 (an empty list elsewhere).

    A collective: every rank must call it. The states travel as JSON bytes in a uint8 tensor
    (padded to the longest), so nothing is pickled.
    """
    own = random_state(rng, device)
    if world == 1:
        return [own]
    # NCCL moves only CUDA tensors; gloo only CPU ones
    where = device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
    payload = torch.frombuffer(bytearray(json.dumps(own).encode()), dtype=torch.uint8).to(where)
    size = torch.tensor([payload.numel()], dtype=torch.int64, device=where)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    torch.distributed.all_gather(sizes, size)
    padded = torch.zeros(int(max(int(s) for s in sizes)), dtype=torch.uint8, device=where)
    padded[: payload.numel()] = payload
    gathered = [torch.zeros_like(padded) for _ in range(world)]
    torch.distributed.all_gather(gathered, padded)
    if rank != 0:
        return []
    return [json.loads(bytes(g[: int(s)].cpu().numpy())) for g, s in zip(gathered, sizes, strict=True)]


def any_rank(flag: bool, device: torch.device, world: int) -> bool:
    """True on every rank when ``flag`` is True on any (so all ranks stop after the same epoch)."""
    if world == 1:
        return flag
    where = device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
    value = torch.tensor([int(flag)], dtype=torch.int64, device=where)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())
