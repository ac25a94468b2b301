"""Several segmentations of one model started together before its network is prepared for this computer.

    python Testing/Benchmarks/bench_concurrent_first_runs.py [--json] [--model default|nnunet-full|FOLDER]
        [--processes 2] [--repeats 2]

This happens when a Segment is started while a training or an import still prepares the same version,
when two Slicer sessions segment with a new version, or when ``torchrun`` ranks on one machine start a
batch. Each process needs the network exported to ONNX and compiled by the CPU runtime (``--backend
auto``). Since the export lock (``inference.backends.graph_lock_path``), one process prepares it and the
others wait for it, then load its cached graph and compiled blob; before, each exported and compiled the
same network beside the others, on the same cores.

Each repeat empties the model store's graph cache, then starts ``--processes`` plain ``python -m
deepseg_core segment`` processes on the bundled sample volume at once (each its own output, torch's default
thread count, as a panel starts them) and reports, per process: the seconds from the common start to its
exit (``wall_s``), its ``timings_s.backend_setup`` (the export, the wait and the load) and its peak RSS
(``VmHWM``, that process image's own). ``--model``: ``default`` (the bundled model; its export takes
about a second), ``nnunet-full`` (the nnU-Net v2 3d_fullres folder of ``bench_vs_nnunet.py``, made by
nnU-Net's own code: PlainConvUNet 32-320, patch 128^3; its export and compilation take tens of seconds)
or a model folder. The model is imported once without preparing it (``--no-prepare``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "DeepSeg"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_sliding_window import cpu_description

from deepseg_core.demo import DEFAULT_MODEL, SAMPLE_VOLUME

DEEPSEG = Path(__file__).resolve().parents[2] / "DeepSeg"

#: runs ``deepseg segment`` with the given arguments in this process, then prints the process's peak RSS
CHILD = """
import json, sys
sys.path.insert(0, sys.argv[1])
from deepseg_core.cli import main
code = main(sys.argv[2:])
with open("/proc/self/status") as status:
    peak_kb = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
print(json.dumps({"event": "bench_peak_rss", "mb": peak_kb / 1024}), flush=True)
sys.exit(code)
"""


def model_folder(choice: str) -> Path:
    """The folder ``--model`` names: the bundled model, the nnU-Net full preset (made once and cached), or a folder."""
    if choice == "default":
        return Path(DEFAULT_MODEL)
    if choice == "nnunet-full":
        spec = importlib.util.spec_from_file_location("parity", Path(__file__).with_name("bench_nnunet_parity.py"))
        assert spec is not None and spec.loader is not None
        parity = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(parity)
        maker = parity._maker()
        return maker.model_folder(maker.ensure_models("full"), "Dataset502_DeepSegFullCT", "3d_fullres")
    return Path(choice)


def one_repeat(store: Path, ref: str, processes: int, work: Path) -> list[dict]:
    """Start ``processes`` segmentations at once on an empty graph cache; one row per process."""
    shutil.rmtree(store / ".cache", ignore_errors=True)
    outputs = work / "outputs"
    shutil.rmtree(outputs, ignore_errors=True)
    outputs.mkdir()
    started = time.perf_counter()
    running = []
    for index in range(processes):
        command = [sys.executable, "-c", CHILD, str(DEEPSEG), "segment", str(SAMPLE_VOLUME), "--model", ref]
        command += ["--models-dir", str(store), "--output", str(outputs / f"run{index}.seg.nrrd"), "--json"]
        running.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    finished: dict[int, tuple[str, str, float]] = {}

    def wait_for(index: int, process: subprocess.Popen) -> None:
        out, err = process.communicate()
        finished[index] = (out, err, time.perf_counter() - started)

    waiters = [threading.Thread(target=wait_for, args=pair) for pair in enumerate(running)]
    for waiter in waiters:
        waiter.start()
    for waiter in waiters:
        waiter.join()
    rows = []
    for index, process in enumerate(running):
        out, err, wall = finished[index]
        if process.returncode != 0:
            raise SystemExit(f"a segmentation failed (exit {process.returncode}):\n{err}")
        events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        done = next(e for e in events if e["event"] == "case_done")
        rows.append(
            {
                "wall_s": round(wall, 2),
                "backend": done["backend"],
                "backend_setup_s": done["timings_s"]["backend_setup"],
                "peak_rss_mb": round(next(e["mb"] for e in events if e["event"] == "bench_peak_rss")),
                "said_preparing": any(e["event"] == "status" for e in events),
            }
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--model", default="default", help="default, nnunet-full or a model folder")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if args.processes < 1 or args.repeats < 1:
        parser.error(f"--processes and --repeats must be at least 1, got {args.processes} and {args.repeats}")
    folder = model_folder(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        store = work / "store"
        imported = subprocess.run(
            [sys.executable, "-m", "deepseg_core", "models", "import", str(folder), "--models-dir", str(store)]
            + ["--no-prepare", "--json"],
            cwd=DEEPSEG,
            capture_output=True,
            text=True,
        )
        if imported.returncode != 0:
            raise SystemExit(f"could not import {folder}:\n{imported.stderr}")
        ref = next(e["model"] for e in map(json.loads, imported.stdout.splitlines()) if e["event"] == "imported")
        repeats = [one_repeat(store, ref, args.processes, work) for _ in range(args.repeats)]
    last_done = [max(row["wall_s"] for row in rows) for rows in repeats]
    summary = {
        "cpu": cpu_description(),
        "model": str(folder),
        "processes": args.processes,
        "repeats": repeats,
        "last_process_done_s": last_done,
        "median_last_process_done_s": round(statistics.median(last_done), 2),
        "load_average_1min": os.getloadavg()[0],
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for number, rows in enumerate(repeats, 1):
            cells = "; ".join(f"{r['wall_s']} s (setup {r['backend_setup_s']} s, {r['peak_rss_mb']} MB)" for r in rows)
            print(f"repeat {number}: {cells}")
        print(f"median time until the last process is done: {summary['median_last_process_done_s']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
