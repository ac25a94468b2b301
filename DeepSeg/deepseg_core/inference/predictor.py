"""Segment a volume with a stored model: preprocess, sliding window, labels back on the input grid.

The same :class:`Segmenter` serves ``deepseg segment``, the Slicer module's subprocess and the
Segment Editor effect. Steps:

1. check the inputs against the card (channel count, same grid for all channels, modality);
2. the model's pipeline (:mod:`.pipelines`) prepares the network input: DeepSeg's own resamples
   each channel to the model's spacing (linear) and normalises it as the card says (2D / 2.5D
   models: ``k`` neighbouring slices as channels, tiled slice by slice); an imported model's
   pipeline reproduces its original tool's preprocessing;
3. memory-bounded sliding window (:mod:`.sliding_window`);
4. each finished slab goes to the pipeline's collector, which returns labels on the input grid
   (DeepSeg's own: the slab's argmax, or each class probability resampled linearly and the
   argmax taken there, slab by slab);
5. optional clean-up (largest component, hole filling) and instances of "thing" classes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import domain_shift, postprocessing
from ..domain_shift import DomainReport
from ..errors import ConfigError, DeepSegError, ImageError
from ..io import Volume
from ..model_card import ModelCard
from ..model_catalog import store_root
from ..model_store import ModelStore, deferred_networks, resolve_model
from ..nets import CascadeNetwork
from .backends import (
    BACKENDS,
    GRAPH_WAIT,
    BackendChoice,
    BFloat16Tiles,
    DeferredNetwork,
    ExportedTiles,
    TileFunction,
    announcing_graph_waits,
    check_precision,
    choose_backend,
    graph_cached,
    graph_input_shape,
    input_free_setup,
    native_bfloat16,
    recorded_failure,
    tile_function,
)
from .pipelines import PreparedInput, pipeline_for
from .sliding_window import ProgressCallback, SlidingWindowConfig, count_tiles, sliding_window_predict

log = logging.getLogger(__name__)


def choose_device(requested: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cpu`` / ``cuda`` / ``cuda:N`` as asked."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise DeepSegError(
            "CUDA was requested but no CUDA device is available",
            expected="an NVIDIA GPU with a CUDA build of torch",
            found=f"torch {torch.__version__}, cuda available: False",
            hint="Use --device cpu (or auto), or install the CUDA build of torch for your GPU.",
        )
    try:
        return torch.device(requested)
    except RuntimeError:
        raise DeepSegError("unknown device", expected="auto, cpu, cuda or cuda:N", found=requested) from None


#: ``tta``: all mirror combinations plus these (gain, shift) perturbations of the normalised input;
#: ``mc_dropout``: ``uncertainty_passes`` passes with the network's dropout layers active.
UNCERTAINTY_METHODS = ("tta", "mc_dropout")
UNCERTAINTY_INTENSITY_PERTURBATIONS: tuple[tuple[float, float], ...] = ((0.9, 0.0), (1.1, 0.0), (1.0, -0.2), (1.0, 0.2))


@dataclass(frozen=True)
class SegmentOptions:
    """Per-run choices; ``None`` means the model card's default."""

    device: str = "auto"
    overlap: float | None = None
    batch_size: int | None = None
    tta: bool = False
    instances: bool = False
    min_instance_mm3: float = 10.0
    largest_component: bool = False
    fill_holes: bool = False
    keep_probabilities: bool = False
    check_modality: bool = True
    backend: str = "auto"
    precision: str = "float32"
    uncertainty: str | None = None
    uncertainty_passes: int = 8
    uncertainty_perturbations: tuple[tuple[float, float], ...] = UNCERTAINTY_INTENSITY_PERTURBATIONS

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError("unknown inference backend", expected=f"one of {list(BACKENDS)}", found=str(self.backend))
        check_precision(self.backend, self.precision)
        if self.uncertainty not in (None, *UNCERTAINTY_METHODS):
            raise ConfigError(
                "unknown uncertainty method", expected=f"one of {list(UNCERTAINTY_METHODS)}", found=str(self.uncertainty)
            )
        if self.uncertainty_passes < 2:
            raise ConfigError("Monte-Carlo dropout needs at least 2 passes", found=str(self.uncertainty_passes))


@dataclass
class SegmentationResult:
    """Labels on the input grid, and what else was asked for.

    Attributes:
        labels: label values of the card on the input grid (uint8, or uint16 above 255).
        probabilities: ``(K, Z, Y, X)`` float16 class probabilities on the input grid, or None.
        instance_ids: ``(Z, Y, X)`` int32 instance ids of thing classes (0 = none), or None.
        instances: one summary per instance.
        uncertainty: normalised predictive entropy (float32, 0..1) on the input grid, or None
            (see :mod:`deepseg_core.uncertainty`).
        domain_check: the input-versus-training-data report (see :mod:`deepseg_core.domain_shift`).
        backend: the inference backend that computed the logits (:mod:`.backends`).
        precision: what the network computed in: ``float32`` or ``bfloat16`` on the CPU, ``float16``
            (autocast) or ``float32`` on CUDA.
        card: the model card used.
        timings_s: seconds per stage.
        window_stats: the sliding window's own figures (:func:`.sliding_window_predict`'s return:
            ``tiles``, ``network_calls``, ``max_buffer_depth`` in slices, ``batch_size``, ``image_device``);
            of a cascade, its second stage's.
        first_stage: of a cascade, what its first stage ran with (``backend``, ``precision``, ``tiles``),
            which may differ from the second's (a runtime that could not export one of the networks falls
            back to torch for that stage alone); None for a single-stage model.
    """

    labels: Volume
    card: ModelCard
    probabilities: np.ndarray | None = None
    instance_ids: np.ndarray | None = None
    instances: list[postprocessing.Instance] = field(default_factory=list)
    uncertainty: Volume | None = None
    domain_check: DomainReport | None = None
    timings_s: dict[str, float] = field(default_factory=dict)
    backend: str = "torch"
    precision: str = "float32"
    window_stats: dict[str, int | str] = field(default_factory=dict)
    first_stage: dict[str, int | str] | None = None


class _SliceNet(nn.Module):
    """Runs a 2D network on ``(B, C, 1, Y, X)`` tiles (one slice each)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x[:, :, 0]).unsqueeze(2)


def check_modality(card: ModelCard, image: Volume, subject: str) -> None:
    """Refuse an image that cannot be of the model's modality (see README: modality check).

    CT: every CT holds air or fat, i.e. voxels below 0 HU; an image without any negative value is
    not in Hounsfield units. MR: a model trained on MR refuses images whose lowest 0.5% lie below
    -500 (CT air).
    """
    array = image.array_zyx
    if card.inputs.modality == "CT" and float(array.min()) >= 0:
        raise ImageError(
            "does not look like a CT in Hounsfield units",
            subject=subject,
            expected=f"a CT image for model {card.ref} (air about -1000 HU, fat about -100 HU)",
            found=f"no voxel below 0 (range {float(array.min()):g} .. {float(array.max()):g})",
            hint="Check the modality, or apply the rescale slope/intercept; --skip-modality-check overrides.",
        )
    if card.inputs.modality == "MR" and float(np.percentile(array, 0.5)) < -500:
        raise ImageError(
            "looks like a CT, but the model expects MR",
            subject=subject,
            expected=f"an MR image for model {card.ref}",
            found=f"0.5th percentile {float(np.percentile(array, 0.5)):g} (CT air)",
            hint="--skip-modality-check overrides.",
        )


class Segmenter:
    """A loaded model, ready to segment many volumes (load once, run many).

    ``net``: the network, or one built when first needed (:meth:`load` gives such a
    :class:`~.backends.DeferredNetwork`: a run whose exported graph is cached never builds it). A cascade's
    :class:`~deepseg_core.nets.CascadeNetwork`, or its second stage with ``previous_stage_net`` its first.
    """

    def __init__(
        self,
        card: ModelCard,
        net: nn.Module | DeferredNetwork,
        device: torch.device | str,
        cache_dir: Path | None = None,
        previous_stage_net: nn.Module | DeferredNetwork | None = None,
    ) -> None:
        self.card, self.device = card, torch.device(device)
        config = card.architecture.config
        self.spatial_dims = int(config.get("spatial_dims", 3))
        self.context_slices = int(config.get("context_slices", 1))
        #: an nnU-Net cascade's first stage, a model of its own whose labels the second stage reads
        self.previous_stage: Segmenter | None = None
        if isinstance(net, CascadeNetwork):
            assert previous_stage_net is None, "a CascadeNetwork holds its first stage itself"
            net, previous_stage_net = net.stage, net.previous_stage
        if previous_stage_net is not None:
            previous = card.previous_stage
            assert previous is not None, "a cascade network needs a cascade card"
            self.previous_stage = Segmenter(previous, previous_stage_net, device, cache_dir)
        deferred = net if isinstance(net, DeferredNetwork) else DeferredNetwork.of(net)
        sliced = self.spatial_dims == 2  # a 2D network runs on one-slice tiles, wrapped as the submodule "net"
        self._network = deferred.then(
            lambda built: (_SliceNet(built) if sliced else built).to(self.device).eval(), "net." if sliced else ""
        )
        self.pipeline = pipeline_for(card, self.spatial_dims, self.context_slices)
        #: where exported graphs of other backends are cached (beside the model store).
        self.cache_dir = cache_dir or store_root(None) / ".cache" / "compiled"
        self._tile_functions: dict[tuple, tuple[TileFunction, BackendChoice]] = {}

    @classmethod
    def load(cls, model: str | Path, device: str = "auto", store: ModelStore | None = None) -> Segmenter:
        """Load ``model`` (folder or ``NAME[:VERSION]``) onto ``device``."""
        torch_device = choose_device(device)
        folder = resolve_model(model, store)
        card, net, previous_stage_net = deferred_networks(folder)
        root = store.root if store is not None else store_root(None)
        return cls(card, net, torch_device, cache_dir=root / ".cache" / "compiled", previous_stage_net=previous_stage_net)

    @property
    def net(self) -> nn.Module:
        """The network (on :attr:`device`, eval mode), built now if it was not yet."""
        return self._network.network()

    @property
    def network_built(self) -> bool:
        """Whether the network has been built: not by a run whose exported graph was cached."""
        return self._network.built

    def weights_sha256(self) -> str:
        """:func:`.backends.weights_digest` of the network as it is now; builds nothing."""
        return self._network.weights_sha256()

    def network_sha256(self) -> str:
        """What the network computes, as the key of its exported graphs: SHA-256 of its weights' digest
        (:meth:`weights_sha256`) and the card's architecture (name and config), so that a graph is never used
        for a card whose network differs from the one it was exported from; builds nothing."""
        architecture = json.dumps([self.card.architecture.name, self.card.architecture.config], sort_keys=True)
        return hashlib.sha256(f"{self.weights_sha256()}:{architecture}".encode()).hexdigest()

    def backend_choice(self, options: SegmentOptions) -> BackendChoice:
        """The backend ``options`` ask for, as :func:`.backends.choose_backend` resolves it on this device."""
        return choose_backend(
            options.backend,
            self.device,
            needs_stochastic_layers=options.uncertainty == "mc_dropout",
            precision=self._cpu_precision(options),
        )

    def tile_function(
        self, options: SegmentOptions, window: SlidingWindowConfig, input_channels: int, network_sha256: str | None = None
    ) -> tuple[TileFunction, str]:
        """What computes a tile batch's logits for this run (see :mod:`.backends`), and the backend's name.

        Exported graphs are built once per Segmenter and shape (cached on disk across runs).
        ``network_sha256``: :meth:`network_sha256`, when the caller has it already.
        """
        function, used = self._tile_function_and_choice(options, window, input_channels, network_sha256)
        return function, used.name

    def _tile_function_and_choice(
        self, options: SegmentOptions, window: SlidingWindowConfig, input_channels: int, network_sha256: str | None
    ) -> tuple[TileFunction, BackendChoice]:
        """:meth:`tile_function`, with the backend actually used (and why, where it fell back to torch)."""
        note = self.precision_note(options)
        if note:
            log.warning("precision bfloat16 not used: %s", note)
        precision = self._cpu_precision(options)
        choice = self.backend_choice(options)
        if choice.name == "torch":
            return (BFloat16Tiles(self.net) if precision == "bfloat16" else self.net), choice
        # the weights may have changed (training): the key is their digest now, never the card's
        key = self._tile_key(options, _tile_shape(window, input_channels), network_sha256 or self.network_sha256())
        if key not in self._tile_functions:
            log.info("inference backend: %s in %s (%s)", choice.name, precision, choice.reason)
            self._tile_functions[key] = tile_function(self._network, choice, key[2], key[1], self.cache_dir, precision)
        return self._tile_functions[key]

    def _tile_key(self, options: SegmentOptions, shape: tuple[int, ...], network_sha256: str) -> tuple:
        """Which made tile function a run with ``options`` reuses: backend, the graph's input shape (the tile batch
        ``shape``, or one tile for OpenVINO, whose one graph serves every batch: :func:`.backends.graph_input_shape`),
        weights, precision."""
        backend = self.backend_choice(options).name
        return (backend, graph_input_shape(backend, shape), network_sha256, self._cpu_precision(options))

    def will_export(
        self, options: SegmentOptions, input_channels: int, network_sha256: str | None = None, tiles: int | None = None
    ) -> bool:
        """Whether a run with ``options`` must first export the network for its backend (nothing cached yet for
        these weights and tile shape): a forward pass of one tile batch (of one tile for OpenVINO), seconds to a
        minute on a CPU. With ``tiles`` (the run's tile count), also when ONNX Runtime will need its single-tile
        graph for a partial batch and that is not cached (it is exported only when first needed). False when the runtime could not
        take this network before (:func:`.backends.recorded_failure`): the run goes straight to torch."""
        backend = self.backend_choice(options).name
        if backend == "torch":
            return False
        shape = _tile_shape(self.window_config(options), input_channels)
        sha = network_sha256 or self.network_sha256()
        if self._tile_key(options, shape, sha) in self._tile_functions:
            return False
        graph = graph_input_shape(backend, shape)
        if recorded_failure(sha, backend, graph, self.cache_dir, self._cpu_precision(options)) is not None:
            return False  # the runtime could not take this network: the run goes straight to torch
        shapes = [graph]
        if backend == "onnxruntime" and tiles is not None and tiles % shape[0] != 0:
            one_tile = (1, *shape[1:])
            # unless it failed before: partial batches are then padded, with nothing to export
            if recorded_failure(sha, backend, one_tile, self.cache_dir, self._cpu_precision(options)) is None:
                shapes.append(one_tile)
        return not all(graph_cached(sha, backend, each, self.cache_dir) for each in shapes)

    def needs_preparing(self, options: SegmentOptions | None = None) -> bool:
        """Whether :meth:`prepare_backend` with ``options`` has anything to export: the graph of this stage or of
        a cascade's first stage, or ONNX Runtime's single-tile graph, is not cached (and no failure is recorded)."""
        options = options or SegmentOptions()
        if self.previous_stage is not None and self.previous_stage.needs_preparing(_first_stage_options(options)):
            return True
        # one tile: a partial batch, so that the single-tile graph prepare_backend makes is counted too
        return self.will_export(options, self.pipeline.network_input_channels, tiles=1)

    def build_networks_runs_need(self, options: SegmentOptions) -> None:
        """Build now each stage's network that runs with ``options`` will call or export (the torch backend, a graph
        not cached yet, ONNX Runtime's single-tile graph, a runtime that could not take the network before), so that
        weights that do not fit their card fail before the first case, not in it. A stage whose graphs are cached
        stays unbuilt: its runs never call the network. Raises what building raises (:class:`ModelError`)."""
        if self.previous_stage is not None:
            self.previous_stage.build_networks_runs_need(_first_stage_options(options))
        backend = self.backend_choice(options).name
        if backend != "torch":
            channels, sha = self.pipeline.network_input_channels, self.network_sha256()
            shape = _tile_shape(self.window_config(options), channels)
            # will_export is False also where a runtime failed before, and the run then computes in torch
            failed = recorded_failure(
                sha, backend, graph_input_shape(backend, shape), self.cache_dir, self._cpu_precision(options)
            )
            if failed is None and not self.will_export(options, channels, sha, tiles=1):
                return
        self._network.network()

    def prepare_backend(self, options: SegmentOptions | None = None) -> list[dict[str, object]]:
        """Export and compile the network for the backend ``options`` choose on this device (default options:
        ``auto``, float32), so that the first segmentation does not (``deepseg models import`` calls this).

        The graph, and the single-tile runner for partial batches, are cached as a run caches them; a cascade
        prepares its first stage too. Returns one entry per stage, first stage first: ``backend`` (what will
        run), ``exported`` (False when the graph was cached already, or for torch), ``seconds``, and where the
        runtime could not take the network (a run then uses torch too) the ``reason``.
        """
        options = options or SegmentOptions()
        prepared = [] if self.previous_stage is None else self.previous_stage.prepare_backend(_first_stage_options(options))
        clock = time.perf_counter()
        if self.backend_choice(options).name == "torch":
            return [*prepared, {"backend": "torch", "exported": False, "seconds": 0.0}]
        channels = self.pipeline.network_input_channels
        sha = self.network_sha256()
        exported = self.will_export(options, channels, sha)
        function, used = self._tile_function_and_choice(options, self.window_config(options), channels, sha)
        if isinstance(function, ExportedTiles):
            function.prepare_single_tile()
        seconds = time.perf_counter() - clock
        stage: dict[str, object] = {"backend": used.name, "exported": exported and used.name != "torch", "seconds": seconds}
        if used.name == "torch":  # the export or the runtime failed: the fallback's reason, as a run logs it
            stage["reason"] = used.reason
        return [*prepared, stage]

    def precision(self, options: SegmentOptions) -> str:
        """The precision a run computes in: on CUDA ``float16`` (autocast, the sliding window's ``amp``,
        on by default) or ``float32``; on the CPU ``options.precision``, except bfloat16 on a CPU without
        AMX/AVX512-BF16 (see :meth:`precision_note`)."""
        if self.device.type == "cuda":
            return "float16" if self.window_config(options).amp else "float32"
        return self._cpu_precision(options)

    def _cpu_precision(self, options: SegmentOptions) -> str:
        """``options.precision`` where it can run, else ``float32`` (see :meth:`precision_note`): the precision
        the CPU backends are asked for (on CUDA autocast decides instead, :meth:`precision`)."""
        return "float32" if self.precision_note(options) else options.precision

    def precision_note(self, options: SegmentOptions) -> str | None:
        """Why ``options.precision`` is not what runs, or None when it is."""
        if options.precision == "bfloat16" and (self.device.type != "cpu" or not native_bfloat16()):
            if self.device.type != "cpu":
                return "CUDA runs float16 autocast"
            return "this CPU has no native bfloat16; computing in float32"
        return None

    def window_config(self, options: SegmentOptions) -> SlidingWindowConfig:
        """Sliding-window settings of the model's pipeline, overridden by ``options``."""
        return self.pipeline.window_config(options)

    def check_inputs(self, channels: Sequence[Volume]) -> DomainReport:
        """Compare the input channels with the training-data fingerprint of the card, and the field of
        view with the network's tile (never raises for a shift)."""
        if not channels:
            return domain_shift.check_input(self.card, channels)
        grid = self.pipeline.network_grid(channels)
        patch = self.window_config(SegmentOptions()).patch_size_zyx
        # a 2.5D network reads k slices around each one: of an image with fewer, it sees edge copies
        reads_zyx = (max(patch[0], self.pipeline.context_slices), *patch[1:])
        return domain_shift.check_input(
            self.card,
            channels,
            network_shape_zyx=grid.shape_zyx,
            network_spacing_zyx_mm=grid.spacing_zyx_mm,
            patch_size_zyx=reads_zyx,
            network_axis_names=grid.input_axes,
        )

    def planned_tiles(self, channels: Sequence[Volume], options: SegmentOptions) -> int:
        """How many tiles the sliding window will run over ``channels`` (on the pipeline's network grid,
        found without preprocessing; a cascade's first stage not counted)."""
        return count_tiles(self.pipeline.network_grid(channels).shape_zyx, self.window_config(options))

    def prepare(
        self,
        channels: Sequence[Volume],
        options: SegmentOptions,
        subjects: Sequence[str],
        previous_labels_zyx: np.ndarray | None = None,
    ) -> PreparedInput:
        """Check the channels against the card, then the pipeline's network input ``(C_net, Z, Y, X)``
        (a cascade's second stage: with the first stage's labels ``previous_labels_zyx`` as channels too)."""
        self.check_channels(channels, options, subjects)
        if previous_labels_zyx is not None:
            return self.pipeline.prepare_with_previous_stage(channels, previous_labels_zyx)
        return self.pipeline.prepare(channels)

    def check_channels(self, channels: Sequence[Volume], options: SegmentOptions, subjects: Sequence[str]) -> None:
        """The channels' number and grids against the card, and their modality unless ``options`` skip it.

        Raises:
            ImageError: what was expected, what was found and what to do.
        """
        card = self.card
        expected = len(card.inputs.channels)
        if len(channels) != expected:
            raise ImageError(
                f"model {card.ref} needs {expected} input channel(s) {list(card.inputs.channels)}",
                expected=f"{expected} image(s)",
                found=f"{len(channels)}",
                hint="Give one image per channel, in the card's order.",
            )
        for volume, subject in zip(channels[1:], subjects[1:], strict=True):
            if not volume.same_grid(channels[0]):
                raise ImageError(
                    "is not on the same grid as the first channel", subject=subject, hint="Resample it onto the first image."
                )
        if options.check_modality:
            for volume, subject in zip(channels, subjects, strict=True):
                check_modality(card, volume, subject)

    def segment(
        self,
        channels: Sequence[Volume],
        options: SegmentOptions = SegmentOptions(),
        *,
        subjects: Sequence[str] | None = None,
        on_progress: ProgressCallback | None = None,
        should_cancel: Callable[[], bool] | None = None,
        domain_check: DomainReport | None = None,
        on_status: Callable[[str], None] | None = None,
    ) -> SegmentationResult:
        """Segment one case (one :class:`Volume` per input channel, all on one grid).

        ``domain_check``: a report already made by :meth:`check_inputs` (made here when None).
        ``on_status``: told, before the network is exported for its backend (once per model version and tile
        shape, see :meth:`prepare_backend`), what is happening, as a sentence for a status line: otherwise
        the progress would stand at 0 for that time.
        """
        timings: dict[str, float] = {}
        clock = time.perf_counter()
        subjects = list(subjects or [f"channel {i}" for i in range(len(channels))])
        previous_labels, first_stage = None, None
        if self.previous_stage is not None:
            self.check_channels(channels, options, subjects)  # a wrong input is refused before the first stage runs
            if domain_check is None:
                domain_check = self.check_inputs(channels)
            # planning reads the crop box again (a pass over the input): only for a progress bar
            planned = self.planned_tiles(channels, options) if on_progress is not None else 0
            timings["input_checks"] = time.perf_counter() - clock
            first_progress, on_progress = _two_stage_progress(on_progress, planned)
            first = self.previous_stage.segment(
                channels,
                _first_stage_options(options),
                subjects=subjects,
                on_progress=first_progress,
                should_cancel=should_cancel,
                domain_check=domain_check,
                on_status=on_status,
            )
            previous_labels = first.labels.array_zyx
            first_stage = {"backend": first.backend, "precision": first.precision, "tiles": first.window_stats["tiles"]}
            timings.update({f"first_stage_{key}": value for key, value in first.timings_s.items()})
            # the modality check (a pass over the input) ran before the first stage
            options = dataclasses.replace(options, check_modality=False)
            clock = time.perf_counter()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="deepseg-weights-digest") as pool:
            # An exported graph's cache key hashes the weights (0.1 s for nnU-Net's 31M parameters) and
            # its runtime takes a while to import: both beside the preprocessing, which needs neither.
            choice = self.backend_choice(options)
            digest = pool.submit(input_free_setup, self.network_sha256, choice.name) if choice.name != "torch" else None
            prepared = self.prepare(channels, options, subjects, previous_labels)
            if domain_check is None:
                domain_check = self.check_inputs(channels)
            timings["preprocess"] = time.perf_counter() - clock
            reference = channels[0]
            collector = self.pipeline.collector(prepared, reference, options)
            window = self.window_config(options)
            clock = time.perf_counter()
            network_sha256 = digest.result() if digest is not None else None
        input_channels = int(prepared.image_czyx.shape[0])
        if on_status is not None:
            tile_count = count_tiles(tuple(prepared.image_czyx.shape[1:]), window)
            if self.will_export(options, input_channels, network_sha256, tile_count):
                on_status(preparing_message(choice.name))

        def announce_graph_event(event: str) -> None:  # else the progress stands still with no word while this run waits
            if on_status is not None:
                on_status(waiting_message(choice.name) if event == GRAPH_WAIT else preparing_message(choice.name))

        with announcing_graph_waits(announce_graph_event):
            tiles, backend = self.tile_function(options, window, input_channels, network_sha256)
        timings["backend_setup"] = time.perf_counter() - clock
        clock = time.perf_counter()
        with _mc_dropout(self._network, options.uncertainty == "mc_dropout", self.card.ref):
            window_stats = sliding_window_predict(
                tiles,
                prepared.image_czyx,
                self.pipeline.output_channels,
                window,
                collector.add,
                device=self.device,
                on_progress=on_progress,
                should_cancel=should_cancel,
            )
        timings["network"] = time.perf_counter() - clock
        clock = time.perf_counter()
        collected = collector.finish()
        result = self._postprocess(reference.with_array(collected.labels_zyx), options)
        result.probabilities = collected.probabilities
        result.domain_check = domain_check
        result.backend = backend
        result.precision = self.precision(options)
        result.window_stats = window_stats
        result.first_stage = first_stage
        if collected.entropy_zyx is not None:
            result.uncertainty = reference.with_array(np.clip(collected.entropy_zyx, 0.0, 1.0).astype(np.float32))
        timings["postprocess"] = time.perf_counter() - clock
        result.timings_s = timings
        return result

    def _postprocess(self, labels: Volume, options: SegmentOptions) -> SegmentationResult:
        array = labels.array_zyx
        stuff = [label.value for label in self.card.labels if not label.thing]
        things = [label.value for label in self.card.labels if label.thing]
        if options.largest_component:
            array = postprocessing.keep_largest_component(array, stuff)
        if options.fill_holes:
            array = postprocessing.fill_holes(array, stuff)
        result = SegmentationResult(labels=labels.with_array(array), card=self.card)
        if options.instances:
            result.instance_ids, result.instances = postprocessing.label_instances(
                array, things, labels.spacing_zyx_mm, options.min_instance_mm3
            )
        return result


def _tile_shape(window: SlidingWindowConfig, input_channels: int) -> tuple[int, ...]:
    """The shape ``(B, C_net, *patch)`` of a tile batch, which an exported graph is made for."""
    return (window.batch_size, input_channels, *window.patch_size_zyx)


def waiting_message(backend: str) -> str:
    """The status line while another process prepares the same network for ``backend`` and this run waits."""
    return f"Waiting for another DeepSeg run that is preparing this network for {backend}..."


def preparing_message(backend: str) -> str:
    """The status line while the network is exported and compiled for ``backend``."""
    return f"Preparing the network for {backend} on this computer (once per model version; later runs skip this)..."


def _two_stage_progress(
    on_progress: ProgressCallback | None, second_stage_tiles: int
) -> tuple[ProgressCallback | None, ProgressCallback | None]:
    """Progress callbacks for a cascade's first and second stage that report one run: tiles counted over
    both stages, and while the first runs, the second's time estimated at the first's pace per tile
    (its preprocessing included, as the second stage has its own)."""
    if on_progress is None:
        return None, None
    first_total, started = 0, time.perf_counter()

    def first(done: int, total: int, eta_s: float) -> None:
        nonlocal first_total
        first_total = total
        seconds_per_tile = (time.perf_counter() - started) / max(done, 1)
        on_progress(done, total + second_stage_tiles, eta_s + seconds_per_tile * second_stage_tiles)

    def second(done: int, total: int, eta_s: float) -> None:
        on_progress(first_total + done, first_total + total, eta_s)

    return first, second


def _first_stage_options(options: SegmentOptions) -> SegmentOptions:
    """What the first stage of a cascade runs with: the same window, mirroring, backend and precision; its labels
    as they come (post-processing, instances, probabilities and uncertainty are the second stage's), as nnU-Net
    feeds the first stage's exported segmentation to the second."""
    return dataclasses.replace(
        options,
        instances=False,
        largest_component=False,
        fill_holes=False,
        keep_probabilities=False,
        uncertainty=None,
        check_modality=False,
    )


@contextmanager
def _mc_dropout(network: DeferredNetwork, enable: bool, ref: str) -> Iterator[None]:
    """Dropout layers in training mode (stochastic) for the duration; everything else stays as it is.

    Only the dropout layers switch: norms must keep their eval behaviour (batch norm would
    otherwise normalise by the tile batch). Each layer's previous mode is restored afterwards,
    also when the run fails or is cancelled.
    """
    if not enable:
        yield
        return
    dropouts = [m for m in network.network().modules() if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0]
    if not dropouts:
        raise ConfigError(
            f"model {ref} has no dropout layers, so Monte-Carlo dropout cannot vary its output",
            expected="a network trained with dropout > 0",
            found="dropout 0 in every layer",
            hint="Use the test-time-augmentation method (CLI: --uncertainty-method tta), or train a version with dropout"
            " (deepseg train ... --dropout 0.1, or DeepSegTraining's Dropout setting).",
        )
    before = [m.training for m in dropouts]
    for module in dropouts:
        module.train()
    try:
        yield
    finally:
        for module, mode in zip(dropouts, before, strict=True):
            module.train(mode)
