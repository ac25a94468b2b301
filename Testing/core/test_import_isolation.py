"""The core imports without Slicer, VTK, Qt or CTK and without initialising CUDA."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

PROBE = """
import json, sys
sys.path.insert(0, {core!r})
import deepseg_core
from deepseg_core import cli, config, demo, errors, io, metrics, phantoms, preprocessing, preview
from deepseg_core import losses, nets
import torch
gui = ('slicer', 'vtk', 'vtkmodules', 'qt', 'ctk', 'PySide6', 'PyQt5', 'mrml')
forbidden = sorted(m for m in sys.modules if m.split('.')[0] in gui)
print(json.dumps({{"forbidden": forbidden, "cuda_initialised": torch.cuda.is_initialized()}}))
"""


def test_core_import_pulls_in_no_slicer_and_no_cuda():
    code = PROBE.format(core=str(REPO / "DeepSeg"))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"forbidden": [], "cuda_initialised": False}


def test_package_root_import_is_light():
    code = f"import sys; sys.path.insert(0, {str(REPO / 'DeepSeg')!r}); import deepseg_core; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
