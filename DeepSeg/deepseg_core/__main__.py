"""``python -m deepseg_core`` runs the ``deepseg`` command line."""

import sys

from .cli import main

sys.exit(main())
