"""Median and range of chosen figures over several runs of a benchmark that prints one JSON object.

    python Testing/Benchmarks/median_of_runs.py --turns 5 --save-dir runs/ \
        --keys ratio_vs_monai_same_batch backends.openvino.seconds monai_s_batch2 \
        -- Testing/Benchmarks/bench_sliding_window.py --json
    python Testing/Benchmarks/median_of_runs.py --files runs/*.json --keys ratio_vs_monai_same_batch

Each turn runs the benchmark in a fresh process (this Python), one after another. On a shared
2-core machine, five runs of bench_sliding_window.py at one commit gave same-batch ratios from 0.72
to 0.79, so README gives a median with its range, and a before/after comparison the medians of the
same number of turns of the same script. ``--keys`` are dotted paths into the JSON. ``--files``: summarise runs
saved earlier (``--save-dir`` writes ``turn_<n>.json``) instead of running anything.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path


def figure(result: dict, dotted: str) -> float:
    """The number at ``dotted`` (``a.b.c``) in ``result``; KeyError names the path when it is missing."""
    value = result
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(f"{dotted!r}: no {part!r} in the benchmark's JSON")
        value = value[part]
    return float(value)


def run_turns(command: list[str], turns: int, save_dir: Path | None) -> list[dict]:
    results = []
    for turn in range(1, turns + 1):
        done = subprocess.run([sys.executable, *command], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"turn {turn}: {' '.join(command)} exited {done.returncode}:\n{done.stderr[-2000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        if save_dir is not None:
            save_dir.mkdir(parents=True, exist_ok=True)
            (save_dir / f"turn_{turn}.json").write_text(json.dumps(result), encoding="utf-8")
        results.append(result)
    return results


def summary(results: list[dict], keys: list[str]) -> dict[str, dict]:
    """Per key: every turn's value, their median, smallest and largest."""
    table = {}
    for key in keys:
        values = [figure(result, key) for result in results]
        table[key] = {"turns": values, "median": statistics.median(values), "min": min(values), "max": max(values)}
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", nargs="+", required=True, help="dotted paths into the benchmark's JSON")
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--save-dir", type=Path)
    parser.add_argument("--files", nargs="+", type=Path, help="summarise saved runs instead of running")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("command", nargs="*", help="the benchmark and its arguments, after --")
    args = parser.parse_args()
    if args.files:
        results = [json.loads(path.read_text(encoding="utf-8")) for path in args.files]
    elif args.command:
        results = run_turns(args.command, args.turns, args.save_dir)
    else:
        parser.error("give a benchmark command after -- or saved runs with --files")
    table = summary(results, args.keys)
    if args.json:
        print(json.dumps({"runs": len(results), "figures": table}))
    else:
        for key, row in table.items():
            turns = ", ".join(f"{v:.4g}" for v in row["turns"])
            print(f"{key}: median {row['median']:.4g} (range {row['min']:.4g} to {row['max']:.4g}; turns {turns})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
