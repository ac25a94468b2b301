"""How long the engine process takes to end after its last output, which the Slicer panel waits for.

    python Testing/Benchmarks/bench_engine_exit.py [--json] [--repeats 5] [--device cpu]

The panel applies a segmentation (or an import) when the engine's process tree has exited, not when
the engine prints its last event. This script segments the bundled sample with the bundled model
through the command line the panel starts (``python -m deepseg_core segment ... --json``, its own
process, ``PYTHONUNBUFFERED``, outputs in a temporary folder; the panel's input is a file it wrote from
the scene, here the sample's own file) and, in the same turns, through the same ``main`` ended by Python's ordinary exit
(``sys.exit(main())``, which frees the interpreter's objects module by module). The two alternate; each
row gives the median of ``--repeats`` runs of:

- ``until_first_output_s``: from starting the process to its first line on stdout (the ``start`` event, which
  the engine writes once its modules are imported, the model is read and its inputs are checked);
- ``after_last_output_s``: from the last line the process wrote on stdout to its exit;
- ``wall_s``: from starting the process to its exit.

The first run of each kind is not counted (it also exports the network when the cache is empty).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "DeepSeg"))

from bench_sliding_window import cpu_description

from deepseg_core.demo import DEFAULT_MODEL, SAMPLE_VOLUME

DEEPSEG = Path(__file__).resolve().parents[2] / "DeepSeg"

ORDINARY_EXIT = "import sys; from deepseg_core.cli import main; sys.exit(main(sys.argv[1:]))"
KINDS = {"deepseg_program": ["-m", "deepseg_core"], "ordinary_python_exit": ["-c", ORDINARY_EXIT]}


def one_run(kind: str, device: str, workdir: Path) -> dict:
    output = workdir / f"{kind}.seg.nrrd"
    command = [sys.executable, *KINDS[kind], "segment", str(SAMPLE_VOLUME), "--model", str(DEFAULT_MODEL)]
    command += ["--output", str(output), "--device", device, "--json"]
    env = dict(os.environ, PYTHONPATH=str(DEEPSEG), PYTHONUNBUFFERED="1")  # as the panel starts it
    with open(workdir / f"{kind}.stderr.txt", "w+") as stderr_file:  # a file: a full stderr pipe would stall the run
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr_file, text=True, env=env, cwd=workdir)
        first_line_at, last_line_at, last_event = None, started, None
        for line in process.stdout:
            last_line_at = time.perf_counter()
            first_line_at = first_line_at or last_line_at
            last_event = json.loads(line).get("event") if line.startswith("{") else last_event
        code = process.wait()
        ended = time.perf_counter()
        stderr_file.seek(0)
        stderr = stderr_file.read()
    if code != 0 or not output.exists():
        raise SystemExit(f"{kind}: exit {code}, output written: {output.exists()}\n{stderr[-2000:]}")
    output.unlink()
    return {
        "until_first_output_s": (first_line_at or ended) - started,
        "after_last_output_s": ended - last_line_at,
        "wall_s": ended - started,
        "last_event": last_event,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {kind: [] for kind in KINDS}
    with tempfile.TemporaryDirectory() as folder:
        for turn in range(args.repeats + 1):
            for kind in KINDS:
                run = one_run(kind, args.device, Path(folder))
                if turn > 0:
                    runs[kind].append(run)
    result: dict[str, object] = {"cpu": cpu_description(), "device": args.device, "repeats": args.repeats}
    for kind, rows in runs.items():
        result[kind] = {"last_event": rows[-1]["last_event"]}
        for measure in ("until_first_output_s", "after_last_output_s", "wall_s"):
            values = [r[measure] for r in rows]
            result[kind][measure] = round(statistics.median(values), 3)
            result[kind][measure.removesuffix("_s") + "_range_s"] = [round(min(values), 3), round(max(values), 3)]
    if args.json:
        print(json.dumps(result))
    else:
        for kind in KINDS:
            row = result[kind]
            print(
                f"{kind:22s} first output after {row['until_first_output_s']:.2f} s, exit {row['after_last_output_s']:.3f} s"
                f" after the last output, whole run {row['wall_s']:.2f} s"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
