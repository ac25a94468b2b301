"""Run ``deepseg`` commands out of the GUI thread: process trees that speak JSON-lines events.

:func:`launch` starts any ``deepseg ... --json`` command (segment here, train in DeepSegTraining)
the way Slicer starts console processes (``slicer.util.launchConsoleProcess``: Slicer's startup
environment, ``PythonSlicer`` as the interpreter, no console window on Windows), but as its own
process group, so that **Cancel** stops the launcher *and* the Python it starts
(:mod:`.process_tree`).

The job never blocks the caller: the panel polls :meth:`DeepSegJob.poll` from a timer; ``cancel``
sends ``SIGTERM`` to the tree and returns at once, and a later ``poll`` sends ``SIGKILL`` when the
grace period is over. A job is *finished* only when every process of its tree has exited, and its
folder is removed only then.

Imports only the standard library and :mod:`deepseg_core.io` (numpy and SimpleITK, which Slicer
bundles), so it works before torch is installed.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from deepseg_core import io

from . import process_tree

log = logging.getLogger(__name__)
MODULE_DIR = Path(__file__).resolve().parents[1]
UNCERTAINTY_FILE = "uncertainty.nrrd"
STATS_FILE = "stats.csv"
#: seconds between SIGTERM and SIGKILL of a cancelled job's process tree.
CANCEL_GRACE_S = 5.0
#: the ``deepseg`` exit code for a run that stopped on request.
EXIT_CANCELLED = 130


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
        backend: inference backend (``auto``, ``torch``, ``openvino``, ``onnxruntime``).
        precision: CPU arithmetic, ``float32`` or ``bfloat16`` (ignored on CUDA).
        models_dir: model store folder, None for the default.
    """

    model: str
    device: str = "auto"
    overlap: float | None = None
    tta: bool = False
    instances: bool = False
    uncertainty: bool = False
    measurements: bool = True
    backend: str = "auto"
    precision: str = "float32"
    models_dir: str | None = None


def _slicer_app() -> object | None:
    """Slicer's application object when running inside Slicer (``slicer-core`` alone has none)."""
    slicer = sys.modules.get("slicer")
    return getattr(slicer, "app", None) if slicer is not None else None


def python_executable() -> str:
    """``PythonSlicer`` when inside Slicer (on PATH or in Slicer's ``bin``), else this interpreter."""
    app = _slicer_app()
    if app is not None:
        found = shutil.which("PythonSlicer")
        if found:
            return found
        home = getattr(app, "slicerHome", "")
        for name in ("PythonSlicer.exe", "PythonSlicer"):
            candidate = Path(str(home)) / "bin" / name
            if candidate.is_file():
                return str(candidate)
    return sys.executable


def launch_environment() -> dict[str, str]:
    """The subprocess environment: Slicer's startup environment inside Slicer, else this process's.

    ``DeepSeg`` (the folder holding ``deepseg_core`` and ``DeepSegLib``) goes first on PYTHONPATH.
    """
    env = None
    if _slicer_app() is not None:
        import slicer.util  # the desktop application's util module (startupEnvironment needs slicer.app)

        env = dict(slicer.util.startupEnvironment())
    env = env or dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(MODULE_DIR), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class DeepSegJob:
    """One running ``deepseg`` command and its process tree.

    Attributes:
        command: the command line.
        workdir: the job's temporary folder (removed by :meth:`cleanup` once the tree has exited).
        output: what the command writes (a file or a folder).
        events: every JSON event received so far.
    """

    def __init__(self, command: Sequence[str], workdir: Path, output: Path, env: dict[str, str]) -> None:
        self.command = list(command)
        self.workdir = workdir
        self.output = output
        self.events: list[dict] = []
        self.cancel_requested = False
        self._kill_at: float | None = None
        self._queue: queue.Queue[dict | None] = queue.Queue()
        self._stderr: list[str] = []
        self.process = process_tree.start_process_group(self.command, env, workdir)
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
        """New events since the last call (``start``, ``progress``, ``case_done``, ...); never blocks.

        After :meth:`cancel`, also stops the tree by force once the grace period has passed.
        """
        if self._kill_at is not None and time.monotonic() >= self._kill_at and not self.finished:
            log.info("DeepSeg: the cancelled job did not stop within %.0f s; killing its process tree", CANCEL_GRACE_S)
            process_tree.kill_group(self.process)
            self._kill_at = None
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

    def alive_processes(self) -> list[int]:
        """PIDs of the tree's processes still running (the launcher and what it started)."""
        return process_tree.group_members(self.process)

    @property
    def finished(self) -> bool:
        """True once the launcher and every process it started have exited."""
        return self.process.poll() is not None and not self.alive_processes()

    @property
    def returncode(self) -> int | None:
        """The launcher's exit code (0 ok, 2 bad input, 3 model problem, 130 cancelled); None while running."""
        return self.process.poll() if self.finished else None

    @property
    def outcome(self) -> str | None:
        """``succeeded``, ``cancelled`` or ``failed`` once finished; None while running.

        A job stopped by :meth:`cancel` is ``cancelled`` whatever exit code the signal produced.
        """
        code = self.returncode
        if code is None:
            return None
        if self.cancel_requested or code == EXIT_CANCELLED:
            return "cancelled"
        return "succeeded" if code == 0 else "failed"

    @property
    def domain_check(self) -> dict | None:
        """The last ``domain_check`` event (verdict, reasons, findings), or None before it arrives."""
        checks = [e for e in self.events if e.get("event") == "domain_check"]
        return checks[-1] if checks else None

    @property
    def error(self) -> str:
        """The CLI's error message (failed-case events, else the last stderr lines), for the status line."""
        failed = [e.get("error", "") for e in self.events if e.get("event") == "case_failed"]
        if failed:
            return "; ".join(failed)
        lines = [line for line in self._stderr if line.strip()]
        return "\n".join(lines[-3:])

    def cancel(self, grace_s: float = CANCEL_GRACE_S) -> None:
        """Ask the whole tree to stop and return at once; :meth:`poll` kills it after ``grace_s``."""
        if self.finished:
            return
        self.cancel_requested = True
        process_tree.terminate_group(self.process)
        self._kill_at = time.monotonic() + grace_s

    def kill(self) -> None:
        """Stop the whole tree immediately (module cleanup, application exit)."""
        self.cancel_requested = True
        process_tree.kill_group(self.process)

    def wait(self, timeout_s: float | None = None) -> int:
        """Block until the tree has exited (scripts and tests; the GUI polls instead).

        Raises:
            TimeoutError: the tree is still running after ``timeout_s``.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self.finished:
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"deepseg job still running after {timeout_s} s: {' '.join(self.command[:4])} ...")
            self.poll()
            time.sleep(0.05)
        for reader in self._readers:
            reader.join(5.0)
        self.poll()
        return int(self.process.returncode)

    def cleanup(self) -> bool:
        """Remove the job's folder once its tree has exited; False (nothing removed) while it runs."""
        if not self.finished:
            return False
        shutil.rmtree(self.workdir, ignore_errors=True)
        return True

    def failure_text(self) -> str:
        """The status line of a failed job: the engine's message, else its exit code."""
        return f"Failed: {self.error or f'the engine exited with code {self.returncode}'}"

    def kill_and_remove(self, timeout_s: float = 10.0) -> None:
        """Module or editor destroyed: stop the tree now, wait for it, remove its folder."""
        self.kill()
        try:
            self.wait(timeout_s)
        finally:
            self.cleanup()


def start_segmentation(
    channels: Sequence[io.Volume], request: SegmentRequest, python: str | Sequence[str] | None = None
) -> DeepSegJob:
    """Write the input channels to a temporary folder and start ``deepseg segment --json`` on them.

    Args:
        channels: one volume per model input channel, on one grid.
        request: model and options.
        python: interpreter or launcher command, default :func:`python_executable` (see :func:`launch`).

    Returns:
        The running job; its ``output`` is the ``.seg.nrrd`` it will write.
    """
    workdir = Path(tempfile.mkdtemp(prefix="deepseg-job-"))
    try:
        return _start_in(workdir, channels, request, python)
    except BaseException:  # a full disk, an interpreter that cannot start: no job, so no folder left behind
        shutil.rmtree(workdir, ignore_errors=True)
        raise


def _start_in(
    workdir: Path, channels: Sequence[io.Volume], request: SegmentRequest, python: str | Sequence[str] | None
) -> DeepSegJob:
    inputs = []
    for index, volume in enumerate(channels):
        inputs.append(io.write_image(volume, workdir / f"input_{index}.nrrd", compress=False))
    output = workdir / "result.seg.nrrd"
    arguments = ["segment", ",".join(str(p) for p in inputs)]
    arguments += ["--model", request.model, "--output", str(output), "--device", request.device, "--json"]
    arguments += ["--backend", request.backend, "--precision", request.precision]
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


def launch(arguments: Sequence[str], workdir: Path, output: Path, python: str | Sequence[str] | None = None) -> DeepSegJob:
    """Start ``python -m deepseg_core ARGUMENTS`` in ``workdir`` as its own process tree.

    Args:
        arguments: the ``deepseg`` command line after the program name (include ``--json``).
        workdir: the job's temporary folder (removed by :meth:`DeepSegJob.cleanup`).
        output: what the command writes (a file or a folder), kept on the job.
        python: interpreter (default :func:`python_executable`), or a launcher command as a list,
            e.g. ``[python, "launcher.py"]``, that starts the interpreter as its child.
    """
    interpreter = [python] if isinstance(python, str) else list(python or [python_executable()])
    command = [*interpreter, "-m", "deepseg_core", *arguments]
    log.info("DeepSeg: %s", " ".join(command))
    return DeepSegJob(command, workdir, output, launch_environment())
