"""``deepseg segment`` and ``deepseg models`` end to end: real files, real subprocesses, exit codes."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from model_fixtures import tiny_model_folder

from deepseg_core import events, host_memory, io, phantoms
from deepseg_core.cli import EXIT_CANCELLED, EXIT_INPUT, EXIT_MODEL, EXIT_OK, main
from deepseg_core.errors import ImageError
from deepseg_core.fileutil import exclusive_lock
from deepseg_core.inference import Segmenter, SegmentOptions
from deepseg_core.inference.backends import installed, native_bfloat16
from deepseg_core.inference.predictor import preparing_message
from deepseg_core.model_store import ModelStore

REPO = Path(__file__).resolve().parents[2]


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "deepseg_core", *args],
        capture_output=True,
        text=True,
        cwd=REPO / "DeepSeg",
        env={**os.environ, **(env or {})},
    )


def write_case(path: Path, seed: int = 1, shape=(12, 24, 24)) -> Path:
    case = phantoms.generate_phantom(
        seed=seed, shape_zyx=shape, spacing_xyz_mm=(1.5, 1.5, 2.5), n_lesions=2, origin_lps=(5.0, -7.0, 11.0)
    )
    return io.write_image(case.image, path)


def test_segment_one_case_to_seg_nrrd(tmp_path, capsys):
    model = tiny_model_folder(tmp_path / "model")
    image = write_case(tmp_path / "case.nrrd")
    out = tmp_path / "case.seg.nrrd"
    assert main(["segment", str(image), "--model", str(model), "--output", str(out)]) == EXIT_OK
    assert "liver lesion" in capsys.readouterr().out
    seg = io.read_segmentation(out)
    assert [s.name for s in seg.segments] == ["liver", "liver lesion"]
    assert seg.segment("liver").color_rgb == tuple(float(c) for c in phantoms.PHANTOM_LABELS[0].color)
    assert seg.segment("liver").terminology["type"][1] == "10200004"
    assert seg.grid.same_grid(io.read_image(image))


def test_json_events(tmp_path):
    model = tiny_model_folder(tmp_path / "model")
    image = write_case(tmp_path / "case.nrrd")
    result = cli("segment", str(image), "--model", str(model), "--output", str(tmp_path / "o.seg.nrrd"), "--json")
    assert result.returncode == EXIT_OK, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-2:] == ["case_done", "done"]
    progress = [e for e in events if e["event"] == "progress"]
    assert progress and progress[-1]["done"] == progress[-1]["total"] and "eta_s" in progress[0]
    done = events[-2]
    assert {s["name"] for s in done["segments"]} == {"liver", "liver lesion"} and done["seconds"] > 0
    assert done["precision"] == "float32"


def test_precision_reaches_the_run_and_a_contradiction_is_refused(tmp_path, capsys):
    model = tiny_model_folder(tmp_path / "model")
    image = write_case(tmp_path / "case.nrrd")
    out = tmp_path / "o.seg.nrrd"
    refused = ["segment", str(image), "--model", str(model), "--output", str(out), "--backend", "onnxruntime"]
    assert main([*refused, "--precision", "bfloat16"]) == EXIT_INPUT
    error = capsys.readouterr().err
    assert "ONNX Runtime's CPU provider has no bfloat16" in error and "--precision float32" in error
    assert not out.exists()
    command = ["segment", str(image), "--model", str(model), "--output", str(out), "--backend", "torch"]
    assert main([*command, "--precision", "bfloat16", "--device", "cpu", "--json"]) == EXIT_OK
    done = [json.loads(line) for line in capsys.readouterr().out.splitlines()][-2]
    assert done["backend"] == "torch" and done["precision"] == ("bfloat16" if native_bfloat16() else "float32")


def test_batch_continues_past_a_bad_case(tmp_path):
    model = tiny_model_folder(tmp_path / "model")
    inputs = tmp_path / "in"
    inputs.mkdir()
    write_case(inputs / "a.nrrd", 1)
    write_case(inputs / "c.nii.gz", 2)
    (inputs / "b.nrrd").write_bytes(b"NRRD0004\ngarbage")
    result = cli("segment", str(inputs), "--model", str(model), "--output", str(tmp_path / "out"), "--json")
    assert result.returncode == EXIT_INPUT
    events = [json.loads(line) for line in result.stdout.splitlines()]
    failed = [e for e in events if e["event"] == "case_failed"]
    assert [e["case"] for e in failed] == ["b"] and "cannot be read" in failed[0]["error"]
    assert events[-1] == {"event": "done", "ok": 2, "failed": 1}
    visible = sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith("."))
    assert visible == [
        "a.deepseg.json",
        "a.seg.nrrd",
        "c.deepseg.json",
        "c.seg.nrrd",
        "deepseg_summary.csv",
        "deepseg_summary.json",
    ]
    summary = json.loads((tmp_path / "out" / "deepseg_summary.json").read_text())
    assert (summary["cases"], summary["done"], summary["failed"], summary["missing"]) == (3, 2, 1, 0)
    assert [(r["case"], r["status"]) for r in summary["results"]] == [("a", "done"), ("b", "failed"), ("c", "done")]
    assert "cannot be read" in summary["results"][1]["error"]


def test_labelmap_instances_and_probabilities(tmp_path, capsys):
    model = tiny_model_folder(tmp_path / "model")
    image = write_case(tmp_path / "case.nrrd")
    out = tmp_path / "labels.nii.gz"
    probs = tmp_path / "probs.nii.gz"
    code = main(
        [
            "segment",
            str(image),
            "--model",
            str(model),
            "--output",
            str(out),
            "--instances",
            "--min-instance-mm3",
            "0",
            "--probabilities",
            str(probs),
        ]
    )
    assert code == EXIT_OK
    labels = io.read_image(out)
    assert labels.same_grid(io.read_image(image), tolerance_mm=1e-4)
    instances = io.read_image(tmp_path / "labels_instances.nii.gz")
    np.testing.assert_array_equal(instances.array_zyx > 0, labels.array_zyx == 2)
    p = sitk.ReadImage(str(probs))
    assert p.GetDimension() == 4 and p.GetSize()[3] == 3


def test_instances_become_separate_segments(tmp_path):
    model = tiny_model_folder(tmp_path / "model")
    image = write_case(tmp_path / "case.nrrd")
    out = tmp_path / "case.seg.nrrd"
    assert (
        main(["segment", str(image), "--model", str(model), "--output", str(out), "--instances", "--min-instance-mm3", "0"]) == 0
    )
    names = [s.name for s in io.read_segmentation(out).segments]
    assert names[0] == "liver" and all(n.startswith("liver lesion ") for n in names[1:])


def test_model_problems_exit_3(tmp_path):
    image = write_case(tmp_path / "case.nrrd")
    result = cli(
        "segment",
        str(image),
        "--model",
        "no-such-model",
        "--output",
        str(tmp_path / "o.seg.nrrd"),
        "--models-dir",
        str(tmp_path / "store"),
    )
    assert result.returncode == EXIT_MODEL and "unknown model 'no-such-model'" in result.stderr
    model = tiny_model_folder(tmp_path / "model")
    weights = model / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    result = cli("segment", str(image), "--model", str(model), "--output", str(tmp_path / "o.seg.nrrd"))
    assert result.returncode == EXIT_MODEL and "checksum mismatch" in result.stderr
    assert not (tmp_path / "o.seg.nrrd").exists()


@pytest.mark.parametrize("edit", ["features", "architecture"])
def test_a_model_whose_network_cannot_be_built_exits_3_before_any_case(tmp_path, capsys, edit):
    # the network is built when a run first needs it (a run whose graph is cached never does), but a run that
    # will need it builds it before its first case, as a run built it at load before
    model = tiny_model_folder(tmp_path / "model")
    card = json.loads((model / "model.json").read_text())
    if edit == "features":
        card["architecture"]["config"]["features"] = [4, 16]
    else:
        card["architecture"]["name"] = "resnet"
    (model / "model.json").write_text(json.dumps(card))  # the weights and their checksum stay as they are
    inputs = tmp_path / "in"
    inputs.mkdir()
    for seed in (1, 2):
        write_case(inputs / f"case{seed}.nrrd", seed=seed)
    out = tmp_path / "out"
    assert main(["segment", str(inputs), "--model", str(model), "--output", str(out), "--json"]) == EXIT_MODEL
    printed = capsys.readouterr()
    expected = "weights do not fit the architecture in the card" if edit == "features" else "unknown network architecture"
    assert expected in printed.err
    assert printed.out == "" and not (out.exists() and any(out.iterdir()))


def test_bad_output_path_exit_2_and_nothing_written(tmp_path):
    model = tiny_model_folder(tmp_path / "model")
    image = write_case(tmp_path / "case.nrrd")
    result = cli("segment", str(image), "--model", str(model), "--output", str(tmp_path / "missing" / "o.seg.nrrd"))
    assert result.returncode == EXIT_INPUT and "output folder does not exist" in result.stderr
    result = cli("segment", str(image), "--model", str(model), "--output", str(tmp_path / "o.png"))
    assert result.returncode == EXIT_INPUT and "unsupported output file type" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case.nrrd", "model"]


def test_cancel_by_sigterm_exits_130_and_writes_nothing(tmp_path):
    model = tiny_model_folder(tmp_path / "model")
    image = write_case(tmp_path / "big.nrrd", shape=(64, 160, 160))
    out = tmp_path / "big.seg.nrrd"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "deepseg_core",
            "segment",
            str(image),
            "--model",
            str(model),
            "--output",
            str(out),
            "--json",
            "--tta",
            "--batch-size",
            "1",
        ],
        cwd=REPO / "DeepSeg",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 60
    for line in process.stdout:
        if json.loads(line)["event"] == "progress" or time.time() > deadline:
            break
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == EXIT_CANCELLED, stderr
    assert "cancelled" in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.nrrd", "model"]


def test_models_commands(tmp_path, capsys):
    store = tmp_path / "store"
    model = tiny_model_folder(tmp_path / "model")
    assert main(["models", "import", str(model), "--models-dir", str(store), "--json"]) == EXIT_OK
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    if torch.cuda.is_available():  # PyTorch runs it there: nothing to prepare
        assert [e["event"] for e in events] == ["imported"]
        return
    assert [e["event"] for e in events] == ["imported", "status", "prepared"]
    # the network is exported and compiled for this computer's CPU runtime at import, not at the first run
    (stage,) = events[-1]["stages"]
    assert stage["backend"] == "openvino" and stage["exported"] is True
    graphs = sorted((store / ".cache" / "compiled").glob("*.onnx"))
    assert len(graphs) == 1
    # a 2.5D model's tiles carry its neighbour slices as channels: the graph prepared is the one a run needs
    context = tiny_model_folder(tmp_path / "context", name="context", arch="2.5d")
    assert main(["models", "import", str(context), "--models-dir", str(store)]) == EXIT_OK
    assert capsys.readouterr().out.splitlines()[-1].startswith("prepared context:1 for openvino")
    # the same weights again (another model built alike): prepared already, so no "Preparing" line
    again = tiny_model_folder(tmp_path / "again", name="again")
    assert main(["models", "import", str(again), "--models-dir", str(store), "--json"]) == EXIT_OK
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["event"] for e in events] == ["imported", "prepared"] and events[-1]["stages"][0]["exported"] is False
    for ref in ("tiny:1", "context:1"):
        segmenter = Segmenter.load(ref, device="cpu", store=ModelStore(store))
        channels = segmenter.pipeline.network_input_channels
        assert not segmenter.will_export(SegmentOptions(), channels)
        assert channels == segmenter.pipeline.prepare([io.read_image(write_case(tmp_path / "case.nrrd"))]).image_czyx.shape[0]
    graphs = sorted((store / ".cache" / "compiled").glob("*.onnx"))
    plain = tiny_model_folder(tmp_path / "plain", name="plain", arch="2d")
    assert main(["models", "import", str(plain), "--models-dir", str(store), "--no-prepare"]) == EXIT_OK
    assert capsys.readouterr().out.strip() == f"imported plain:1 into {store}"
    assert sorted((store / ".cache" / "compiled").glob("*.onnx")) == graphs, "--no-prepare exports nothing"
    assert main(["models", "list", "--models-dir", str(store), "--json"]) == EXIT_OK
    capsys.readouterr()
    main(["models", "list", "--models-dir", str(store), "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert {(r["name"], r["version"], r["active"]) for r in rows} >= {("tiny", 1, True)}
    assert main(["models", "show", "tiny:1", "--models-dir", str(store)]) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["labels"][1]["name"] == "liver lesion"
    assert main(["models", "rollback", "tiny", "--models-dir", str(store)]) == EXIT_MODEL
    assert "nothing to roll back" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="PyTorch runs it on CUDA: nothing is prepared")
def test_cancel_while_an_import_prepares_keeps_the_import_and_says_so(tmp_path, capsys, monkeypatch):
    """The panel's Cancel (SIGTERM) can land while the imported network is exported for this computer: the
    import stays, the half-written graph goes, and the cancel is not taken for a network that cannot export."""
    not_interrupted = []

    def cancelled_while_exporting(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)  # the CLI's handler interrupts this sleep
        not_interrupted.append(True)

    monkeypatch.setattr(torch.onnx, "export", cancelled_while_exporting)
    store = tmp_path / "store"
    model = tiny_model_folder(tmp_path / "model")
    handler_before = signal.getsignal(signal.SIGTERM)
    assert main(["models", "import", str(model), "--models-dir", str(store), "--json"]) == EXIT_CANCELLED
    assert signal.getsignal(signal.SIGTERM) is handler_before and not not_interrupted
    out, err = capsys.readouterr()
    assert [json.loads(line)["event"] for line in out.splitlines()] == ["imported", "status"]
    assert "cancelled: tiny:1 is imported; its network was not prepared (its first run will)" in err
    assert [(row["name"], row["version"], row["active"]) for row in ModelStore(store).list()] == [("tiny", 1, True)]
    leftovers = [p.name for p in (store / ".cache" / "compiled").iterdir() if p.is_file()]
    assert leftovers == [], "no graph, no temporary graph, no failure record"


def test_a_cancel_after_the_import_was_prepared_is_not_reported_as_unprepared(tmp_path, capsys, monkeypatch):
    """A Cancel (a real SIGTERM) that lands once the network is prepared, before the engine says so: the
    work is complete, so the engine says that and ends with 0, and the graph stays in the cache."""
    real_to_json_line = events.to_json_line
    not_interrupted = []

    def cancelled_once_prepared(event: dict) -> str:
        if event["event"] == "prepared":  # the network is exported and compiled: only saying so is left
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)  # the CLI's handler interrupts this sleep
            not_interrupted.append(True)
        return real_to_json_line(event)

    monkeypatch.setattr(events, "to_json_line", cancelled_once_prepared)
    store = tmp_path / "store"
    model = tiny_model_folder(tmp_path / "model")
    assert main(["models", "import", str(model), "--models-dir", str(store), "--json"]) == EXIT_OK
    assert not not_interrupted
    out, err = capsys.readouterr()
    assert [json.loads(line)["event"] for line in out.splitlines()] == ["imported", "status"]
    assert "cancelled after tiny:1 was imported and prepared: nothing was left undone" in err
    assert "not prepared" not in err
    assert any(p.suffix == ".onnx" for p in (store / ".cache" / "compiled").rglob("*")), "the prepared graph stays"


def test_a_run_that_must_export_its_network_says_so_before_its_progress(tmp_path, capsys):
    model = tiny_model_folder(tmp_path / "model")
    image = write_case(tmp_path / "case.nrrd")
    args = ["segment", str(image), "--model", str(model), "--models-dir", str(tmp_path / "store")]
    args += ["--backend", "onnxruntime", "--device", "cpu", "--json"]
    kinds = []
    for run in ("first", "second"):
        assert main([*args, "--output", str(tmp_path / f"{run}.seg.nrrd")]) == EXIT_OK
        events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        kinds.append([e["event"] for e in events if e["event"] in ("status", "progress")])
        if run == "first":
            assert "onnxruntime" in next(e["message"] for e in events if e["event"] == "status")
    assert kinds[0][0] == "status" and kinds[0].count("status") == 1 and "progress" in kinds[0]
    assert "status" not in kinds[1], "the graph is cached: nothing to say"


@pytest.mark.skipif(not installed("onnxruntime"), reason="ONNX Runtime not installed")
def _graph_locks_after_a_first_run(tmp_path: Path, capsys) -> tuple[list[str], list[Path]]:
    """Segment arguments for the tiny model through ONNX Runtime (``--json``, no ``--output``), after one run
    that exported its graph, and the lock files that run's lookups took."""
    model = tiny_model_folder(tmp_path / "model")
    image = write_case(tmp_path / "case.nrrd")
    store = tmp_path / "store"
    args = ["segment", str(image), "--model", str(model), "--models-dir", str(store)]
    args += ["--backend", "onnxruntime", "--device", "cpu", "--json"]
    assert main([*args, "--output", str(tmp_path / "first.seg.nrrd")]) == EXIT_OK
    capsys.readouterr()
    locks = sorted((store / ".cache" / "compiled" / "locks").glob("*.lock"))
    assert locks, "the graph's lookup took a lock"
    return args, locks


def _start_run_and_read_until_it_waits(args: list[str], output: Path) -> tuple[subprocess.Popen, list[dict]]:
    """``deepseg segment`` in its own process, and its JSON events up to its status line saying it waits (or
    the end of its output)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "deepseg_core", *args, "--output", str(output)],
        cwd=REPO / "DeepSeg",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    said = []
    watchdog = threading.Timer(60, process.kill)  # a run that never says so would wait for the lock forever
    watchdog.start()
    for line in process.stdout:  # the status line says why the progress stands still
        said.append(json.loads(line))
        if said[-1]["event"] == "status" and said[-1]["message"].startswith("Waiting"):
            break
    watchdog.cancel()
    return process, said


WAITING = {
    "event": "status",
    "case": "case",
    "message": "Waiting for another DeepSeg run that is preparing this network for onnxruntime...",
}


def test_a_run_waiting_for_another_process_preparing_its_network_can_be_cancelled_then_uses_its_graph(tmp_path, capsys):
    """A run whose graph another process is preparing (a torchrun rank, a training preparing the version) waits
    for it: a Cancel (a real SIGTERM) ends that wait with exit 130 and nothing written, and once the lock is free
    the next run finds the graph cached."""
    args, locks = _graph_locks_after_a_first_run(tmp_path, capsys)
    with contextlib.ExitStack() as held:
        for lock in locks:  # as the process preparing the graph holds it
            assert held.enter_context(exclusive_lock(lock))
        process, said = _start_run_and_read_until_it_waits(args, tmp_path / "waited.seg.nrrd")
        assert [event for event in said if event["event"] == "status"] == [WAITING], said  # cached: nothing else
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == EXIT_CANCELLED, stderr
    assert "cancelled" in stderr
    assert not (tmp_path / "waited.seg.nrrd").exists()
    assert main([*args, "--output", str(tmp_path / "second.seg.nrrd")]) == EXIT_OK
    kinds = [json.loads(line)["event"] for line in capsys.readouterr().out.splitlines()]
    assert "status" not in kinds and (tmp_path / "second.seg.nrrd").is_file(), "the graph is cached: nothing to say"


def test_a_run_whose_wait_ends_without_the_graph_says_it_prepares_the_network_itself(tmp_path, capsys):
    """The process waited for can be killed, or its export fail, before the graph is written: the waiting run
    then prepares the network itself, and its status line says so instead of still waiting."""
    args, locks = _graph_locks_after_a_first_run(tmp_path, capsys)
    compiled = locks[0].parent.parent
    for graph in compiled.iterdir():  # the graph was never finished
        if graph.is_file():
            graph.unlink()
    with contextlib.ExitStack() as held:
        for lock in locks:
            assert held.enter_context(exclusive_lock(lock))
        process, said = _start_run_and_read_until_it_waits(args, tmp_path / "waited.seg.nrrd")
        preparing = {**WAITING, "message": preparing_message("onnxruntime")}
        # not cached: it says it prepares the network, then that it waits for the process already doing so
        assert [event for event in said if event["event"] == "status"] == [preparing, WAITING], said
    # the holder went away without the graph
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == EXIT_OK, stderr
    statuses = [event["message"] for event in map(json.loads, stdout.splitlines()) if event["event"] == "status"]
    assert statuses[:1] == [preparing_message("onnxruntime")], statuses
    assert (tmp_path / "waited.seg.nrrd").is_file() and any(compiled.glob("*.onnx"))


def test_stats_of_a_multi_channel_model_measure_every_channel_under_its_name(tmp_path, capsys):
    """An MR model of two sequences: the table's intensity columns are per channel, titled with the card's channel
    names, each equal to numpy's over the written segmentation. Before, only the first channel was measured,
    under titles that did not say which channel it was."""
    from deepseg_core.measurements import read_measurements_csv

    model = tiny_model_folder(tmp_path / "model", channels=("T1", "T2"), modality="MR")
    phantom = io.read_image(write_case(tmp_path / "phantom.nrrd"))
    t1_image = phantom.with_array(phantom.array_zyx.astype(np.float32) + np.float32(1100.0))  # MR-like: no air at -1000
    t1 = io.write_image(t1_image, tmp_path / "t1.nrrd")
    t2 = io.write_image(t1_image.with_array(np.float32(5000.0) - 3.0 * t1_image.array_zyx), tmp_path / "t2.nrrd")
    out, stats = tmp_path / "o.seg.nrrd", tmp_path / "s.csv"
    assert main(["segment", f"{t1},{t2}", "--model", str(model), "--output", str(out), "--stats", str(stats)]) == EXIT_OK
    capsys.readouterr()
    header = stats.read_text().splitlines()[0].split(",")
    assert "Mean" not in header and header.index("Mean (T1)") < header.index("Mean (T2)")
    assert {f"Percentile 95 ({name})" for name in ("T1", "T2")} <= set(header)
    labels = io.read_segmentation(out).to_labelmap().array_zyx
    assert labels.shape == t1_image.shape_zyx
    rows = {row["segment"]: row for row in read_measurements_csv(stats)}
    measured = 0
    for value, name in ((1, "liver"), (2, "liver lesion")):
        inside = labels == value
        if not inside.any():
            assert rows[name]["intensity_mean (T1)"] == rows[name]["intensity_mean (T2)"] == ""
            continue
        measured += 1
        for channel, image in (("T1", t1_image), ("T2", io.read_image(t2))):
            voxels = image.array_zyx[inside].astype(np.float64)
            assert float(rows[name][f"intensity_mean ({channel})"]) == pytest.approx(voxels.mean(), rel=1e-5)
            assert float(rows[name][f"intensity_max ({channel})"]) == pytest.approx(voxels.max(), rel=1e-5)
    assert measured >= 1, "the random-weight model labelled nothing: the check compared empty rows only"


def test_uncertainty_stats_and_domain_check_from_the_cli(tmp_path):
    model = tiny_model_folder(tmp_path / "model")
    image = write_case(tmp_path / "case.nrrd")
    out, unc, stats = tmp_path / "o.seg.nrrd", tmp_path / "u.nrrd", tmp_path / "s.csv"
    result = cli(
        "segment", str(image), "--model", str(model), "--output", str(out), "--uncertainty", str(unc), "--stats", str(stats),
        "--instances", "--json",
    )  # fmt: skip
    assert result.returncode == EXIT_OK, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    check = next(e for e in events if e["event"] == "domain_check")
    assert check["verdict"] == "caution" and "no training-data fingerprint" in check["reasons"][0]
    done = next(e for e in events if e["event"] == "case_done")
    assert done["domain_check"] == "caution" and done["uncertainty"] == str(unc) and done["stats"] == str(stats)
    assert isinstance(done["tiles"], int) and done["tiles"] >= 1
    assert all("mean_entropy" in s and s["uncertain_ml"] >= 0 for s in done["segments"])
    u = io.read_image(unc)
    assert u.same_grid(io.read_image(image)) and 0.0 <= u.array_zyx.min() and u.array_zyx.max() <= 1.0
    rows = stats.read_text().splitlines()
    assert rows[0].startswith("Segment,Label value,Instance,Instance count,Number of voxels")
    assert rows[1].startswith("liver,1,0,") and any(r.startswith("liver lesion,2,0,") for r in rows[2:])


def test_batch_writes_one_uncertainty_map_and_table_per_case(tmp_path, capsys):
    model = tiny_model_folder(tmp_path / "model")
    inputs = tmp_path / "in"
    inputs.mkdir()
    for seed in (1, 2):
        write_case(inputs / f"case{seed}.nrrd", seed=seed)
    code = main(
        ["segment", str(inputs), "--model", str(model), "--output", str(tmp_path / "out"), "--uncertainty", str(tmp_path / "unc"),
         "--stats", str(tmp_path / "stats")]
    )  # fmt: skip
    assert code == EXIT_OK
    assert sorted(p.name for p in (tmp_path / "unc").iterdir()) == ["case1_uncertainty.nrrd", "case2_uncertainty.nrrd"]
    assert sorted(p.name for p in (tmp_path / "stats").iterdir()) == ["case1_stats.csv", "case2_stats.csv"]
    assert "Domain check: caution" in capsys.readouterr().out


def test_bad_side_outputs_are_refused_before_any_work(tmp_path):
    model = tiny_model_folder(tmp_path / "model")
    image = write_case(tmp_path / "case.nrrd")
    out = tmp_path / "o.seg.nrrd"
    bad_stats = cli("segment", str(image), "--model", str(model), "--output", str(out), "--stats", str(tmp_path / "s.txt"))
    assert bad_stats.returncode == EXIT_INPUT and "unsupported --stats file type" in bad_stats.stderr
    bad_unc = cli(
        "segment", str(image), "--model", str(model), "--output", str(out), "--uncertainty", str(tmp_path / "x" / "u.nrrd")
    )
    assert bad_unc.returncode == EXIT_INPUT and "output folder does not exist" in bad_unc.stderr
    mc = cli("segment", str(image), "--model", str(model), "--output", str(out), "--uncertainty", str(tmp_path / "u.nrrd"),
             "--uncertainty-method", "mc_dropout")  # fmt: skip
    assert mc.returncode != EXIT_OK and "no dropout layers" in mc.stderr and "--uncertainty-method tta" in mc.stderr
    assert not out.exists() and not (tmp_path / "u.nrrd").exists()


def test_an_output_over_an_input_image_is_refused_and_the_image_kept(tmp_path, capsys):
    model = tiny_model_folder(tmp_path / "model")
    image = write_case(tmp_path / "case.nrrd")
    before = image.read_bytes()
    runs = [
        ["--output", str(image)],  # the CT itself
        ["--output", str(tmp_path / "o.seg.nrrd"), "--uncertainty", str(tmp_path / "." / "case.nrrd")],
        ["--output", str(tmp_path), "--batch", "--format", ".nrrd"],  # a batch into the input folder
    ]
    for extra in runs:
        assert main(["segment", str(image), "--model", str(model), *extra]) == EXIT_INPUT
        err = capsys.readouterr().err
        assert "would overwrite an input image" in err and "case case" in err, err
    assert image.read_bytes() == before and not (tmp_path / "o.seg.nrrd").exists()


def test_a_batch_refuses_two_inputs_of_one_case_name_and_skips_segmentations(tmp_path, capsys):
    from deepseg_core.cli_segment import collect_cases

    folder = tmp_path / "in"
    folder.mkdir()
    write_case(folder / "a.nrrd")
    (folder / "a.seg.nrrd").write_bytes(b"an earlier result: never an input")
    assert [(case.name, case.channels) for case in collect_cases([str(folder)])] == [("a", (folder / "a.nrrd",))]
    only_segmentations = tmp_path / "corrections"
    only_segmentations.mkdir()
    (only_segmentations / "a.seg.nrrd").write_bytes(b"a correction")
    with pytest.raises(ImageError, match=r"holds segmentations only.*1 \.seg\.nrrd file\(s\)"):
        collect_cases([str(only_segmentations)])  # was taken as a DICOM series: "no DICOM files found"
    write_case(folder / "a.nii.gz")  # both would be written to OUT/a.seg.nrrd: one case silently lost
    model = tiny_model_folder(tmp_path / "model")
    assert main(["segment", str(folder), "--model", str(model), "--output", str(tmp_path / "out")]) == EXIT_INPUT
    assert "two inputs make the same case name 'a'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_two_cases_writing_one_file_and_bad_probability_paths_are_refused_before_any_work(tmp_path, capsys):
    from deepseg_core.cli_segment import collect_cases

    model = tiny_model_folder(tmp_path / "model")
    folder = tmp_path / "in"
    folder.mkdir()
    write_case(folder / "a.nrrd")
    write_case(folder / "a_instances.nrrd")  # case a's instance map would be case a_instances's segmentation
    args = ["segment", str(folder), "--model", str(model), "--output", str(tmp_path / "out"), "--format", ".nii.gz"]
    assert main([*args, "--instances"]) == EXIT_INPUT
    assert "two cases would write the same output file" in capsys.readouterr().err
    assert not any((tmp_path / "out").iterdir())
    image = folder / "a.nrrd"
    assert len(collect_cases([str(image), str(folder / "." / "a.nrrd")])) == 1  # the same file twice is one case
    out = tmp_path / "o.seg.nrrd"
    one_case = ["segment", str(image), "--model", str(model), "--output", str(out)]
    for probabilities, message in (
        ("p.txt", "unsupported --probabilities file type"),
        ("x/p.nrrd", "output folder does not exist"),
    ):
        assert main([*one_case, "--probabilities", str(tmp_path / probabilities)]) == EXIT_INPUT
        assert message in capsys.readouterr().err and not out.exists()


def test_a_batch_case_whose_output_is_a_folder_fails_before_its_work_and_the_rest_go_on(tmp_path):
    model = tiny_model_folder(tmp_path / "model")
    folder = tmp_path / "in"
    folder.mkdir()
    write_case(folder / "a.nrrd")
    write_case(folder / "b.nrrd", seed=2)
    out = tmp_path / "out"
    (out / "b.seg.nrrd").mkdir(parents=True)  # something in the way of case b's segmentation
    result = cli("segment", str(folder), "--model", str(model), "--output", str(out), "--json")
    assert result.returncode == EXIT_INPUT, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    of_b = [e["event"] for e in events if e.get("case") == "b"]
    assert of_b == ["case_failed"], of_b  # no domain check, no tiles: refused before segmenting
    failure = next(e for e in events if e["event"] == "case_failed")
    assert "is a folder, not an output file" in failure["error"] and "b.seg.nrrd" in failure["error"]
    assert (out / "a.seg.nrrd").is_file() and (out / "b.seg.nrrd").is_dir()
    summary = json.loads((out / "deepseg_summary.json").read_text())
    assert summary["done"] == 1 and summary["failed"] == 1


def test_probabilities_that_cannot_fit_in_memory_are_refused_before_any_work(tmp_path, capsys, monkeypatch):
    """Every class's probability on the input grid grows with both: a 118-class model on a 512 x 512 x 300 CT
    needs 102 GB while the file is written, and the out-of-memory killer would end the run silently after its
    minutes of work. The computer's available memory is the one thing a test cannot vary: it is replaced
    here by a figure 1 byte short of what this small case needs (a stand-in for a smaller computer)."""
    model = tiny_model_folder(tmp_path / "model")
    image = write_case(tmp_path / "case.nrrd")  # 12 x 24 x 24 voxels, 3 classes
    needed = host_memory.probabilities_bytes(3, 12 * 24 * 24)
    args = ["segment", str(image), "--model", str(model), "--output", str(tmp_path / "case.seg.nrrd"), "--json"]
    monkeypatch.setattr(host_memory, "available_bytes", lambda: needed - 1)
    assert main([*args, "--probabilities", str(tmp_path / "p.nii.gz")]) != EXIT_OK
    said = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert "progress" not in [e["event"] for e in said], "refused before the network ran"
    (error,) = [e["error"] for e in said if e["event"] == "case_failed"]
    assert "not enough memory to write the class probabilities" in error
    assert "for 3 classes on 24 x 24 x 12 voxels" in error and "Leave out --probabilities" in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case.nrrd", "model"], "nothing written"
    monkeypatch.setattr(host_memory, "available_bytes", lambda: needed)
    assert main([*args, "--probabilities", str(tmp_path / "p.nii.gz")]) == EXIT_OK
    assert (tmp_path / "p.nii.gz").is_file()


def test_the_probability_memory_check_reads_this_computer_and_refuses_twice_its_memory():
    if not sys.platform.startswith("linux"):
        pytest.skip("compares with Linux's /proc/meminfo")
    available = host_memory.available_bytes()
    assert available is not None
    with open("/proc/meminfo") as meminfo:
        total = next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemTotal:"))
    assert 0 < available <= total
    shape = (300, 512, 512)
    classes = 2 * available // host_memory.probabilities_bytes(1, 300 * 512 * 512) + 1
    with pytest.raises(ImageError, match="not enough memory"):
        host_memory.check_probabilities_fit(int(classes), shape, "p.nii.gz")
    host_memory.check_probabilities_fit(1, (12, 24, 24), "p.nii.gz")  # a small case passes


WRITE_PROBABILITIES_AND_MEASURE = """
import json, sys, tempfile, pathlib
from types import SimpleNamespace
import numpy as np
from deepseg_core import outputs
from deepseg_core.io import Volume

def status(key):
    with open("/proc/self/status") as lines:
        return next(int(line.split()[1]) * 1024 for line in lines if line.startswith(key))

classes, shape = 6, (60, 256, 256)
probabilities = np.empty((classes, *shape), dtype=np.float16)
rng = np.random.default_rng(0)
for k in range(classes):  # one class at a time: nothing larger than the float16 array is ever allocated
    probabilities[k] = rng.random(shape, dtype=np.float32)
result = SimpleNamespace(probabilities=probabilities, labels=Volume(np.zeros(shape, np.uint8)))
before = status("VmRSS")
assert status("VmHWM") <= before + probabilities.nbytes // 2, "the peak so far is the array"
outputs.write_probabilities(pathlib.Path(tempfile.mkdtemp()) / "p.nii.gz", result)
print(json.dumps({"above": status("VmHWM") - before, "voxel_classes": probabilities.size}))
"""


def test_the_probability_file_is_written_within_the_memory_the_check_counts():
    """The memory check counts 2 bytes per voxel and class for the float16 probabilities and the rest of
    PROBABILITY_BYTES_PER_VOXEL_AND_CLASS for writing them; this measures the writing's own peak (VmHWM, in a
    fresh process) above the float16 array."""
    if not Path("/proc/self/status").is_file():
        pytest.skip("needs /proc/self/status (Linux)")
    done = subprocess.run(
        [sys.executable, "-c", WRITE_PROBABILITIES_AND_MEASURE], cwd=REPO / "DeepSeg", capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    measured = json.loads(done.stdout)
    per_voxel_and_class = measured["above"] / measured["voxel_classes"]
    assert per_voxel_and_class <= host_memory.PROBABILITY_BYTES_PER_VOXEL_AND_CLASS - 2, per_voxel_and_class


def test_a_containers_memory_limit_counts_as_what_is_available(tmp_path):
    """Inside a container or a batch job, MemAvailable is the host's: the cgroup's limit (and its ancestors')
    minus what it uses, less the reclaimable page cache, is what the out-of-memory killer goes by. The cgroup
    trees here are written in the kernel's own file formats (a test cannot set this machine's limits)."""
    v2 = tmp_path / "v2"
    job = v2 / "batch" / "job7"
    job.mkdir(parents=True)
    (v2 / "cgroup.controllers").write_text("cpu memory\n")
    (tmp_path / "cgroup2").write_text("0::/batch/job7\n")
    (job / "memory.max").write_text("max\n")
    (job / "memory.current").write_text("1000\n")
    assert host_memory.cgroup_room_bytes(tmp_path / "cgroup2", v2) is None, "no limit at any level"
    (v2 / "batch" / "memory.max").write_text("8000000000\n")  # the parent's limit applies to the job too
    (v2 / "batch" / "memory.current").write_text("3000000000\n")
    (v2 / "batch" / "memory.stat").write_text("anon 1\ninactive_file 1000000000\nactive_file 5\n")
    assert host_memory.cgroup_room_bytes(tmp_path / "cgroup2", v2) == 8_000_000_000 - 2_000_000_000
    (job / "memory.max").write_text("4000000000\n")
    assert host_memory.cgroup_room_bytes(tmp_path / "cgroup2", v2) == 4_000_000_000 - 1000
    (tmp_path / "namespaced").write_text("0::/\n")  # a container: its own cgroup is the mount's root
    (job / "cgroup.controllers").write_text("memory\n")
    assert host_memory.cgroup_room_bytes(tmp_path / "namespaced", job) == 4_000_000_000 - 1000

    v1 = tmp_path / "v1"
    (v1 / "memory" / "docker" / "abc").mkdir(parents=True)
    (tmp_path / "cgroup1").write_text("4:memory:/docker/abc\n3:cpuset:/\n0::/\n")
    (v1 / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # the kernel's "no limit"
    (v1 / "memory" / "memory.usage_in_bytes").write_text("7\n")
    assert host_memory.cgroup_room_bytes(tmp_path / "cgroup1", v1) is None
    (v1 / "memory" / "docker" / "abc" / "memory.limit_in_bytes").write_text("2000000000\n")
    (v1 / "memory" / "docker" / "abc" / "memory.usage_in_bytes").write_text("1500000000\n")
    (v1 / "memory" / "docker" / "abc" / "memory.stat").write_text("inactive_file 9\ntotal_inactive_file 500000000\n")
    assert host_memory.cgroup_room_bytes(tmp_path / "cgroup1", v1) == 1_000_000_000
    assert host_memory.cgroup_room_bytes(tmp_path / "missing", v1) is None


def test_series_uid_picks_the_series_of_a_dicom_folder_to_segment_and_to_describe(tmp_path, capsys, caplog):
    """A DICOM folder of two series was refused with a hint to pass --series-uid, an option that did not exist."""
    from test_io import write_dicom_series

    model = tiny_model_folder(tmp_path / "model")
    phantom = io.read_image(write_case(tmp_path / "case.nrrd"))
    wanted = io.Volume(phantom.array_zyx.astype(np.int16), phantom.spacing_xyz_mm, phantom.origin_lps)
    write_dicom_series(wanted, tmp_path / "dicom", series_uid="1.2.3.4")
    write_dicom_series(io.Volume(-wanted.array_zyx, wanted.spacing_xyz_mm), tmp_path / "other", series_uid="1.2.3.5")
    for path in (tmp_path / "other").iterdir():
        path.rename(tmp_path / "dicom" / f"other_{path.name}")
    out = tmp_path / "case.seg.nrrd"
    command = ["segment", str(tmp_path / "dicom"), "--model", str(model), "--output", str(out)]
    assert main(command) == EXIT_INPUT and "--series-uid UID" in caplog.text and not out.exists()
    assert main([*command, "--series-uid", "1.2.3.4"]) == EXIT_OK
    assert io.read_segmentation(out).grid.same_grid(wanted, tolerance_mm=1e-3)
    capsys.readouterr()
    assert main(["info", str(tmp_path / "dicom"), "--series-uid", "1.2.3.5"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["intensity"]["max"] == float(-wanted.array_zyx.min())
    nrrd = ["segment", str(tmp_path / "case.nrrd"), "--model", str(model), "--output", str(tmp_path / "n.seg.nrrd")]
    assert main([*nrrd, "--series-uid", "1.2.3.4"]) == EXIT_INPUT
    assert "no input is a DICOM folder" in capsys.readouterr().err + caplog.text
    assert main(["info", str(tmp_path / "case.nrrd"), "--series-uid", "1.2.3.4"]) == EXIT_INPUT
    assert "the input is not a folder" in capsys.readouterr().err + caplog.text
    shutil.copytree(tmp_path / "dicom", tmp_path / "dicom2")
    batch = ["segment", str(tmp_path / "dicom"), str(tmp_path / "dicom2"), "--model", str(model), "--output", str(tmp_path / "b")]
    assert main([*batch, "--series-uid", "1.2.3.4"]) == EXIT_INPUT and not (tmp_path / "b").exists()
    assert "a series UID is in one folder only" in capsys.readouterr().err + caplog.text
