"""Jobs are process trees: Cancel stops the launcher and the engine it started, reports *Cancelled*,
and the job's folder is removed only after every process of the tree has exited.

Slicer starts the engine through ``PythonSlicer``, a launcher that runs the real Python as its
child; ``Testing/standins/python_slicer_launcher.py`` behaves the same way (and, like the real
launcher, does not forward SIGTERM), so these tests see what a Slicer user would see.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from deepseg_core import io
from deepseg_core.demo import DEFAULT_MODEL, SAMPLE_VOLUME
from DeepSegLib import process_tree
from DeepSegLib.segment_job import DeepSegJob, SegmentRequest, launch_environment, start_segmentation

STANDINS = Path(__file__).resolve().parents[1] / "standins"


def pid_alive(pid: int) -> bool:
    """True while ``pid`` is a live (non-zombie) process."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            state = handle.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def launcher(engine_python: str) -> list[str]:
    return [sys.executable, str(STANDINS / "python_slicer_launcher.py"), engine_python]


def wait_for(job: DeepSegJob, kind: str, timeout_s: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job.poll()
        found = [e for e in job.events if e.get("event") == kind]
        if found:
            return found[-1]
        assert not job.finished, f"the job ended before a {kind!r} event: {job.error}"
        time.sleep(0.05)
    raise AssertionError(f"no {kind!r} event within {timeout_s} s")


def poll_until_finished(job: DeepSegJob, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not job.finished:
        assert time.monotonic() < deadline, f"the job's process tree is still running: {job.alive_processes()}"
        job.poll()
        time.sleep(0.05)


def test_cancel_stops_the_engine_behind_the_launcher_and_reports_cancelled(engine_python):
    request = SegmentRequest(model=str(DEFAULT_MODEL), device="cpu", uncertainty=True, measurements=True)
    job = start_segmentation([io.read_image(SAMPLE_VOLUME)], request, python=launcher(engine_python))
    engine_pid = wait_for(job, "start")["pid"]
    assert engine_pid != job.process.pid, "the engine runs as the launcher's child, as under PythonSlicer"
    wait_for(job, "progress")
    assert job.cleanup() is False and job.workdir.is_dir(), "a running job's folder must not be removed"
    job.cancel()
    poll_until_finished(job)
    assert not pid_alive(engine_pid), "the engine kept running after Cancel"
    assert job.outcome == "cancelled"
    assert not job.output.exists(), "a cancelled run must not leave a result"
    assert job.cleanup() is True and not job.workdir.exists()


def test_signalling_only_the_launcher_would_leave_the_engine_running(engine_python):
    """Why the tree matters: the old Cancel (SIGTERM to the launcher) orphans the engine."""
    request = SegmentRequest(model=str(DEFAULT_MODEL), device="cpu", uncertainty=True, measurements=False)
    job = start_segmentation([io.read_image(SAMPLE_VOLUME)], request, python=launcher(engine_python))
    try:
        engine_pid = wait_for(job, "start")["pid"]
        job.process.terminate()
        job.process.wait(10)
        time.sleep(0.5)
        assert pid_alive(engine_pid)
        assert not job.finished and job.alive_processes() == [engine_pid]
    finally:
        job.kill()
        poll_until_finished(job)
        job.cleanup()
    assert not pid_alive(engine_pid)


def test_a_process_that_ignores_sigterm_is_killed_after_the_grace_period(tmp_path):
    """Native code (a long ITK filter) cannot run Python's SIGTERM handler: SIGKILL follows."""
    command = [sys.executable, str(STANDINS / "python_slicer_launcher.py"), sys.executable, str(STANDINS / "ignores_sigterm.py")]
    job = DeepSegJob(command, tmp_path, tmp_path / "none", launch_environment())
    child = wait_for(job, "start", timeout_s=30)["pid"]
    job.cancel(grace_s=0.5)
    time.sleep(0.3)
    job.poll()
    assert pid_alive(child), "SIGTERM alone must not stop it (it ignores SIGTERM)"
    poll_until_finished(job, timeout_s=20)
    assert not pid_alive(child) and job.outcome == "cancelled"


def test_launch_uses_its_own_process_group_with_the_module_folder_on_pythonpath():
    env = launch_environment()
    assert env["PYTHONPATH"].split(os.pathsep)[0].endswith("DeepSeg")
    process = process_tree.start_process_group([sys.executable, "-c", "import os; print(os.getpgid(0))"], env, Path.cwd())
    out, _ = process.communicate(timeout=30)
    assert int(out.strip()) == process.pid != os.getpgid(0)
    assert process_tree.group_members(process) == []


def test_a_job_that_cannot_start_leaves_no_folder_behind(tmp_path, monkeypatch):
    import tempfile

    import pytest

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    volume = io.read_image(SAMPLE_VOLUME)
    with pytest.raises(OSError):
        start_segmentation([volume], SegmentRequest(model=str(DEFAULT_MODEL)), python=str(tmp_path / "no-such-python"))
    assert list(tmp_path.iterdir()) == []
