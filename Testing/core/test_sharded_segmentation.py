"""Batch segmentation across ranks: `torchrun --nproc_per_node 2 -m deepseg_core segment in/ --output out/`
with gloo on CPU, a rank killed mid-run, and the rerun that finishes only what is missing."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
from model_fixtures import tiny_model_folder

from deepseg_core import io
from deepseg_core.batch import shard
from deepseg_core.phantoms import generate_phantom

REPO = Path(__file__).resolve().parents[2]
CASES = ["case0", "case1", "case2", "case3", "case4"]


def torchrun_segment(inputs: Path, output: Path, model: Path, **env_extra: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    env = dict(os.environ, PYTHONPATH=str(REPO / "DeepSeg"), OMP_NUM_THREADS="1", **env_extra)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "deepseg_core"]
    command += ["segment", str(inputs), "--model", str(model), "--output", str(output), "--device", "cpu", "--json"]
    command += ["--backend", "torch", "--stats", str(output)]
    # UTF-8 whatever the locale: when a rank is killed, gloo's "Connection closed by peer" line ends in an
    # emoji, which a C/POSIX locale (as on CI) cannot decode
    done = subprocess.run(command, capture_output=True, encoding="utf-8", errors="replace", env=env, timeout=600, check=False)
    return done, [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def test_shards_are_disjoint_and_complete():
    assert shard(CASES, 0, 2) == ["case0", "case2", "case4"] and shard(CASES, 1, 2) == ["case1", "case3"]
    assert sorted(shard(CASES, 0, 3) + shard(CASES, 1, 3) + shard(CASES, 2, 3)) == CASES


def test_two_ranks_share_the_cases_a_killed_rank_is_finished_by_the_rerun_and_rank_0_writes_one_summary(tmp_path):
    model = tiny_model_folder(tmp_path / "model")
    inputs = tmp_path / "in"
    inputs.mkdir()
    for index, name in enumerate(CASES):
        phantom = generate_phantom(seed=40 + index, shape_zyx=(16, 32, 32), spacing_xyz_mm=(1.5, 1.5, 2.5))
        io.write_image(phantom.image, inputs / f"{name}.nrrd")
    (inputs / "case5.nrrd").write_bytes(b"NRRD0004\nbroken")  # a bad case is reported; the rest go on
    out = tmp_path / "out"

    # Rank 1 dies (SIGKILL) right after its first case's files were renamed into place.
    killed, events = torchrun_segment(inputs, out, model, DEEPSEG_CRASH_AT="renamed", DEEPSEG_CRASH_RANK="1")
    assert killed.returncode != 0
    assert not (out / "deepseg_summary.json").exists(), "no summary from a run that lost a rank"

    rerun, events = torchrun_segment(inputs, out, model)
    assert rerun.returncode != 0, "the broken case still fails (exit 2)"
    skipped = {e["case"] for e in events if e["event"] == "case_skipped"}
    done = {e["case"] for e in events if e["event"] == "case_done"}
    what_happened = f"events {[(e['event'], e.get('case'), e.get('rank')) for e in events]}; stderr: {rerun.stderr[-3000:]}"
    assert skipped and skipped.isdisjoint(done) and skipped | done == set(CASES), what_happened
    assert [e["case"] for e in events if e["event"] == "case_failed"] == ["case5"]
    summary = json.loads((out / "deepseg_summary.json").read_text())
    assert [e for e in events if e["event"] == "summary"] == [
        {"event": "summary", "path": str(out / "deepseg_summary.json"), "cases": 6, "done": 5, "failed": 1, "missing": 0}
    ]
    by_case = {row["case"]: row for row in summary["results"]}
    assert {name: by_case[name]["rank"] for name in CASES} == {name: i % 2 for i, name in enumerate(CASES)}
    assert by_case["case5"]["status"] == "failed" and "cannot be read" in by_case["case5"]["error"]
    assert all(by_case[name]["segments"][0]["name"] == "liver" for name in CASES)
    csv_rows = (out / "deepseg_summary.csv").read_text().splitlines()
    assert csv_rows[0].startswith("case,status,rank,seconds,domain_check,backend,liver [ml],liver lesion [ml]")
    assert len(csv_rows) == 1 + 6
    for name in CASES:  # every case's outputs are there and readable, none twice, no debris
        labels = io.read_segmentation(out / f"{name}.seg.nrrd")
        assert labels.grid.shape_zyx == (16, 32, 32) and (out / f"{name}_stats.csv").is_file()
    assert not [p for p in out.iterdir() if p.name.startswith((".deepseg-staging-", ".deepseg-commit-"))]
    liver_ml = [by_case[n]["segments"][0]["ml"] for n in CASES]
    assert np.all(np.isfinite(liver_ml))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_nodes_of_one_rank_each_share_the_cases_by_global_rank_and_node_0_writes_the_summary(tmp_path):
    """`torchrun --nnodes 2 --node_rank K --nproc_per_node 1 ...` on each node (two here, on loopback, as two
    machines sharing the output folder would run it): each process's LOCAL_RANK is 0, so a shard taken by
    the local rank would do every case twice and leave the other half to no one."""
    model = tiny_model_folder(tmp_path / "model")
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    names = CASES[:4]
    for index, name in enumerate(names):
        phantom = generate_phantom(seed=60 + index, shape_zyx=(16, 32, 32), spacing_xyz_mm=(1.5, 1.5, 2.5))
        io.write_image(phantom.image, inputs / f"{name}.nrrd")
    env = dict(os.environ, PYTHONPATH=str(REPO / "DeepSeg"), OMP_NUM_THREADS="1")
    port = free_port()
    nodes = []
    for node_rank in (0, 1):
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node_rank)]
        command += ["--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "deepseg_core"]
        command += ["segment", str(inputs), "--model", str(model), "--output", str(out), "--device", "cpu", "--json"]
        command += ["--backend", "torch"]
        nodes.append(
            subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, encoding="utf-8", errors="replace", env=env)
        )
    finished = [node.communicate(timeout=600) for node in nodes]
    events = [[json.loads(line) for line in stdout.splitlines() if line.startswith("{")] for stdout, _ in finished]
    what_happened = f"exit codes {[node.returncode for node in nodes]}; stderr: {[stderr[-2000:] for _, stderr in finished]}"
    assert [node.returncode for node in nodes] == [0, 0], what_happened
    done_by_node = [[e["case"] for e in node_events if e["event"] == "case_done"] for node_events in events]
    assert done_by_node == [names[0::2], names[1::2]], what_happened
    assert [e["rank"] for e in events[1] if e["event"] == "start"] == [1]
    assert [e["event"] for e in events[1] if e["event"] == "summary"] == [], "only global rank 0 writes the summary"
    summary = json.loads((out / "deepseg_summary.json").read_text())
    assert {row["case"]: (row["status"], row["rank"]) for row in summary["results"]} == {
        name: ("done", index % 2) for index, name in enumerate(names)
    }
    for name in names:
        assert io.read_segmentation(out / f"{name}.seg.nrrd").grid.shape_zyx == (16, 32, 32)
