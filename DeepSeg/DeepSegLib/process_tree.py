"""Start a command as its own process tree and stop the whole tree.

Inside Slicer the engine runs under ``PythonSlicer``, a launcher that sets up the environment and
starts the real Python as a *child*. Signalling only the launcher leaves that child running (the GPU
stays busy, a training run may still store a version), so every job gets its own process group
(POSIX session / Windows process group) and is stopped as a group:

- POSIX: ``SIGTERM`` to the group first (the engine exits 130 and writes nothing), ``SIGKILL`` to
  the group when the grace period is over (native code that ignores ``SIGTERM``, e.g. a long ITK
  filter, is stopped too). The tree is gone when no member of the group is left (zombies, which
  can hold no resources, do not count).
- Windows: ``taskkill /T /F`` ends the launcher and all its descendants; the console window is
  hidden as ``slicer.util.launchConsoleProcess`` hides it.

No Slicer, Qt or third-party imports, so it runs in tests as it runs in Slicer.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

IS_WINDOWS = os.name == "nt"


def start_process_group(
    command: Sequence[str], env: dict[str, str], cwd: Path, *, merge_stderr: bool = False
) -> subprocess.Popen[str]:
    """Start ``command`` as the leader of a new process group, stdout (and stderr) piped as text.

    Args:
        command: program and arguments.
        env: the complete environment of the new process.
        cwd: its working folder.
        merge_stderr: send stderr into the stdout pipe (one stream) instead of its own pipe.
    """
    kwargs: dict = {}
    if IS_WINDOWS:
        info = subprocess.STARTUPINFO()  # type: ignore[attr-defined]
        info.dwFlags |= subprocess.STARTF_USESHOWWINDOW  # type: ignore[attr-defined]
        info.wShowWindow = 0  # SW_HIDE: no console window pops up (as Slicer's launchConsoleProcess)
        kwargs["startupinfo"] = info
        kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW  # type: ignore[attr-defined]
    else:
        kwargs["start_new_session"] = True
    return subprocess.Popen(
        list(command),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        encoding="utf-8",
        errors="replace",
        env=env,
        cwd=str(cwd),
        **kwargs,
    )


def _linux_group_members(group_id: int) -> list[int]:
    """PIDs of the live (non-zombie) processes whose process group is ``group_id`` (from /proc)."""
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", encoding="ascii", errors="replace") as handle:
                stat = handle.read()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ...": comm may contain spaces and parentheses.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) >= 3 and int(fields[2]) == group_id and fields[0] not in ("Z", "X"):
            members.append(int(entry.name))
    return members


def group_members(process: subprocess.Popen) -> list[int]:
    """Live processes of ``process``'s tree (its group); empty once the whole tree has exited.

    On Windows only the launcher itself is known; ``taskkill /T`` takes its descendants with it.
    """
    process.poll()  # reap the launcher so it does not linger as a zombie
    if IS_WINDOWS:
        return [] if process.returncode is not None else [process.pid]
    if sys.platform.startswith("linux") and os.path.isdir("/proc"):
        return _linux_group_members(process.pid)
    try:
        os.killpg(process.pid, 0)
    except ProcessLookupError:
        return []
    except PermissionError:
        pass
    return [process.pid]


def terminate_group(process: subprocess.Popen) -> None:
    """Ask the whole tree to stop (POSIX ``SIGTERM`` to the group; Windows ends the tree at once)."""
    if IS_WINDOWS:
        kill_group(process)
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGTERM)


def kill_group(process: subprocess.Popen) -> None:
    """Stop the whole tree now (POSIX ``SIGKILL`` to the group, Windows ``taskkill /T /F``)."""
    if IS_WINDOWS:
        subprocess.run(
            ["taskkill", "/T", "/F", "/PID", str(process.pid)],
            capture_output=True,
            check=False,
            creationflags=subprocess.CREATE_NO_WINDOW,  # type: ignore[attr-defined]
        )
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
