"""Import a MONAI bundle (``configs/metadata.json``, ``configs/inference.json``, ``models/model.pt``).

The bundle's configs are read as *data*: nothing in them is evaluated. What DeepSeg needs is
mapped onto its own pieces, one module each:

- :mod:`.source`: the files read and hashed (JSON or YAML configs; a TorchScript-only bundle is refused);
- :mod:`.walker`: the config walked with ``@`` references resolved, every refused item collected;
- :mod:`.preprocessing`, :mod:`.inferer`, :mod:`.postprocessing`: the transforms, inferer and
  postprocessing mapped onto the ``monai_bundle`` pipeline (:mod:`deepseg_core.pipelines.monai_bundle`);
- :mod:`.network`: ``network_def`` checked and rebuilt, ``models/model.pt`` loaded with
  ``torch.load(weights_only=True)`` only and stored as safetensors;
- :mod:`.card`: labels, inputs and the closest DeepSeg normalisation from the metadata;
- :mod:`.mapping`: all of the above, or ONE error listing every item not reproduced exactly;
- :mod:`.importer`: :func:`import_bundle`, which stores the result as a new model version.
"""

from __future__ import annotations

from .card import PALETTE
from .importer import FORMAT, bundle_name, import_bundle, sanitize_name
from .inferer import SLIDING_WINDOW_INFERERS
from .mapping import BundleMapping, map_bundle
from .network import load_state_dict
from .postprocessing import IGNORED_POSTPROCESSING, PRED_KEY
from .source import INFERENCE_CANDIDATES, METADATA, TORCHSCRIPT, WEIGHTS, BundleSource, read_bundle
from .walker import COMMON_ARGS, DTYPE_ARGS, FLOAT_DTYPES

__all__ = [
    "COMMON_ARGS",
    "DTYPE_ARGS",
    "FLOAT_DTYPES",
    "FORMAT",
    "IGNORED_POSTPROCESSING",
    "INFERENCE_CANDIDATES",
    "METADATA",
    "PALETTE",
    "PRED_KEY",
    "SLIDING_WINDOW_INFERERS",
    "TORCHSCRIPT",
    "WEIGHTS",
    "BundleMapping",
    "BundleSource",
    "bundle_name",
    "import_bundle",
    "load_state_dict",
    "map_bundle",
    "read_bundle",
    "sanitize_name",
]
