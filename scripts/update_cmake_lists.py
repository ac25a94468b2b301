"""Print the file lists a module's CMakeLists.txt must contain (paste them in, or compare).

Usage: python scripts/update_cmake_lists.py DeepSeg
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "Testing" / "extension"))

from cmake_lists import shipped_files

if __name__ == "__main__":
    module_dir = Path(sys.argv[1]).resolve()
    scripts, resources = shipped_files(module_dir)
    print("set(MODULE_PYTHON_SCRIPTS")
    print("\n".join(f"  {p}" for p in scripts))
    print("  )\n\nset(MODULE_PYTHON_RESOURCES")
    print("\n".join(f"  {p}" for p in resources))
    print("  )")
