"""Check that a scripted module's CMakeLists.txt lists every file the module ships.

``slicerMacroBuildScriptedModule`` installs only the files named in ``MODULE_PYTHON_SCRIPTS`` and
``MODULE_PYTHON_RESOURCES``; a file left out is silently missing from the packaged extension.
"""

from __future__ import annotations

import re
from pathlib import Path

IGNORED_PARTS = {"__pycache__", ".pytest_cache", ".ruff_cache"}
IGNORED_NAMES = {"CMakeLists.txt"}


def shipped_files(module_dir: Path) -> tuple[list[str], list[str]]:
    """(python scripts, resources) that exist under ``module_dir``, relative, sorted."""
    scripts, resources = [], []
    for path in sorted(module_dir.rglob("*")):
        rel = path.relative_to(module_dir)
        if path.is_dir() or IGNORED_PARTS & set(rel.parts) or path.name in IGNORED_NAMES or path.name.startswith("."):
            continue
        if any(part.endswith(".egg-info") for part in rel.parts):
            continue
        if path.suffix == ".pyc":
            continue
        (scripts if path.suffix == ".py" else resources).append(rel.as_posix())
    return scripts, resources


def _set_block(text: str, variable: str) -> list[str]:
    match = re.search(rf"set\(\s*{variable}\s+(.*?)\)", text, flags=re.S)
    if not match:
        return []
    return [line.split("#")[0].strip() for line in match.group(1).splitlines() if line.split("#")[0].strip()]


def listed_files(cmake_file: Path) -> tuple[list[str], list[str]]:
    """(scripts, resources) named in a module CMakeLists.txt, with ${MODULE_NAME} expanded."""
    text = cmake_file.read_text(encoding="utf-8")
    name = re.search(r"set\(\s*MODULE_NAME\s+(\w+)\s*\)", text)
    module_name = name.group(1) if name else ""

    def expand(items: list[str]) -> list[str]:
        return [item.replace("${MODULE_NAME}", module_name) for item in items]

    return expand(_set_block(text, "MODULE_PYTHON_SCRIPTS")), expand(_set_block(text, "MODULE_PYTHON_RESOURCES"))


def problems(module_dir: Path) -> list[str]:
    """Every mismatch between a module folder and its CMakeLists.txt, as readable sentences."""
    cmake_file = module_dir / "CMakeLists.txt"
    if not cmake_file.exists():
        return [f"{cmake_file} is missing"]
    scripts, resources = shipped_files(module_dir)
    listed_scripts, listed_resources = listed_files(cmake_file)
    found = []
    for rel in sorted(set(scripts) - set(listed_scripts)):
        found.append(f"{module_dir.name}/{rel} is not in MODULE_PYTHON_SCRIPTS of {cmake_file}")
    for rel in sorted(set(resources) - set(listed_resources)):
        found.append(f"{module_dir.name}/{rel} is not in MODULE_PYTHON_RESOURCES of {cmake_file}")
    for rel in sorted(set(listed_scripts + listed_resources) - set(scripts + resources)):
        found.append(f"{cmake_file} lists {rel}, which does not exist")
    if "slicerMacroBuildScriptedModule" not in cmake_file.read_text(encoding="utf-8"):
        found.append(f"{cmake_file} does not call slicerMacroBuildScriptedModule")
    return found
