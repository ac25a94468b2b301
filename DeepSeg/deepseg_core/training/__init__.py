"""Training: patch sampling with foreground oversampling, augmentation, the optimisation loop."""

from .loop import TrainConfig, TrainingCase, train
from .patches import PatchSampler

__all__ = ["PatchSampler", "TrainConfig", "TrainingCase", "train"]
