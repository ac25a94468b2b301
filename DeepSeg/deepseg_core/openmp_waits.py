"""How long PyTorch's OpenMP worker threads spin before they sleep, set by DeepSeg's engine processes.

PyTorch's CPU build runs its operators on GNU OpenMP, whose idle worker threads spin for 300 000
rounds (``GOMP_SPINCOUNT``'s default) after each parallel operator before they sleep. OpenVINO runs
the network on threads of its own. In a sliding window the two take turns on the same cores: the
torch operators between tile batches (cutting tiles, the class probabilities, blending) leave
spinning workers behind that take cores from OpenVINO's next inference. On 2 cores of an AMD EPYC
(Zen 5), five runs of ``Testing/Benchmarks/bench_sliding_window.py`` each: the OpenVINO sliding
window 0.68 s (median) with 10 000 rounds against 0.75 s with the default; PyTorch's own sliding
window 1.41 against 1.39 s, and the training step of ``bench_training_throughput.py`` 4.41 to 4.62
patches/s against 4.17 to 4.25 (three runs each). ``OMP_WAIT_POLICY=PASSIVE`` (no spinning) made
PyTorch's sliding window slower (1.45 to 1.52 s, ad hoc).

GNU OpenMP reads the variable once, when it is loaded (with torch), so it is set before torch is
imported and only in DeepSeg's own processes (``deepseg``, ``python -m deepseg_core``, the Slicer
panels' engine runs); importing ``deepseg_core`` changes nothing. It matters on Linux only: torch's
macOS and Windows builds use other OpenMP runtimes, which do not read it (measured on Linux only).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableMapping

log = logging.getLogger(__name__)

#: rounds an idle GNU OpenMP worker spins before it sleeps, in DeepSeg's engine processes
ENGINE_SPIN_COUNT = 10_000


def shorten_openmp_spinning(environ: MutableMapping[str, str] | None = None) -> bool:
    """Set ``GOMP_SPINCOUNT`` to :data:`ENGINE_SPIN_COUNT` in ``environ`` unless the user chose a spin count
    or wait policy (``GOMP_SPINCOUNT``, ``OMP_WAIT_POLICY``).

    Args:
        environ: the environment of a process about to start; None: this process's, which is then left as it
            is when torch, and with it OpenMP, is already loaded here.

    Returns:
        Whether the variable was set.
    """
    if environ is None:
        if "torch" in sys.modules:
            log.debug("torch is already loaded: its OpenMP spin count stays as it is")
            return False
        environ = os.environ
    if "GOMP_SPINCOUNT" in environ or "OMP_WAIT_POLICY" in environ:
        return False
    environ["GOMP_SPINCOUNT"] = str(ENGINE_SPIN_COUNT)
    return True
