"""Test launcher (fault injection): ``python engine_killed_after_storing.py -m deepseg_core ARGS`` runs the
engine's ``ARGS`` in this process with one change: the training engine, once it has stored the new version,
waits instead of recording that in its checkpoint (``mark_stored``). The panel's Stop then asks it to stop
(deferred there, as while storing) and kills it 5 s later: the window a real kill lands in when storing a large
model's version takes longer than that."""

from __future__ import annotations

import runpy
import sys
import time
from pathlib import Path


def _waits_until_killed(folder: Path, ref: str) -> None:
    while True:
        time.sleep(1)


if sys.argv[1:2] == ["-c"]:  # the panel's probe of the engine's Python: run as the interpreter would
    code = sys.argv[2]
    sys.argv = ["-c", *sys.argv[3:]]
    exec(compile(code, "<string>", "exec"), {"__name__": "__main__"})
elif sys.argv[1:3] == ["-m", "deepseg_core"]:
    from deepseg_core.training import engine

    engine.mark_stored = _waits_until_killed
    sys.argv = [sys.argv[0], *sys.argv[3:]]
    runpy.run_module("deepseg_core", run_name="__main__", alter_sys=True)
else:
    raise SystemExit(f"usage: {Path(__file__).name} -m deepseg_core ARGS | -c CODE ARGS (got {sys.argv[1:3]})")
