"""Which 3D Slicer DeepSeg runs in, decided before anything else of DeepSeg is imported.

The engine needs Python 3.11 or newer (``X | None`` evaluated at run time, ``datetime.UTC``,
``zip(strict=True)``); Slicer 5.10 and 5.12 ship Python 3.12, Slicer 5.8 ships 3.9. This file is
parsed and run by Python 3.9 too (tested), so an old Slicer shows one clear sentence instead of a
traceback: it uses only syntax and modules that Python 3.9 has.
"""

from __future__ import annotations

import sys

#: the oldest Slicer release DeepSeg supports, and the Python it ships.
MINIMUM_SLICER = (5, 10)
MINIMUM_PYTHON = (3, 11)
SUPPORTED_SLICER_TEXT = "3D Slicer 5.10 or later (Python 3.12)"


def unsupported_reason(
    python_version: tuple[int, int] | None = None, slicer_version: tuple[int, int] | None = None
) -> str | None:
    """None when this Slicer can run DeepSeg, else the one message the panels show instead.

    Args:
        python_version: ``(major, minor)`` of the running Python (default: this interpreter).
        slicer_version: ``(major, minor)`` of the running Slicer, when known.
    """
    python_version = tuple(python_version or sys.version_info[:2])
    problems = []
    if slicer_version is not None and tuple(slicer_version) < MINIMUM_SLICER:
        problems.append("this is Slicer {}.{}".format(*slicer_version))
    if python_version < MINIMUM_PYTHON:
        problems.append("its Python is {}.{} (DeepSeg needs {}.{} or newer)".format(*python_version, *MINIMUM_PYTHON))
    if not problems:
        return None
    return (
        "DeepSeg needs {}; {}. Install a current Slicer release from download.slicer.org and add the "
        "DeepSeg extension there.".format(SUPPORTED_SLICER_TEXT, ", and ".join(problems))
    )
