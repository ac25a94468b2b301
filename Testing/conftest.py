"""Shared pytest set-up: the module folders are importable from the source tree, tests run on CPU.

The Slicer-side suites (``Testing/mrml``, ``Testing/extension``) also run in a Python 3.12 virtual
environment that has what a fresh Slicer has and no torch (``make test`` does both). There, engine
subprocesses run with ``$DEEPSEG_ENGINE_PYTHON`` (the 3.11 environment that has torch), exactly as
Slicer runs the engine in a separate ``PythonSlicer`` process.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
STANDINS = REPO_ROOT / "Testing" / "standins"
for module_dir in ("DeepSeg", "DeepSegTraining"):
    path = str(REPO_ROOT / module_dir)
    if path not in sys.path:
        sys.path.insert(0, path)

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
#: pytest-xdist workers in this run (``make test`` starts one per core). Each worker, and every engine
#: process it starts, gets its share of the cores: OpenMP threads that outnumber the cores spin-wait.
XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
THREADS_PER_WORKER = max(1, min(2, (os.cpu_count() or 1) // XDIST_WORKERS))
if XDIST_WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS_PER_WORKER))
#: set by `make test` for the torch-free Slicer-side run; torch must then really be absent.
SLICER_SIDE_RUN = os.environ.get("DEEPSEG_SLICER_SIDE_RUN") == "1"
TORCH_AVAILABLE = importlib.util.find_spec("torch") is not None


def pytest_configure(config):
    if SLICER_SIDE_RUN and TORCH_AVAILABLE:
        raise pytest.UsageError("the Slicer-side run must not have torch installed (it stands for a fresh Slicer)")


#: the files that take longest on 2 cores (a minute or more each; ``--durations=0`` summed per file),
#: longest first. ``make test`` runs them first (``--dist loadfile --no-loadscope-reorder``):
#: pytest-xdist otherwise starts the files with the most tests first, and a run ended with one worker
#: on a long file while the other waited. nnU-Net's comes first: on a fresh clone its fixture builds
#: the tiny nnU-Net folders (about 3 minutes) that later files need too.
LONG_FILES = (
    "Testing/foreign/test_nnunet_import.py",
    "Testing/foreign/test_nnunet_regions.py",
    "Testing/core/test_retrain.py",
    "Testing/mrml/test_panel_logic.py",
    "Testing/foreign/test_imported_fine_tune.py",
    "Testing/core/test_cli.py",
    "Testing/core/test_backends.py",
    "Testing/mrml/test_training_panel.py",
    "Testing/core/test_atomic_outputs.py",
    "Testing/mrml/test_effect_logic.py",
    "Testing/foreign/test_nnunet_cascade.py",
    "Testing/core/test_cli_segment.py",
    "Testing/realdata/test_segment_real_images.py",
    "Testing/mrml/test_jobs.py",
    "Testing/foreign/test_monai_import.py",
    "Testing/realdata/test_class_boxes_aal.py",
)


def _long_files_first(items: list[pytest.Item]) -> None:
    rank = {path: index for index, path in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: the rest keep their order


def pytest_collection_modifyitems(config, items):
    _long_files_first(items)
    if TORCH_AVAILABLE:
        return
    for item in items:
        if item.get_closest_marker("needs_torch") is not None:
            item.add_marker(pytest.mark.skip(reason="needs torch in this process; runs in the 3.11 suite"))


@pytest.fixture(scope="session")
def engine_python() -> str:
    """The interpreter that runs ``deepseg`` subprocesses (Slicer: PythonSlicer; here: one with torch)."""
    return os.environ.get("DEEPSEG_ENGINE_PYTHON", sys.executable)


@pytest.fixture(scope="session")
def engine_prepares_for(engine_python) -> str:
    """The backend ``--backend auto`` picks in the engine's interpreter, which imports and retraining prepare a new
    version's network for: ``torch`` (CUDA, or no CPU runtime installed) means nothing is prepared. Asked of the
    engine's interpreter: the Slicer-side run has no torch of its own."""
    probe = "from deepseg_core.inference import choose_device; from deepseg_core.inference.backends import choose_backend;"
    probe += " print(choose_backend('auto', choose_device('auto')).name)"
    return subprocess.run([engine_python, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture(autouse=True)
def _few_threads():
    """Keep torch at the worker's share of 2 threads (the CI machine's cores) so tests do not oversubscribe."""
    if "torch" not in sys.modules:
        yield
        return
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(min(previous, THREADS_PER_WORKER))
    yield
    torch.set_num_threads(previous)


def _unmapped_signal_stack() -> str | None:
    """The calling thread's alternate signal stack, described, when its memory is no longer mapped (Linux).

    Python installs its signal handlers to run on that stack; a library that unmaps it without
    putting back a live one (OpenVINO 2026.4's CPU plugin did) turns the next signal handled on
    this thread into a SIGSEGV, which kills the pytest-xdist worker in a later, unrelated test.
    """
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    class StackT(ctypes.Structure):
        _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]

    current = StackT()
    ss_disable = 2
    if ctypes.CDLL(None).sigaltstack(None, ctypes.byref(current)) != 0 or not current.ss_sp:
        return None
    if current.ss_flags & ss_disable:
        return None
    ends = {current.ss_sp, current.ss_sp + current.ss_size - 1}
    try:
        with open("/proc/self/maps", "rb") as maps:  # bytes: mapped files' paths need not be ASCII
            for line in maps:
                low, high = (int(bound, 16) for bound in line.split(None, 1)[0].split(b"-"))
                ends = {end for end in ends if not low <= end < high}
                if not ends:
                    return None
    except OSError:  # no /proc (a sandbox): nothing to check
        return None
    disabled = StackT(None, ss_disable, 0)
    ctypes.CDLL(None).sigaltstack(ctypes.byref(disabled), None)  # keep the worker alive for the tests after
    return f"{current.ss_size} bytes at {current.ss_sp:#x}"


@pytest.fixture(autouse=True)
def _signal_stack_left_mapped():
    """Report the test that leaves this thread's alternate signal stack unmapped (an error at its teardown),
    not the later one it would crash; checked before each test too, for a fixture torn down in between."""
    dangling = _unmapped_signal_stack()
    if dangling is not None:
        pytest.fail(f"an earlier test or a fixture's teardown left the alternate signal stack unmapped ({dangling})")
    yield
    dangling = _unmapped_signal_stack()
    if dangling is not None:
        pytest.fail(f"this test left the main thread's alternate signal stack unmapped ({dangling}): the next signal would crash")


#: lines that real-image tests report (``record_property("realdata", line)``) for the end of the run:
#: a test's own output does not reach the terminal from a pytest-xdist worker, its report does
_REAL_DATA_LINES: list[str] = []


def pytest_runtest_logreport(report):
    if report.when == "call":
        _REAL_DATA_LINES.extend(str(value) for name, value in report.user_properties if name == "realdata")


def pytest_terminal_summary(terminalreporter):
    if _REAL_DATA_LINES:
        terminalreporter.section("what the real images gave")
        for line in _REAL_DATA_LINES:
            terminalreporter.write_line(line)
