"""First-run install inside Slicer: what is missing, which torch build, how Slicer's packages are
protected, and what is run after consent.

``slicer.util.pip_install`` and the PyTorch extension's ``PyTorchUtilsLogic`` belong to the Slicer
application; the two small stand-ins below record what DeepSeg asks of them (the argument types
are checked as Slicer checks them: ``pip_install`` takes a ``list`` or a ``str``, util.py 3991-4034).
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest

from DeepSegLib import dependencies

REPO = Path(__file__).resolve().parents[2]
STANDINS = REPO / "Testing" / "standins"


def test_engine_requirements_are_the_packages_dependencies():
    declared = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    assert sorted(dependencies.ENGINE_REQUIREMENTS.values()) == sorted(declared)


@pytest.mark.parametrize(
    ("driver_cuda", "tag"),
    [
        (None, "cpu"),
        ("11.4", "cpu"),
        ("11.8", "cu118"),
        ("12.4", "cu124"),
        ("12.6", "cu126"),
        ("12.8", "cu128"),
        ("12.9", "cu128"),
        ("13.0", "cu130"),
    ],
)
def test_the_torch_build_follows_the_driver_and_reaches_blackwell_builds(driver_cuda, tag):
    assert dependencies.torch_index_tag(driver_cuda) == tag


def test_missing_packages_treats_a_refused_import_as_missing():
    def find_spec(name):
        if name == "torch":
            raise ModuleNotFoundError("No module named 'torch'")
        return None if name == "slicerio" else object()

    assert dependencies.missing_packages(find_spec) == ["torch", "slicerio"]


def test_without_the_pytorch_extension_torch_comes_from_the_drivers_index_and_slicers_packages_are_pinned():
    installed = {"numpy": "2.0.2", "SimpleITK": "2.5.2", "vtk": "9.5.2"}

    def version_of(name):
        if name not in installed:
            raise dependencies.importlib.metadata.PackageNotFoundError(name)
        return installed[name]

    constraints = dependencies.protected_constraints(version_of)
    offer = dependencies.plan_install(["torch", "jsonschema", "slicerio"], "12.9", False, constraints)
    assert constraints == ("numpy==2.0.2", "SimpleITK==2.5.2", "vtk==9.5.2")
    torch_step, rest = offer.steps
    assert torch_step.pip_arguments == ("torch>=2.2", "--index-url", "https://download.pytorch.org/whl/cu128")
    assert rest.pip_arguments == ("jsonschema>=4.0", "slicerio>=1.0")
    message = offer.message()
    assert "pip install torch>=2.2 --index-url https://download.pytorch.org/whl/cu128" in message
    assert "Slicer's own packages stay at their versions (numpy, SimpleITK, vtk)" in message


def test_the_pytorch_extension_installs_torch_and_is_told_the_blackwell_build():
    assert dependencies.plan_install(["torch"], "12.9", True, ()).steps[0].computation_backend == "cu128"
    assert dependencies.plan_install(["torch"], "12.4", True, ()).steps[0].computation_backend is None  # its own choice
    assert dependencies.plan_install(["torch"], None, True, ()).steps[0].kind == "pytorchutils"


class PipInstallStandIn:
    """Records ``slicer.util.pip_install`` calls and the constraints file as it was at call time."""

    def __init__(self):
        self.calls = []

    def __call__(self, requirements):
        assert type(requirements) is list, "slicer.util.pip_install accepts a list or a str only"
        constraint = Path(requirements[requirements.index("--constraint") + 1])
        self.calls.append((requirements, constraint.read_text(encoding="utf-8")))


class PyTorchUtilsStandIn:
    """The PyTorch extension's module: ``PyTorchUtilsLogic().installTorch(...)`` (PyTorchUtils.py 194-227)."""

    calls: list[dict] = []

    class PyTorchUtilsLogic:
        @staticmethod
        def torchInstalled():
            return False

        def installTorch(self, askConfirmation=False, forceComputationBackend=None, torchVersionRequirement=None, **kwargs):
            PyTorchUtilsStandIn.calls.append(
                {"ask": askConfirmation, "backend": forceComputationBackend, "requirement": torchVersionRequirement}
            )
            return object()


def test_an_accepted_offer_runs_the_extension_then_one_pip_install_with_the_pins(tmp_path):
    offer = dependencies.plan_install(["torch", "safetensors"], "12.8", True, ("numpy==2.0.2",))
    pip = PipInstallStandIn()
    dependencies.run_install(offer, pip, PyTorchUtilsStandIn, constraints_folder=tmp_path)
    assert PyTorchUtilsStandIn.calls == [{"ask": False, "backend": "cu128", "requirement": ">=2.2"}]
    ((arguments, constraints),) = pip.calls
    assert arguments[:1] == ["safetensors>=0.4"] and constraints == "numpy==2.0.2\n"
    assert list(tmp_path.iterdir()) == [], "the constraints file is temporary"


def test_the_device_line_comes_from_nvidia_smi_without_touching_cuda(monkeypatch):
    monkeypatch.setenv("PATH", f"{STANDINS}{os.pathsep}{os.environ['PATH']}")
    gpu = dependencies.nvidia_gpu()
    assert gpu == dependencies.GpuInfo("NVIDIA GeForce RTX 5090", 32607 / 1024, 30100 / 1024, "575.51.02", "12.9")
    line = dependencies.device_summary(gpu, "2.9.1+cpu")
    assert line.startswith("GPU: NVIDIA GeForce RTX 5090, 29.4 of 31.8 GB free (driver 575.51.02, CUDA 12.9).")
    assert "is a CPU build, so the GPU is not used" in line
    assert "CPU build" not in dependencies.device_summary(gpu, "2.9.1+cu128")
    monkeypatch.setenv("PATH", "/nonexistent")
    assert dependencies.nvidia_gpu() is None
    assert dependencies.device_summary(None, None) == "No NVIDIA GPU found: DeepSeg runs on the CPU."
