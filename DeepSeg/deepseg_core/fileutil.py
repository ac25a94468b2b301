"""Atomic file writes: a reader never sees a half-written file, a failure leaves no debris.

:func:`atomic_path` makes one file appear at once; :func:`staged_commit` makes several files (one
case's outputs) appear together, and :func:`recover_commits` finishes or discards what a crash
interrupted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import DeepSegError

log = logging.getLogger(__name__)


def _full_suffix(path: Path) -> str:
    """``.seg.nrrd`` / ``.nii.gz`` style suffixes: writers choose the format from them."""
    name = path.name
    for double in (".seg.nrrd", ".nii.gz", ".tar.gz"):
        if name.lower().endswith(double):
            return name[-len(double) :]
    return path.suffix


def check_writable_folder(path: Path) -> None:
    """Raise a clear error when ``path``'s folder is missing or not writable."""
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise DeepSegError(
            "the output folder does not exist",
            subject=folder,
            hint="Create the folder first or choose another output path.",
        )
    if not os.access(folder, os.W_OK):
        raise DeepSegError(
            "the output folder is not writable",
            subject=folder,
            hint="Choose a folder you can write to.",
        )


def check_not_a_folder(path: Path) -> None:
    """Raise a clear error when the output file ``path`` is an existing folder (a rename onto it fails)."""
    if path.is_dir():
        raise DeepSegError(
            "is a folder, not an output file",
            subject=path,
            expected="a file name (existing files are replaced)",
            found="an existing folder of that name",
            hint="Choose another output file name, or rename the folder.",
        )


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_mode(is_dir: bool = False) -> int:
    """Permissions a newly created file (0o666) or folder (0o777) gets under the current umask.

    ``tempfile`` creates private (0o600 / 0o700) files; results must get ordinary permissions.
    """
    return (0o777 if is_dir else 0o666) & ~_umask()


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` with the same suffix; rename it over ``path`` on success.

    On any exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    check_writable_folder(path)
    check_not_a_folder(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + _full_suffix(path), dir=path.parent or ".")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


# --------------------------------------------------------------------------------------------
# multi-file commits: the files of one case appear together or not at all
#
# A case is several files (segmentation + uncertainty + table; images + label + manifest), and a
# rename makes only one file atomic. So every file is first written into a staging folder beside
# its target (same file system: the final rename cannot degrade into a copy), then a journal that
# lists staged -> final is written atomically, then the staged files are renamed over their
# targets. A crash before the journal leaves the old state (recovery discards the staging
# folders); a crash after it leaves a journal that recovery finishes (it renames what is still
# staged). Renaming is idempotent: a staged file that is gone was already moved.

STAGING_PREFIX = ".deepseg-staging-"
JOURNAL_PREFIX = ".deepseg-commit-"
JOURNAL_FORMAT = 1
#: names a point at which :func:`crash_point` kills the process; for the crash-safety tests only.
CRASH_ENV = "DEEPSEG_CRASH_AT"
#: with it, only the ``torchrun`` rank of that number crashes (``$RANK``).
CRASH_RANK_ENV = "DEEPSEG_CRASH_RANK"
CRASH_POINTS = ("staged", "journal_written", "first_renamed", "renamed")
_OWNER_FILE = ".owner.json"
_JOURNAL_TMP = ".journal.tmp"
#: a staging folder made on another machine (shared folder) counts as abandoned after this long.
_FOREIGN_STAGING_STALE_S = 3600.0


def crash_point(point: str) -> None:
    """Kill this process with SIGKILL when ``$DEEPSEG_CRASH_AT`` equals ``point``. For tests only.

    The crash-safety tests set the variable to stop a real ``deepseg`` run at one step of a commit
    (see :data:`CRASH_POINTS`) exactly as a power cut or the out-of-memory killer would: no
    ``finally``, no cleanup. ``$DEEPSEG_CRASH_RANK`` limits it to one ``torchrun`` rank. Never
    set them outside tests.
    """
    rank = os.environ.get(CRASH_RANK_ENV)
    if rank is not None and rank != os.environ.get("RANK", "0"):
        return
    if os.environ.get(CRASH_ENV) == point:
        log.critical("%s=%s: killing process %d (crash test)", CRASH_ENV, point, os.getpid())
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))  # Windows: SIGTERM is TerminateProcess


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDWR if os.name == "nt" else os.O_RDONLY)  # Windows cannot fsync a read-only handle
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Make new, renamed and removed entries of ``path`` durable (POSIX; Windows has no folder handles to sync)."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _canonical(path: str | Path) -> Path:
    """Absolute path with the folder's symlinks resolved (not the file's: a rename replaces a link itself)."""
    path = Path(path)
    return path.parent.resolve() / path.name


def _relative(path: Path, start: Path) -> str:
    """``path`` relative to ``start`` when possible, so a journal survives moving the whole folder tree."""
    try:
        return os.path.relpath(path, start)
    except ValueError:  # another drive on Windows
        return str(path)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process on Windows
        import ctypes

        kernel32 = ctypes.windll.kernel32
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return False
        try:
            code = ctypes.c_ulong()
            kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
            return code.value == 259  # STILL_ACTIVE
        finally:
            kernel32.CloseHandle(handle)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _staging_owner_alive(staging: Path) -> bool:
    """Whether the process that made ``staging`` may still be writing into it (then it must be left alone)."""
    try:
        owner = json.loads((staging / _OWNER_FILE).read_text(encoding="utf-8"))
        pid, host, created = int(owner["pid"]), str(owner["host"]), float(owner["created"])
    except (OSError, ValueError, KeyError, TypeError):
        # Killed between creating the folder and writing the owner file: the id starts with the pid.
        pid_text = staging.name[len(STAGING_PREFIX) :].split("-")[0]
        if not pid_text.isdigit():
            return False
        pid, host = int(pid_text), socket.gethostname()
        try:
            created = staging.stat().st_mtime
        except FileNotFoundError:
            # its owner finished (or another run recovered) it since the caller listed it: nothing
            # is left to remove. Ranks of one torchrun recover the same output folder at once.
            return True
    if host != socket.gethostname():
        return time.time() - created < _FOREIGN_STAGING_STALE_S
    return _process_alive(pid)


def _journal_of(staging: Path) -> Path | None:
    """The journal a staging folder belongs to (it may sit in another folder), from its owner file."""
    try:
        owner = json.loads((staging / _OWNER_FILE).read_text(encoding="utf-8"))
        return staging / str(owner["journal"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _read_journal(journal: Path) -> dict[str, Any]:
    text = journal.read_text(encoding="utf-8")  # FileNotFoundError: finished meanwhile, the caller decides
    try:
        entry = json.loads(text)
        if entry.get("format") != JOURNAL_FORMAT or not isinstance(entry.get("moves"), list):
            raise ValueError(f"format {entry.get('format')!r}, moves {type(entry.get('moves')).__name__}")
        return entry
    except (ValueError, AttributeError) as exc:
        raise DeepSegError(
            "cannot read the journal of an interrupted write",
            subject=journal,
            expected=f"a DeepSeg commit journal (format {JOURNAL_FORMAT})",
            found=str(exc),
            hint="Check the files it lists; if they are complete, delete the journal and its staging folders.",
        ) from None


def _roll_forward(journal: Path, entry: dict[str, Any], crash_points: bool = False) -> list[Path]:
    """Rename every still-staged file of ``entry`` over its target, then remove the journal and staging.

    Idempotent: a staged file that is gone was renamed before (by an earlier attempt or by a process
    finishing the same journal at the same time). Returns the targets of the commit.
    """
    base = journal.parent
    finals: list[Path] = []
    for index, move in enumerate(entry["moves"]):
        staged, final = base / move["staged"], base / move["final"]
        try:
            os.replace(staged, final)
        except FileNotFoundError:
            if not final.exists():
                log.warning("%s: neither the staged file nor the target exists (removed by someone?)", final)
        finals.append(_canonical(final))
        if index == 0 and crash_points:
            crash_point("first_renamed")
    for folder in dict.fromkeys(final.parent for final in finals):
        with contextlib.suppress(FileNotFoundError):  # a target folder someone removed: nothing to make durable
            _fsync_dir(folder)  # the renames are durable before the journal that could redo them goes
    if crash_points:
        crash_point("renamed")
    journal.unlink(missing_ok=True)
    for staging in entry.get("staging", []):
        shutil.rmtree(base / staging, ignore_errors=True)
    return finals


def _finish_journal(journal: Path) -> list[Path]:
    try:
        return _roll_forward(journal, _read_journal(journal))
    except OSError as exc:
        if isinstance(exc, FileNotFoundError) and not journal.exists():
            return []  # its owner (or another recovery) finished it meanwhile
        hint = "Make the folder writable and run again; nothing is lost, the journal still lists the staged files."
        if isinstance(exc, IsADirectoryError) and exc.filename2:
            hint = f"The target {exc.filename2} is a folder: rename or remove it, then run again."
        raise DeepSegError("cannot finish an interrupted write", subject=journal, found=str(exc), hint=hint) from None


@contextlib.contextmanager
def cancel_deferred() -> Iterator[None]:
    """Hold SIGTERM and SIGINT (Cancel, Ctrl-C) until the block ends, then deliver them.

    Used around a commit's journal and rename phase so that a cancel lands either before the
    journal (nothing changes) or after the commit (all changed), never between two renames.
    The Python handlers are swapped for recording ones rather than blocking the signals with
    ``pthread_sigmask``: that blocks them for the calling thread only, and a process-directed
    signal is then delivered to another thread (torch's worker threads), whose C handler still
    makes the main thread raise. Signals run their Python handler in the main thread only, so
    elsewhere nothing needs deferring.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []

    def defer(signum: int, frame: object) -> None:
        pending.append(signum)

    previous: dict[int, Any] = {}
    for signum in (signal.SIGTERM, signal.SIGINT):
        handler = signal.getsignal(signum)
        if handler not in (signal.SIG_IGN, None):  # None: installed outside Python; leave it
            previous[signum] = signal.signal(signum, defer)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(pending):
            signal.raise_signal(signum)  # now the original handler runs (KeyboardInterrupt in the CLI)


#: how often a wait for a lock held by another process looks again
LOCK_POLL_S = 0.1


class LockHeld(Exception):
    """Raised by :func:`exclusive_lock` with ``wait=False`` when another holder has the lock."""


@contextlib.contextmanager
def exclusive_lock(path: Path, on_wait: Callable[[], None] | None = None, *, wait: bool = True) -> Iterator[bool]:
    """Hold an exclusive lock on the file ``path`` (made if missing, never removed) for the block.

    Between processes and between threads alike: each call opens the file anew, and ``flock`` (or, on
    Windows, ``msvcrt.locking``) locks per open file. ``on_wait`` is called once when another holder makes
    this one wait. The wait ends with the block of whoever holds the lock, or with its process (the OS
    releases a dead process's locks); it polls every ``LOCK_POLL_S``, so a Cancel (SIGTERM, Ctrl-C) ends it
    at once. Yields True while the lock is held, or False at once where no lock can be had (a cache folder
    this user cannot write to and no lock file in it, a file system without locks): the block then runs
    unlocked, as it would have without this. ``wait=False``: raise :class:`LockHeld` at once instead of waiting.
    """
    handle = _open_lock_file(path)
    if handle is None:
        yield False
        return
    with handle:
        held = True
        try:
            _lock(handle, on_wait, wait)
        except OSError as exc:  # ENOLCK, EOPNOTSUPP: a file system that keeps no locks
            log.debug("running without the lock %s: %s", path, exc)
            held = False
        try:
            yield held  # outside the except clause: the block's own errors carry no lock error as their context
        finally:
            if held:
                with contextlib.suppress(OSError):  # never hide the block's own error; closing releases it anyway
                    _unlock(handle)


def _open_lock_file(path: Path) -> Any:
    """``path`` opened for locking (made if missing), or read-only where this user cannot write it (a shared
    store: ``flock`` and ``msvcrt.locking`` lock read-only files too); None where neither can be had."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return path.open("a+b")
    except OSError as exc:
        try:
            return path.open("rb")
        except OSError:
            log.debug("running without the lock %s: %s", path, exc)
            return None


def _lock(handle: Any, on_wait: Callable[[], None] | None, wait: bool = True) -> None:
    """Lock ``handle``'s file, waiting for another holder (calling ``on_wait`` first), or raising :class:`LockHeld`."""
    waited = False
    while not _try_lock(handle):
        if not wait:
            raise LockHeld(handle.name)
        if not waited and on_wait is not None:
            try:
                on_wait()
            except Exception as exc:  # saying so failed (a closed pipe): the wait, and the lock, go on
                log.debug("could not say that %s is waited for: %s", handle.name, exc)
        waited = True
        time.sleep(LOCK_POLL_S)  # a signal handler that raises (Cancel) ends the wait here


def _try_lock(handle: Any) -> bool:
    """Whether ``handle``'s file is now locked by this handle; False while another holds it."""
    if os.name == "nt":
        import msvcrt

        handle.seek(0)
        try:
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        except PermissionError:  # EACCES: held by another handle
            return False
        return True
    import fcntl

    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _unlock(handle: Any) -> None:
    if os.name == "nt":
        import msvcrt

        handle.seek(0)
        msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)
        return
    import fcntl

    fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


class StagedCommit:
    """Write several files so that they replace their targets together or not at all.

    Use :func:`staged_commit`, write each target's file at :meth:`stage`, and leave the block::

        with staged_commit([seg_path, stats_path]) as commit:
            io.write_segmentation(commit.stage(seg_path), ...)
            write_measurements_csv(commit.stage(stats_path), rows)

    Every target must be written. Files land in ``.deepseg-staging-<id>/`` beside their target;
    the journal ``.deepseg-commit-<id>.json`` goes into the first target's folder.
    """

    def __init__(self, targets: Sequence[str | Path]) -> None:
        self.targets = [_canonical(t) for t in targets]
        if not self.targets or len(set(self.targets)) != len(self.targets):
            raise DeepSegError(
                "the outputs must be distinct files",
                expected="one path per output",
                found=", ".join(str(t) for t in targets) or "no paths",
                hint="Give each output its own file name.",
            )
        for target in self.targets:
            # before anything is staged: a journal whose rename cannot happen would block the folder
            check_not_a_folder(target)
        self.id = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"  # the pid first: recovery can tell a live owner
        self.journal = self.targets[0].parent / f"{JOURNAL_PREFIX}{self.id}.json"
        self._staging: dict[Path, Path] = {}  # target folder -> staging folder

    def stage(self, target: str | Path) -> Path:
        """Where to write ``target``'s new content (same file name, inside the staging folder)."""
        target = _canonical(target)
        if target not in self.targets:
            raise ValueError(f"{target} is not a target of this commit")
        folder = self._staging.get(target.parent)
        if folder is None:
            check_writable_folder(target)
            folder = target.parent / f"{STAGING_PREFIX}{self.id}"
            folder.mkdir()
            self._staging[target.parent] = folder
            owner = {"pid": os.getpid(), "host": socket.gethostname(), "created": time.time()}
            (folder / _OWNER_FILE).write_text(json.dumps({**owner, "journal": _relative(self.journal, folder)}), "utf-8")
        return folder / target.name

    def commit(self) -> list[Path]:
        """Make every staged file its target's content, all together; returns the targets."""
        staged = {target: self._staging[target.parent] / target.name for target in self.targets if target.parent in self._staging}
        missing = [str(t) for t in self.targets if t not in staged or not staged[t].is_file()]
        if missing:
            raise DeepSegError(
                "not every file of the commit was written",
                expected="a staged file for every target",
                found=f"none for {', '.join(missing)}",
                hint="This is a bug in DeepSeg; no target was changed. Please report it.",
            )
        expected = {*staged.values(), *(folder / _OWNER_FILE for folder in self._staging.values())}
        stray = [p.name for folder in self._staging.values() for p in folder.iterdir() if p not in expected]
        if stray:
            raise DeepSegError(
                "the staging folder holds files that are not targets of the commit",
                found=", ".join(sorted(stray)),
                hint="This is a bug in DeepSeg (a writer wrote an undeclared file); no target was changed.",
            )
        for path in staged.values():
            _fsync_file(path)
        for folder in self._staging.values():
            _fsync_dir(folder)
            _fsync_dir(folder.parent)
        crash_point("staged")
        home = self.journal.parent
        entry = {
            "format": JOURNAL_FORMAT,
            "id": self.id,
            "pid": os.getpid(),
            "moves": [{"staged": _relative(staged[t], home), "final": _relative(t, home)} for t in self.targets],
            "staging": [_relative(folder, home) for folder in self._staging.values()],
        }
        with cancel_deferred():
            tmp = self._staging[home] / _JOURNAL_TMP
            tmp.write_text(json.dumps(entry, indent=2) + "\n", encoding="utf-8")
            _fsync_file(tmp)
            os.replace(tmp, self.journal)
            _fsync_dir(home)
            crash_point("journal_written")
            return _roll_forward(self.journal, entry, crash_points=True)

    def discard(self) -> None:
        """Remove the staging folders, unless a journal exists (then the commit must be finished, not undone)."""
        if self.journal.exists():
            return
        for folder in self._staging.values():
            shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def staged_commit(targets: Sequence[str | Path]) -> Iterator[StagedCommit]:
    """A :class:`StagedCommit` committed when the block ends normally and discarded on any exception."""
    commit = StagedCommit(targets)
    try:
        yield commit
        commit.commit()
    except BaseException:
        commit.discard()
        raise


@dataclass
class RecoveryReport:
    """What :func:`recover_commits` did: commits finished (their targets) and staging folders discarded."""

    finished: list[Path] = field(default_factory=list)
    discarded: list[Path] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.finished or self.discarded)

    def summary(self) -> str:
        """One line for the log."""
        parts = []
        if self.finished:
            parts.append(f"finished an interrupted write of {', '.join(str(p) for p in self.finished)}")
        if self.discarded:
            parts.append(f"discarded the unfinished write(s) staged in {', '.join(str(p) for p in self.discarded)}")
        return "; ".join(parts) or "nothing to recover"


def _folders(paths: Iterable[str | Path]) -> list[Path]:
    """Each path's folder (a folder stands for itself), resolved, without duplicates."""
    folders = (Path(p) if Path(p).is_dir() else Path(p).parent for p in paths)
    return [f for f in dict.fromkeys(f.resolve() for f in folders) if f.is_dir()]


def recover_commits(paths: Iterable[str | Path]) -> RecoveryReport:
    """Finish or discard the commits a crash interrupted in the folders of ``paths`` (folders or files).

    Every journal found is rolled forward and removed; a staging folder whose journal exists (it
    may sit in another folder) is finished the same way; one without a journal whose process is
    gone is removed. Staging folders of a process that is still writing are left alone.

    Raises:
        DeepSegError: a journal cannot be read or finished (e.g. a read-only folder); it stays.
    """
    report = RecoveryReport()
    folders = _folders(paths)
    for folder in folders:
        for journal in sorted(folder.glob(f"{JOURNAL_PREFIX}*.json")):
            report.finished.extend(_finish_journal(journal))
    for folder in folders:
        for staging in sorted(p for p in folder.glob(f"{STAGING_PREFIX}*") if p.is_dir()):
            journal = _journal_of(staging)
            if journal is not None and journal.exists():
                report.finished.extend(_finish_journal(journal))
            elif not _staging_owner_alive(staging):
                try:
                    shutil.rmtree(staging)
                    report.discarded.append(staging)
                except OSError as exc:
                    log.warning("cannot remove the unfinished write staged in %s: %s", staging, exc)
    return report


def pending_targets(paths: Iterable[str | Path]) -> set[Path]:
    """Targets named by an unfinished commit (a journal, or a file in a staging folder) in the folders of ``paths``."""
    pending: set[Path] = set()
    journals: set[Path] = set()
    for folder in _folders(paths):
        journals.update(folder.glob(f"{JOURNAL_PREFIX}*.json"))
        for staging in (p for p in folder.glob(f"{STAGING_PREFIX}*") if p.is_dir()):
            with contextlib.suppress(OSError):
                pending.update(folder / p.name for p in staging.iterdir())
            journal = _journal_of(staging)
            if journal is not None:
                journals.add(journal)
    for journal in journals:
        with contextlib.suppress(OSError, ValueError):
            entry = json.loads(journal.read_text(encoding="utf-8"))
            pending.update(_canonical(journal.parent / move["final"]) for move in entry["moves"])
    return pending


def outputs_complete(targets: Iterable[str | Path]) -> bool:
    """True when every target exists and no unfinished commit (journal or staging folder) names one.

    What a rerun checks to skip a case that an earlier run finished.
    """
    targets = [_canonical(t) for t in targets]
    return all(t.is_file() for t in targets) and not pending_targets(targets) & set(targets)
