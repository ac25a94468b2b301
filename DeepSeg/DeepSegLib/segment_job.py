"""Run ``deepseg`` commands out of the GUI thread: subprocesses that speak JSON-lines events.

:func:`launch` starts any ``deepseg ... --json`` command (segment here, train in DeepSegTraining).
No Slicer or Qt imports: the panel polls :meth:`DeepSegJob.poll` from a timer, so the GUI never
blocks, and **Cancel** terminates the process (SIGTERM; the CLI stops within one tile batch, exits
130 and leaves no output file). Inside Slicer the interpreter is ``PythonSlicer``; here it is the
running Python.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from deepseg_core import io

log = logging.getLogger(__name__)
MODULE_DIR = Path(__file__).resolve().parents[1]
UNCERTAINTY_FILE = "uncertainty.nrrd"
STATS_FILE = "stats.csv"


@dataclass(frozen=True)
class SegmentRequest:
    """What the panel asks for (the CLI's flags).

    Attributes:
        model: ``NAME[:VERSION]``, a bundled model's name, or a model folder.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        overlap: sliding-window overlap, None for the model card's.
        tta: mirror test-time augmentation.
        instances: one segment per lesion (thing labels).
        uncertainty: also compute the voxel-wise uncertainty map (``uncertainty.nrrd`` in the job folder).
        measurements: also measure every segment and instance (``stats.csv`` in the job folder).
        models_dir: model store folder, None for the default.
    """

    model: str
    device: str = "auto"
    overlap: float | None = None
    tta: bool = False
    instances: bool = False
    uncertainty: bool = False
    measurements: bool = True
    models_dir: str | None = None


def python_executable() -> str:
    """``PythonSlicer`` next to Slicer's executable when inside Slicer, else this interpreter."""
    if "slicer" in sys.modules and hasattr(sys.modules["slicer"], "app"):
        found = shutil.which("PythonSlicer")
        if found:
            return found
    return sys.executable


class DeepSegJob:
    """One running ``deepseg`` command; ``poll()`` returns the events that arrived since the last call."""

    def __init__(self, command: Sequence[str], workdir: Path, output: Path, env: dict[str, str]) -> None:
        self.command = list(command)
        self.workdir = workdir
        self.output = output
        self.events: list[dict] = []
        self._queue: queue.Queue[dict | None] = queue.Queue()
        self._stderr: list[str] = []
        self.process = subprocess.Popen(
            self.command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=workdir
        )
        self._readers = [
            threading.Thread(target=self._read_events, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read_events(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            line = line.strip()
            if not line:
                continue
            try:
                self._queue.put(json.loads(line))
            except json.JSONDecodeError:
                log.debug("deepseg: %s", line)
        self._queue.put(None)

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self._stderr.append(line.rstrip())

    def poll(self) -> list[dict]:
        """New events (``start``, ``progress``, ``case_done``, ``case_failed``, ``done``), non-blocking."""
        new = []
        while True:
            try:
                event = self._queue.get_nowait()
            except queue.Empty:
                break
            if event is not None:
                new.append(event)
        self.events.extend(new)
        return new

    @property
    def finished(self) -> bool:
        """True once the process has exited."""
        return self.process.poll() is not None

    @property
    def returncode(self) -> int | None:
        """0 ok, 2 bad input, 3 model problem, 130 cancelled; None while running."""
        return self.process.poll()

    @property
    def domain_check(self) -> dict | None:
        """The last ``domain_check`` event (verdict, reasons, findings), or None before it arrives."""
        checks = [e for e in self.events if e.get("event") == "domain_check"]
        return checks[-1] if checks else None

    @property
    def error(self) -> str:
        """The CLI's error message (last stderr lines), for the status line."""
        lines = [line for line in self._stderr if line.strip()]
        failed = [e.get("error", "") for e in self.events if e.get("event") == "case_failed"]
        return "; ".join(failed) if failed else "\n".join(lines[-3:])

    def cancel(self, timeout_s: float = 10.0) -> None:
        """Stop the run (SIGTERM, then kill if it does not exit within ``timeout_s``)."""
        if self.finished:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def wait(self, timeout_s: float | None = None) -> int:
        """Block until the process exits (scripts and tests; the GUI polls instead)."""
        code = self.process.wait(timeout_s)
        for reader in self._readers:
            reader.join(5.0)
        self.poll()
        return code

    def cleanup(self) -> None:
        """Remove the job's temporary folder."""
        shutil.rmtree(self.workdir, ignore_errors=True)


def start_segmentation(channels: Sequence[io.Volume], request: SegmentRequest, python: str | None = None) -> DeepSegJob:
    """Write the input channels to a temporary folder and start ``deepseg segment --json`` on them.

    Args:
        channels: one volume per model input channel, on one grid.
        request: model and options.
        python: interpreter to run (default :func:`python_executable`).

    Returns:
        The running job; its ``output`` is the ``.seg.nrrd`` it will write.
    """
    workdir = Path(tempfile.mkdtemp(prefix="deepseg-job-"))
    inputs = []
    for index, volume in enumerate(channels):
        inputs.append(io.write_image(volume, workdir / f"input_{index}.nrrd", compress=False))
    output = workdir / "result.seg.nrrd"
    arguments = ["segment", ",".join(str(p) for p in inputs)]
    arguments += ["--model", request.model, "--output", str(output), "--device", request.device, "--json"]
    if request.overlap is not None:
        arguments += ["--overlap", str(request.overlap)]
    if request.tta:
        arguments.append("--tta")
    if request.instances:
        arguments.append("--instances")
    if request.uncertainty:
        arguments += ["--uncertainty", str(workdir / UNCERTAINTY_FILE)]
    if request.measurements:
        arguments += ["--stats", str(workdir / STATS_FILE)]
    if request.models_dir:
        arguments += ["--models-dir", request.models_dir]
    return launch(arguments, workdir, output, python)


def launch(arguments: Sequence[str], workdir: Path, output: Path, python: str | None = None) -> DeepSegJob:
    """Start ``python -m deepseg_core ARGUMENTS`` in ``workdir`` with this module's folder importable.

    Args:
        arguments: the ``deepseg`` command line after the program name (include ``--json``).
        workdir: the job's temporary folder (removed by :meth:`DeepSegJob.cleanup`).
        output: what the command writes (a file or a folder), kept on the job.
        python: interpreter (default :func:`python_executable`).
    """
    command = [python or python_executable(), "-m", "deepseg_core", *arguments]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(MODULE_DIR), env.get("PYTHONPATH", "")) if p)
    log.info("DeepSeg: %s", " ".join(command))
    return DeepSegJob(command, workdir, output, env)
