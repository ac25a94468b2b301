"""DeepSeg's engine: U-Nets, losses, metrics, image I/O and phantoms for 3D segmentation.

Importing this package is cheap and side-effect free: it never imports Slicer, VTK or Qt and never
initialises CUDA. Submodules are imported on use::

    from deepseg_core import io, metrics, phantoms
    from deepseg_core.nets import build_net
    from deepseg_core.losses import build_loss
"""

__version__ = "0.1.0"
