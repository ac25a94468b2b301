"""First-run dependencies inside Slicer: what is missing, how to install it (with consent), which GPU.

A fresh Slicer bundles numpy, scipy, SimpleITK and VTK but not the engine's other packages. The
panels call :func:`missing_packages` before the first Segment or Start, show the
:class:`InstallOffer` message, and only after the user agreed run :func:`run_install`:

1. torch: through the PyTorch extension's installer (``PyTorchUtils``) when that extension is
   present, as SlicerTotalSegmentator and SlicerMONAIAuto3DSeg do (it picks the CUDA build for the
   GPU); otherwise ``pip install torch`` from PyTorch's index for the driver's CUDA version
   (:func:`torch_index_tag`), or the CPU index without an NVIDIA GPU.
2. the engine's other packages with one ``pip install``.

Every pip run gets a constraints file that pins the packages Slicer itself ships at the versions
installed, so an install can never replace Slicer's numpy, SimpleITK or VTK.

Nothing here imports torch or initialises CUDA: the GPU line comes from ``nvidia-smi``. Standard
library only, so it runs in a Slicer that has nothing installed yet.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import json
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

#: import name -> pip requirement of the engine (the same ranges as pyproject.toml's dependencies).
ENGINE_REQUIREMENTS = {
    "numpy": "numpy>=1.26",
    "scipy": "scipy>=1.11",
    "SimpleITK": "SimpleITK>=2.3",
    "torch": "torch>=2.2",
    "safetensors": "safetensors>=0.4",
    "slicerio": "slicerio>=1.0",
    "jsonschema": "jsonschema>=4.0",
}
#: the CPU inference runtime offered with the first install on machines without an NVIDIA GPU
#: (deepseg[cpu-fast]; DeepSeg uses it automatically, 1.5-3x faster than PyTorch on a CPU).
CPU_RUNTIME = ("openvino", "openvino>=2025.0")
#: distributions Slicer ships whose replacement would break Slicer itself: pinned during installs.
#: (Slicer 5.10 ships numpy 2.0.2, scipy 1.13.1, its own SimpleITK 2.5.2 and VTK 9.5.2 builds,
#: pydicom 2.4.4, requests 2.32.3, Pillow 11.2.1: SuperBuild/External_python-*.cmake at v5.10.0.)
SLICER_PROTECTED_DISTRIBUTIONS = ("numpy", "scipy", "SimpleITK", "vtk", "pydicom", "requests", "pillow")
TORCH_INDEX_URL = "https://download.pytorch.org/whl/{tag}"
#: (oldest driver CUDA version, wheel tag), newest first: the newest build the driver can run.
#: cu128 is the first build with Blackwell (RTX 50-series, sm_120) kernels.
TORCH_CUDA_TAGS = (((13, 0), "cu130"), ((12, 8), "cu128"), ((12, 6), "cu126"), ((12, 4), "cu124"), ((11, 8), "cu118"))
#: CUDA builds light-the-torch 0.8 (inside older PyTorch extensions) does not detect.
NEWER_THAN_LTT = ("cu128", "cu130")


def importable(name: str, find_spec: Callable[[str], object | None] = importlib.util.find_spec) -> bool:
    """True when ``name`` can be imported here (checked without importing it)."""
    try:
        return find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def missing_packages(find_spec: Callable[[str], object | None] = importlib.util.find_spec) -> list[str]:
    """Import names of the engine's dependencies that this Python cannot import."""
    return [name for name in ENGINE_REQUIREMENTS if not importable(name, find_spec)]


_INTERPRETER_PROBE = (
    "import importlib.util, json, sys\nprint(json.dumps([n for n in sys.argv[1:] if importlib.util.find_spec(n) is None]))\n"
)


@functools.cache
def _missing_in(python: tuple[str, ...]) -> tuple[str, ...]:
    result = subprocess.run(
        [*python, "-c", _INTERPRETER_PROBE, *ENGINE_REQUIREMENTS], capture_output=True, text=True, timeout=120, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"the engine's Python ({' '.join(python)}) does not start: {result.stderr.strip()[-300:]}")
    return tuple(json.loads(result.stdout.strip().splitlines()[-1]))


def engine_missing_packages(
    python: str | Sequence[str] | None, find_spec: Callable[[str], object | None] = importlib.util.find_spec
) -> list[str]:
    """The engine's missing packages: in this Python (Slicer runs the engine with its own Python,
    ``PythonSlicer``), or, when the engine runs with another interpreter, in that one (asked once)."""
    if python is None:
        return missing_packages(find_spec)
    return list(_missing_in((python,) if isinstance(python, str) else tuple(python)))


def require_engine(python: str | Sequence[str] | None, find_spec: Callable[[str], object | None], error: type[Exception]) -> None:
    """Raise ``error`` naming the missing packages when the engine cannot run yet (the panels'
    buttons check this before they start anything; the install offer comes first)."""
    missing = engine_missing_packages(python, find_spec)
    if missing:
        raise error(f"DeepSeg's packages are not installed yet ({', '.join(missing)}); accept the install offer.")


@dataclass(frozen=True)
class GpuInfo:
    """What ``nvidia-smi`` reports about the first NVIDIA GPU."""

    name: str
    memory_total_gb: float
    memory_free_gb: float
    driver_version: str
    cuda_version: str | None


def _nvidia_smi(arguments: Sequence[str]) -> str | None:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        result = subprocess.run([smi, *arguments], capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout if result.returncode == 0 else None


def nvidia_gpu() -> GpuInfo | None:
    """The first NVIDIA GPU as ``nvidia-smi`` sees it, or None (no driver, no GPU)."""
    query = _nvidia_smi(["--query-gpu=name,memory.total,memory.free,driver_version", "--format=csv,noheader,nounits"])
    if not query or not query.strip():
        return None
    fields = [f.strip() for f in query.strip().splitlines()[0].split(",")]
    if len(fields) < 4:
        return None
    header = _nvidia_smi([]) or ""
    marker = "CUDA Version:"
    cuda = header.split(marker, 1)[1].split()[0] if marker in header else None
    try:
        total, free = float(fields[1]) / 1024, float(fields[2]) / 1024
    except ValueError:
        total = free = float("nan")
    return GpuInfo(fields[0], total, free, fields[3], cuda)


def torch_index_tag(cuda_version: str | None) -> str:
    """PyTorch wheel index tag for a driver's CUDA version (``"12.8"`` -> ``cu128``); ``cpu`` without one."""
    if not cuda_version:
        return "cpu"
    try:
        major, minor = (int(part) for part in cuda_version.split(".")[:2])
    except ValueError:
        return "cpu"
    for oldest, tag in TORCH_CUDA_TAGS:
        if (major, minor) >= oldest:
            return tag
    return "cpu"


def installed_torch_build() -> str | None:
    """The installed torch's version string (``2.9.1+cu128``, ``2.9.1+cpu``), read without importing it."""
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None


def device_summary(gpu: GpuInfo | None, torch_version: str | None) -> str:
    """The panel's device line (no CUDA initialised in Slicer's process)."""
    if gpu is None:
        return "No NVIDIA GPU found: DeepSeg runs on the CPU."
    text = f"GPU: {gpu.name}, {gpu.memory_free_gb:.1f} of {gpu.memory_total_gb:.1f} GB free (driver {gpu.driver_version}"
    text += f", CUDA {gpu.cuda_version})." if gpu.cuda_version else ")."
    if torch_version is not None and "+cpu" in torch_version:
        text += f" PyTorch {torch_version} is a CPU build, so the GPU is not used; reinstall PyTorch with CUDA."
    return text


@dataclass(frozen=True)
class InstallStep:
    """One install action.

    Attributes:
        kind: ``pytorchutils`` (the PyTorch extension installs torch) or ``pip``.
        requirements: what is installed (pip requirement strings).
        pip_arguments: the complete ``pip install`` arguments (``pip`` steps).
        computation_backend: the CUDA build the PyTorch extension must take (``cu128``), or None to
            let it choose.
    """

    kind: str
    requirements: tuple[str, ...]
    pip_arguments: tuple[str, ...] = ()
    computation_backend: str | None = None

    def describe(self) -> str:
        """One line for the consent dialog."""
        if self.kind == "pytorchutils":
            return f"PyTorch extension installer: {' '.join(self.requirements)} (the build that fits this computer's GPU)"
        return "pip install " + " ".join(self.pip_arguments)


@dataclass(frozen=True)
class InstallOffer:
    """What the panel asks the user before installing anything."""

    missing: tuple[str, ...]
    steps: tuple[InstallStep, ...]
    constraints: tuple[str, ...]

    def message(self) -> str:
        """The consent dialog's text."""
        lines = "\n".join(f"  - {step.describe()}" for step in self.steps)
        protected = ", ".join(c.split("==")[0] for c in self.constraints) or "none found"
        return (
            f"DeepSeg needs Python packages that this Slicer does not have yet: {', '.join(self.missing)}.\n\n"
            f"Install them now? This runs:\n{lines}\n\n"
            f"Slicer's own packages stay at their versions ({protected}). It can take several minutes and "
            "download up to a few GB. Nothing is installed if you cancel; DeepSeg then cannot segment or train."
        )


def protected_constraints(version_of: Callable[[str], str] = importlib.metadata.version) -> tuple[str, ...]:
    """``name==version`` for each of :data:`SLICER_PROTECTED_DISTRIBUTIONS` that is installed."""
    pins = []
    for name in SLICER_PROTECTED_DISTRIBUTIONS:
        try:
            pins.append(f"{name}=={version_of(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return tuple(pins)


def plan_install(
    missing: Sequence[str],
    cuda_version: str | None,
    has_pytorch_extension: bool,
    constraints: Sequence[str],
    offer_cpu_runtime: bool = False,
) -> InstallOffer:
    """The steps that install ``missing`` (import names of :data:`ENGINE_REQUIREMENTS`).

    Args:
        missing: what :func:`missing_packages` returned.
        cuda_version: the NVIDIA driver's CUDA version (``nvidia_gpu().cuda_version``), None without a GPU.
        has_pytorch_extension: the PyTorch extension (``PyTorchUtils``) is importable.
        constraints: pins that protect Slicer's packages (:func:`protected_constraints`).
        offer_cpu_runtime: without an NVIDIA GPU, also install :data:`CPU_RUNTIME` (faster CPU inference).
    """
    steps = []
    if "torch" in missing:
        requirement = ENGINE_REQUIREMENTS["torch"]
        if has_pytorch_extension:
            # PyTorchUtils' light-the-torch up to 0.8 knows CUDA only up to 12.6, whose builds have no
            # Blackwell (RTX 50-series) kernels: name the newer build when the driver supports it.
            tag = torch_index_tag(cuda_version)
            steps.append(InstallStep("pytorchutils", (requirement,), computation_backend=tag if tag in NEWER_THAN_LTT else None))
        else:
            index = TORCH_INDEX_URL.format(tag=torch_index_tag(cuda_version))
            # The PyTorch index also serves numpy & co.: the constraints keep Slicer's versions.
            steps.append(InstallStep("pip", (requirement,), (requirement, "--index-url", index)))
    others = tuple(ENGINE_REQUIREMENTS[name] for name in missing if name != "torch")
    if cuda_version is None and offer_cpu_runtime:
        others += (CPU_RUNTIME[1],)
    if others:
        steps.append(InstallStep("pip", others, others))
    return InstallOffer(tuple(missing), tuple(steps), tuple(constraints))


def install_offer(
    find_spec: Callable[[str], object | None] = importlib.util.find_spec, python: str | Sequence[str] | None = None
) -> InstallOffer | None:
    """What must be installed before the engine can run, for the consent dialog (None: nothing).

    ``python``: the engine's interpreter when it is not this one (see :func:`engine_missing_packages`).
    """
    missing = engine_missing_packages(python, find_spec)
    if not missing:
        return None
    gpu = nvidia_gpu()
    return plan_install(
        missing,
        gpu.cuda_version if gpu else None,
        importable("PyTorchUtils", find_spec),
        protected_constraints(),
        offer_cpu_runtime=not importable(CPU_RUNTIME[0], find_spec),
    )


def run_install(
    offer: InstallOffer,
    pip_install: Callable[[list[str]], object],
    pytorch_utils: object | None = None,
    constraints_folder: Path | None = None,
) -> None:
    """Carry out an accepted :class:`InstallOffer`.

    Args:
        offer: the offer the user accepted.
        pip_install: runs ``pip install ARGS`` in Slicer's Python (``slicer.util.pip_install``).
        pytorch_utils: the ``PyTorchUtils`` module, for ``pytorchutils`` steps.
        constraints_folder: where the temporary constraints file goes (default: the temp folder).

    Raises:
        RuntimeError: the PyTorch extension did not install torch.
    """
    with tempfile.TemporaryDirectory(dir=constraints_folder) as folder:
        constraints_file = Path(folder) / "slicer-constraints.txt"
        constraints_file.write_text("\n".join(offer.constraints) + "\n", encoding="utf-8")
        for step in offer.steps:
            if step.kind == "pytorchutils":
                if pytorch_utils is None:
                    raise RuntimeError("the PyTorch extension (PyTorchUtils) is needed for this step but not available")
                logic = pytorch_utils.PyTorchUtilsLogic()
                if not logic.torchInstalled():
                    version = step.requirements[0].removeprefix("torch")
                    installed = logic.installTorch(
                        askConfirmation=False, forceComputationBackend=step.computation_backend, torchVersionRequirement=version
                    )
                    if installed is None:
                        raise RuntimeError("the PyTorch extension did not install PyTorch; see the Python console")
                continue
            pip_install([*step.pip_arguments, "--constraint", str(constraints_file)])
