"""Training: patch sampling with foreground oversampling, augmentation, the optimisation loop,
and retraining on datasets (:mod:`.engine`: fine-tune, validate, checkpoint, resume, new version)."""

from .augment import AugmentConfig, augment_patch
from .loop import TrainConfig, TrainingCase, train
from .patches import PatchSampler

__all__ = ["AugmentConfig", "PatchSampler", "TrainConfig", "TrainingCase", "augment_patch", "train"]
