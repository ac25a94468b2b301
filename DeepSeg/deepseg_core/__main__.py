"""``python -m deepseg_core`` runs the ``deepseg`` command line."""

from .cli import run

run()
