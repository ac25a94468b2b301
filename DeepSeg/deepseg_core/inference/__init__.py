"""Inference: memory-bounded sliding window and the :class:`Segmenter` that serves CLI and Slicer."""

from .predictor import SegmentationResult, Segmenter, SegmentOptions, check_modality, choose_device
from .sliding_window import Cancelled, SlidingWindowConfig, gaussian_importance, sliding_window_predict, tile_starts

__all__ = [
    "Cancelled",
    "SegmentOptions",
    "SegmentationResult",
    "Segmenter",
    "SlidingWindowConfig",
    "check_modality",
    "choose_device",
    "gaussian_importance",
    "sliding_window_predict",
    "tile_starts",
]
