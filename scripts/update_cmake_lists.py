"""Print, or with --write rewrite, the file lists of a module's CMakeLists.txt.

Usage: python scripts/update_cmake_lists.py DeepSeg [--write]
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "Testing" / "extension"))

from cmake_lists import shipped_files


def block(variable: str, items: list[str], module: str) -> str:
    lines = [
        f"  {item.replace(module, '${MODULE_NAME}') if item.startswith((module + '.', 'Resources/')) else item}" for item in items
    ]
    return f"set({variable}\n" + "\n".join(lines) + "\n  )"


if __name__ == "__main__":
    module_dir = Path(sys.argv[1]).resolve()
    scripts, resources = shipped_files(module_dir)
    blocks = {
        "MODULE_PYTHON_SCRIPTS": block("MODULE_PYTHON_SCRIPTS", scripts, module_dir.name),
        "MODULE_PYTHON_RESOURCES": block("MODULE_PYTHON_RESOURCES", resources, module_dir.name),
    }
    if "--write" in sys.argv:
        cmake = module_dir / "CMakeLists.txt"
        text = cmake.read_text(encoding="utf-8")
        for variable, new in blocks.items():
            text = re.sub(rf"set\(\s*{variable}\s+.*?\)", lambda _m, new=new: new, text, count=1, flags=re.S)
        cmake.write_text(text, encoding="utf-8")
    else:
        print("\n\n".join(blocks.values()))
