"""How long the engine process takes to end after its last output, which the Slicer panel waits for.

    python Testing/Benchmarks/bench_engine_exit.py [--json] [--repeats 5] [--device cpu]
        [--model bundled|monai-bundle|monai-bundle-full] [--kinds deepseg_program ...] [--engines NAME=DEEPSEG_FOLDER ...]

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
- ``wall_s``: from starting the process to its exit;
- ``peak_rss_mb``: the process's peak resident memory (Linux only).

The first run of each kind is not counted (it also exports the network when the cache is empty).

``--model monai-bundle`` segments the same sample with the MONAI bundle of
``scripts/make_tiny_monai_bundle.py`` (made and cached when missing; ``monai-bundle-full``: the model
zoo's spleen network size), imported into a temporary store, as a clinician's **Segment** runs an
imported model. ``--engines NAME=DEEPSEG_FOLDER ...`` runs the engine from these source trees instead of
this one (``before=`` a git worktree of an earlier commit and ``after=DeepSeg``, say), in the same turns:
each row then is ``NAME/kind``. The engines share the model and its graph cache.
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

REPO = Path(__file__).resolve().parents[2]
DEEPSEG = REPO / "DeepSeg"

ORDINARY_EXIT = "import sys; from deepseg_core.cli import main; sys.exit(main(sys.argv[1:]))"
KINDS = {"deepseg_program": ["-m", "deepseg_core"], "ordinary_python_exit": ["-c", ORDINARY_EXIT]}


def one_run(kind: str, device: str, workdir: Path, model: list[str], engine: Path = DEEPSEG) -> dict:
    """One engine process of ``kind`` segmenting the sample with ``model`` (``--model ...`` arguments), its
    modules from ``engine`` (a DeepSeg folder)."""
    output = workdir / f"{kind}.seg.nrrd"
    command = [sys.executable, *KINDS[kind], "segment", str(SAMPLE_VOLUME), *model]
    command += ["--output", str(output), "--device", device, "--json"]
    env = dict(os.environ, PYTHONPATH=str(engine), PYTHONUNBUFFERED="1")  # as the panel starts it
    with open(workdir / f"{kind}.stderr.txt", "w+") as stderr_file:  # a file: a full stderr pipe would stall the run
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr_file, text=True, env=env, cwd=workdir)
        first_line_at, last_line_at, last_event, peak_kb = None, started, None, None
        for line in process.stdout:
            last_line_at = time.perf_counter()
            first_line_at = first_line_at or last_line_at
            last_event = json.loads(line).get("event") if line.startswith("{") else last_event
            peak_kb = high_water_kb(process.pid) or peak_kb
        peak_kb = high_water_kb(process.pid) or peak_kb  # once more, if it has not exited yet
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
        "peak_rss_mb": None if peak_kb is None else peak_kb / 1024,
        "last_event": last_event,
    }


def high_water_kb(pid: int) -> int | None:
    """The process's peak resident memory so far (Linux's ``VmHWM``, in kB), None where it cannot be read. Read
    at each line it writes: the last is written once the work is done, and the peak never goes down. (A child's
    ``ru_maxrss`` would not do: it keeps the peak of the process it was forked from across ``exec``.)"""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            return next((int(line.split()[1]) for line in status if line.startswith("VmHWM:")), None)
    except (OSError, ValueError):
        return None


def model_arguments(model: str, workdir: Path) -> list[str]:
    """The ``--model`` arguments of ``model`` (``bundled``, ``monai-bundle`` or ``monai-bundle-full``); a MONAI
    bundle is imported into a store in ``workdir`` first (without preparing it: the uncounted first run does)."""
    if model == "bundled":
        return ["--model", str(DEFAULT_MODEL)]
    sys.path.insert(0, str(REPO / "Testing" / "foreign"))
    from monai_fixtures import bundle_script

    from deepseg_core.importers import import_model
    from deepseg_core.model_store import ModelStore

    store = ModelStore(workdir / "store")
    card = import_model(bundle_script().ensure_bundle(full=model == "monai-bundle-full"), store, name="bundle")
    return ["--model", card.ref, "--models-dir", str(store.root)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", choices=("bundled", "monai-bundle", "monai-bundle-full"), default="bundled")
    parser.add_argument("--kinds", nargs="+", choices=tuple(KINDS), default=list(KINDS))
    parser.add_argument("--engines", nargs="+", metavar="NAME=DEEPSEG_FOLDER", help="engines from other source trees")
    args = parser.parse_args()
    engines = {"": DEEPSEG}
    if args.engines:
        engines = {name: Path(folder).resolve() for name, _, folder in (e.partition("=") for e in args.engines)}
        for name, folder in engines.items():
            if not name or not (folder / "deepseg_core").is_dir():
                parser.error(f"--engines takes NAME=DEEPSEG_FOLDER, a folder holding deepseg_core; found {name}={folder}")
    rows_of = {(name, kind): f"{name}/{kind}" if name else kind for name in engines for kind in args.kinds}
    runs: dict[str, list[dict]] = {row: [] for row in rows_of.values()}
    with tempfile.TemporaryDirectory() as folder:
        model = model_arguments(args.model, Path(folder))
        for turn in range(args.repeats + 1):
            for (name, kind), row in rows_of.items():
                run = one_run(kind, args.device, Path(folder), model, engines[name])
                if turn > 0:
                    runs[row].append(run)
    result: dict[str, object] = {"cpu": cpu_description(), "device": args.device, "repeats": args.repeats}
    result["model"] = args.model
    result["engines"] = {name or "this": str(path) for name, path in engines.items()}
    for kind, rows in runs.items():
        result[kind] = {"last_event": rows[-1]["last_event"]}
        for measure in ("until_first_output_s", "after_last_output_s", "wall_s", "peak_rss_mb"):
            values = [r[measure] for r in rows]
            if None in values:
                continue
            result[kind][measure] = round(statistics.median(values), 3)
            unit = "_s" if measure.endswith("_s") else "_mb"
            result[kind][measure.removesuffix(unit) + "_range" + unit] = [round(min(values), 3), round(max(values), 3)]
    if args.json:
        print(json.dumps(result))
    else:
        for kind in runs:
            row = result[kind]
            print(
                f"{kind:22s} first output after {row['until_first_output_s']:.2f} s, exit {row['after_last_output_s']:.3f} s"
                f" after the last output, whole run {row['wall_s']:.2f} s"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
