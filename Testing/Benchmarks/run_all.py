"""Run every benchmark in this folder and collect their JSON results.

    python Testing/Benchmarks/run_all.py [--device cpu|cuda] [--output results.json] [--only NAME ...]

Each benchmark is a script ``bench_*.py`` that prints one JSON document with ``--json``. They run one
after another in fresh processes (timings and peak memory stay their own). A failing benchmark is
reported and makes the exit status non-zero; the others still run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", type=Path, default=None, help="also write the collected results here")
    parser.add_argument("--only", nargs="*", default=None, help="benchmark names, e.g. sliding_window")
    args = parser.parse_args()
    scripts = sorted(HERE.glob("bench_*.py"))
    if args.only:
        scripts = [s for s in scripts if s.stem.removeprefix("bench_") in args.only]
    results, failed = {}, []
    for script in scripts:
        name = script.stem.removeprefix("bench_")
        sys.stderr.write(f"== {name}\n")
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, str(script), "--json", "--device", args.device], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            failed.append(name)
            sys.stderr.write(done.stderr[-4000:])
            results[name] = {"error": f"exit {done.returncode}"}
            continue
        lines = [line for line in done.stdout.splitlines() if line.strip()]
        results[name] = json.loads(lines[-1])
        results[name]["benchmark_wall_s"] = time.perf_counter() - started
    text = json.dumps(results, indent=2)
    print(text)
    if args.output is not None:
        args.output.write_text(text + "\n")
    if failed:
        sys.stderr.write(f"failed: {', '.join(failed)}\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
