"""Atomic file writes: a reader never sees a half-written file, a failure leaves no debris."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import DeepSegError


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
