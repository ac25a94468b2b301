"""DeepSeg's engine processes shorten GNU OpenMP's spinning before torch loads it (:mod:`deepseg_core.openmp_waits`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from deepseg_core.openmp_waits import ENGINE_SPIN_COUNT, shorten_openmp_spinning

REPO = Path(__file__).resolve().parents[2]


def test_a_child_environment_gets_the_spin_count_unless_the_user_chose_one():
    environ = {"PATH": "/usr/bin"}
    assert shorten_openmp_spinning(environ) and environ["GOMP_SPINCOUNT"] == str(ENGINE_SPIN_COUNT)
    chosen = {"GOMP_SPINCOUNT": "infinite"}
    assert not shorten_openmp_spinning(chosen) and chosen == {"GOMP_SPINCOUNT": "infinite"}
    passive = {"OMP_WAIT_POLICY": "PASSIVE"}
    assert not shorten_openmp_spinning(passive) and "GOMP_SPINCOUNT" not in passive


def test_this_process_is_left_alone_once_torch_is_loaded(monkeypatch):
    import torch  # noqa: F401  (loaded: OpenMP has read its settings already)

    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert not shorten_openmp_spinning()
    assert "GOMP_SPINCOUNT" not in os.environ


@pytest.mark.parametrize(
    "user, expected",
    [({}, repr(str(ENGINE_SPIN_COUNT))), ({"OMP_WAIT_POLICY": "PASSIVE"}, "None")],
    ids=["default", "user-policy"],
)
def test_the_deepseg_program_sets_it_before_torch_is_loaded(user, expected):
    """``deepseg`` and ``python -m deepseg_core`` (the Slicer panels' engine runs) go through ``cli.run``."""
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    env.update(user, PYTHONPATH=str(REPO / "DeepSeg"))
    # what the environment says at the moment torch (and with it OpenMP) is first imported
    probe = (
        "import atexit, os, sys\n"
        "seen = []\n"
        "sys.addaudithook(lambda event, args: event == 'import' and args[0] == 'torch' and not seen"
        " and seen.append(os.environ.get('GOMP_SPINCOUNT')))\n"
        "atexit.register(lambda: print('SPIN AT TORCH IMPORT', seen))\n"
        "from deepseg_core.cli import run\n"
        "run(['--version'])\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
    assert f"SPIN AT TORCH IMPORT [{expected}]" in done.stdout
