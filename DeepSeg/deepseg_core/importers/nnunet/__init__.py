"""Import an nnU-Net v2 trained model folder as a DeepSeg model version (never imports ``nnunetv2``).

A trained model folder is ``<results>/DatasetXXX_Name/<Trainer>__<Plans>__<configuration>/`` holding
``dataset.json``, ``plans.json`` (``dataset_fingerprint.json``) and ``fold_*/checkpoint_final.pth``
(or ``checkpoint_best.pth``). :func:`import_nnunet` reads them and stores:

- the network: DeepSeg's own rebuild of the plans' ``PlainConvUNet`` / ``ResidualEncoderUNet``
  (:mod:`deepseg_core.nets.nnunet`), one per fold, as a :class:`~deepseg_core.nets.LogitEnsemble`
  whose members average their logits as nnU-Net averages its folds; the weights are copied into
  ``weights.safetensors``, the pickles are never kept;
- the card: labels from dataset.json, inputs, the closest DeepSeg normalisation (used by the domain
  check only), the training-data fingerprint from ``dataset_fingerprint.json``, and the ``nnunetv2``
  pipeline settings (:mod:`deepseg_core.pipelines.nnunet`) that reproduce nnU-Net's preprocessing and
  export; ``source`` records the folder, the SHA-256 of every file read, configuration, trainer,
  plans, folds and checkpoint. ``reorient="ras"`` (``deepseg models import FOLDER --reorient ras``)
  makes the pipeline reorient each image to the closest RAS orientation first and undo it at
  export, as TotalSegmentator does around nnU-Net (:mod:`deepseg_core.pipelines.nnunet.orientation`).

Checkpoints are pickles: they are loaded only with ``torch.load(weights_only=True)``, which refuses
every global outside an allow-list (here the numpy scalar and dtype types nnU-Net's training log
holds) without executing anything; anything else is refused with the name of what it needed.

Region-based models (``dataset.json`` labels that are lists, with ``regions_class_order``: BraTS,
KiTS) are imported with one sigmoid output channel per region; the card names each label value for
what its voxels are (:func:`.card.check_labels`) and the pipeline settings carry the regions (a
fine-tune trains them with nnU-Net's region loss, :mod:`deepseg_core.losses.sigmoid_regions`).

``3d_lowres`` imports as a model of its own (as ``nnUNetPredictor`` runs it). The cascade's second stage
(``3d_cascade_fullres``) imports with its first stage (the ``3d_lowres`` folder beside it, the same folds)
into one version (:attr:`~deepseg_core.model_card.ModelCard.previous_stage`): the first stage segments,
and its labels become one-hot input channels of the second, as nnU-Net's predictor feeds them.

Not supported yet, each refused with a clear error (never a wrong result): cascades of more than
two stages or of regions, fine-tuning a cascade, custom readers that reorient,
preprocessors, resampling functions or normalisations other than nnU-Net's defaults, networks
other than ``PlainConvUNet`` / ``ResidualEncoderUNet`` with BasicBlockD.

One module each:

- :mod:`.source`: the folder's files, the folds to ensemble, the configuration they hold;
- :mod:`.checkpoint`: checkpoints unpickled safely, and what of them is kept;
- :mod:`.plans`: the configuration resolved, unsupported features refused, the pipeline settings;
- :mod:`.network`: the plans' architecture as DeepSeg's network config, one member per fold;
- :mod:`.card`: name, labels, inputs, grid and fingerprint of the card;
- :mod:`.importer`: :func:`import_nnunet`, which stores the result as a new model version.
"""

from __future__ import annotations

from .card import NAME_PATTERN, PALETTE, sanitise_name
from .checkpoint import load_checkpoint
from .importer import import_nnunet
from .network import NETWORKS, network_config
from .plans import READERS, RESAMPLING_FUNCTION, resolve_configuration
from .source import CHECKPOINTS, NnUNetImportError

__all__ = [
    "CHECKPOINTS",
    "NAME_PATTERN",
    "NETWORKS",
    "PALETTE",
    "READERS",
    "RESAMPLING_FUNCTION",
    "NnUNetImportError",
    "import_nnunet",
    "load_checkpoint",
    "network_config",
    "resolve_configuration",
    "sanitise_name",
]
