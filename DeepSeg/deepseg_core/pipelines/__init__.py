"""Pipelines of imported models: each reproduces its original tool's preprocessing and export.

They are named in a model card's ``pipeline`` section and registered by module path in
:data:`deepseg_core.inference.pipelines.PIPELINES` (imported on first use):

- :mod:`.nnunet`: nnU-Net v2 (``nnunetv2``);
- :mod:`.monai_bundle`: MONAI bundles (``monai_bundle``).
"""
