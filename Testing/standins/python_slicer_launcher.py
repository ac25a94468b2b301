"""Stand-in for Slicer's ``PythonSlicer`` launcher (the one part of a job that cannot run here).

Like the CTK application launcher behind ``PythonSlicer``, it starts the real interpreter as a
*child* process with the given arguments, waits for it and exits with its exit code, and it does
not forward ``SIGTERM``: signalling only this process leaves the child running.

Usage: ``python python_slicer_launcher.py ENGINE_PYTHON -m deepseg_core ...``
"""

import subprocess
import sys

child = subprocess.Popen(sys.argv[1:])
sys.exit(child.wait())
