"""Everything the DeepSegTraining panel decides, without Qt, tested on real MRML scenes.

``DeepSegTraining.py``'s widget forwards clicks here and copies :class:`TrainingView` into its
widgets. Decided here: the base-model list and the saved choice, the dataset summary line, whether
Start may run and what it starts (a ``deepseg train`` process tree), live curves and ETA, Stop
(non-blocking; the last finished epoch stays checkpointed and *Resume* is ticked), the old-vs-new
comparison on the fixed validation split, and Promote / Keep old / Roll back. Once the new version is
stored, the engine prepares its network for this computer's CPU runtime (so that its first Segment does
not) while the user compares; a Stop then only skips that, and the status line says which happened.

The new version is stored without being activated: nothing changes for users of the model until
Promote; Roll back returns to the version that was active before.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import slicer

from deepseg_core.model_store import ModelStore
from DeepSegLib import dependencies
from DeepSegLib.model_choices import ModelEntry, available_models
from DeepSegLib.segment_job import DeepSegJob

from .dataset_summary import describe_dataset_folder
from .training_run import (
    TrainingCurves,
    TrainingRequest,
    comparison_table,
    done_event_from_store,
    parse_label_mapping_text,
    preparation_outcome,
    preparation_text,
    start_training,
    status_text,
    version_stored_by_run,
)

FROM_SCRATCH = "(from scratch)"
#: ``baseModel`` value for training from scratch ("" means: not chosen yet, the first model is taken).
FROM_SCRATCH_REF = "scratch"
ARCHITECTURE_CHOICES = ("3d", "2.5d", "2d")
LOSS_CHOICES = ("dice_ce", "dice_focal", "dice", "ce", "focal", "tversky", "dice_boundary")
DEVICE_CHOICES = ("auto", "cuda", "cpu")


class TrainingPanelError(Exception):
    """Something the user must fix before training can start; the message says what."""


@dataclass
class TrainingSettings:
    """The panel's saved state: the fields of ``DeepSegTrainingParameterNode`` in ``DeepSegTraining.py``
    (a test checks that names, types and defaults agree)."""

    datasetFolder: Path = field(default_factory=Path)
    baseModel: str = ""
    modelName: str = ""
    architecture: str = "3d"
    loss: str = "dice_ce"
    epochs: int = 12
    stepsPerEpoch: int = 20
    frozenEncoderEpochs: int = 0
    labelMapping: str = ""
    resume: bool = False
    device: str = "auto"
    setDropout: bool = False
    dropout: float = 0.1


@dataclass
class TrainingView:
    """What the widgets show."""

    base_models: list[tuple[str, str]] = field(default_factory=list)
    base_index: int = 0
    dataset_info: str = "No dataset selected."
    start_enabled: bool = True
    stop_enabled: bool = False
    promote_enabled: bool = False
    keep_old_enabled: bool = False
    rollback_enabled: bool = False
    progress_percent: int = 0
    status: str = ""
    comparison_table: slicer.vtkMRMLTableNode | None = None
    chart: slicer.vtkMRMLPlotChartNode | None = None


class TrainingPanelLogic:
    """The DeepSegTraining panel's decisions and state (see the module docstring).

    Args:
        scene: the MRML scene (curves, chart and comparison tables go there).
        models_dir: model store folder (None: ``$DEEPSEG_MODELS`` or ``~/.deepseg/models``).
        python: interpreter or launcher command for the engine (None: ``PythonSlicer`` in Slicer).
        find_spec: how to check that a package is importable.
        checkpoints_root: folder for ``<name>/`` checkpoint folders (None: ``deepseg train``'s default).
    """

    def __init__(
        self,
        scene: slicer.vtkMRMLScene,
        models_dir: str | None = None,
        python: str | list[str] | None = None,
        find_spec: Callable[[str], object | None] = importlib.util.find_spec,
        checkpoints_root: str | None = None,
    ) -> None:
        self.scene = scene
        self.models_dir = models_dir
        self.checkpoints_root = checkpoints_root
        self.python = python
        self.find_spec = find_spec
        self.view = TrainingView()
        self.job: DeepSegJob | None = None
        self.curves: TrainingCurves | None = None
        self.done_event: dict | None = None
        self._decided = ""  # the status line about the new version: stored, promoted or kept old
        self._preparation = ""  # what the engine said about preparing the new version's network
        self._models: list[ModelEntry] = []
        self._epochs = 1

    # ------------------------------------------------------------------ choices
    def refresh_models(self, settings: TrainingSettings | None) -> None:
        """Re-read the base models; ``settings.baseModel`` stays on a listed one ("" = from scratch)."""
        self._models, _ = available_models(self.models_dir)
        self.view.base_models = [(FROM_SCRATCH, FROM_SCRATCH_REF), *((m.label, m.ref) for m in self._models)]
        refs = [ref for _, ref in self.view.base_models]
        if settings is not None and settings.baseModel not in refs:
            settings.baseModel = refs[1] if len(refs) > 1 else FROM_SCRATCH_REF
        self.view.base_index = refs.index(settings.baseModel) if settings is not None else 0
        self._update_rollback(settings)

    def choose_base(self, settings: TrainingSettings | None, index: int) -> None:
        """The user picked entry ``index`` of the base-model selector."""
        if settings is not None and 0 <= index < len(self.view.base_models):
            settings.baseModel = self.view.base_models[index][1]
        self.view.base_index = index
        self._update_rollback(settings)

    def dataset_changed(self, settings: TrainingSettings | None) -> None:
        """Describe the chosen dataset folder (cases, split, labels, channels, or what is wrong)."""
        folder = str(settings.datasetFolder) if settings is not None else ""
        self.view.dataset_info = describe_dataset_folder(folder) if folder not in ("", ".") else "No dataset selected."

    def new_model_name(self, settings: TrainingSettings) -> str:
        """The name the new version is stored under: the field, else the base model's name."""
        if settings.modelName.strip():
            return settings.modelName.strip()
        base = next((m for m in self._models if m.ref == settings.baseModel), None)
        if base is None:
            raise TrainingPanelError("Enter a name for the new model (training from scratch has no base name).")
        return base.name

    def install_offer(self) -> dependencies.InstallOffer | None:
        """What must be installed before training can run (None: nothing)."""
        return dependencies.install_offer(self.find_spec, self.python)

    # ------------------------------------------------------------------ the run
    def training_request(self, settings: TrainingSettings) -> TrainingRequest:
        """The run the settings ask for; :class:`TrainingPanelError` names what is wrong."""
        folder = str(settings.datasetFolder)
        if folder in ("", ".") or not Path(folder).is_dir():
            raise TrainingPanelError("Choose a dataset folder (export corrected cases into one from the DeepSeg module).")
        for value, choices, what in (
            (settings.architecture, ARCHITECTURE_CHOICES, "architecture"),
            (settings.loss, LOSS_CHOICES, "loss"),
            (settings.device, DEVICE_CHOICES, "device"),
        ):
            if value not in choices:
                raise TrainingPanelError(f"Unknown {what} {value!r}; choose one of {', '.join(choices)}.")
        if settings.epochs < 1 or settings.stepsPerEpoch < 1:
            raise TrainingPanelError("Train for at least one epoch of at least one step.")
        if settings.setDropout and not 0.0 <= settings.dropout < 1.0:
            raise TrainingPanelError(f"Dropout must be a probability from 0 to below 1, not {settings.dropout:g}.")
        name = self.new_model_name(settings)
        return TrainingRequest(
            dataset=folder,
            name=name,
            checkpoints=str(Path(self.checkpoints_root) / name) if self.checkpoints_root else None,
            base=None if settings.baseModel in ("", FROM_SCRATCH_REF) else settings.baseModel,
            epochs=settings.epochs,
            steps_per_epoch=settings.stepsPerEpoch,
            loss=settings.loss,
            arch=settings.architecture,
            freeze_encoder_epochs=settings.frozenEncoderEpochs,
            label_mapping=parse_label_mapping_text(settings.labelMapping),
            resume=settings.resume,
            device=settings.device,
            models_dir=self.models_dir,
            dropout=settings.dropout if settings.setDropout else None,
        )

    def start(self, settings: TrainingSettings) -> DeepSegJob:
        """Start training; the curves table and chart are created for the live plot."""
        from deepseg_core.datasets import Dataset

        if self.job is not None:
            raise TrainingPanelError("Training is already running; wait for it or click Stop.")
        dependencies.require_engine(self.python, self.find_spec, TrainingPanelError)
        request = self.training_request(settings)
        labels = [label.name for label in Dataset.open(request.dataset).labels]
        self.curves = TrainingCurves(self.scene, labels, name=f"{request.name} training")
        self.view.chart = self.curves.chart
        self.job = start_training(request, self.python)
        self._epochs = request.epochs
        self.done_event = None
        self._preparation = ""
        self.view.start_enabled = False
        self.view.stop_enabled = True
        self.view.promote_enabled = self.view.keep_old_enabled = False
        self.view.progress_percent = 0
        self.view.status = "Starting..."
        return self.job

    def poll(self, settings: TrainingSettings | None) -> bool:
        """Read new events (curves, progress, comparison); True while training still runs."""
        job = self.job
        if job is None:
            return False
        for event in job.poll():
            if self.curves is not None:
                self.curves.add_event(event)
            kind = event.get("event")
            if kind == "epoch_end":
                self.view.progress_percent = round(100 * event["epoch"] / max(1, self._epochs))
            if kind == "done":
                self._offer_decision(event)
            if kind in ("status", "prepared") and self.done_event is not None:
                self._preparation = preparation_text(event)
                if not job.cancel_requested:
                    self._show_decision(self._decided)
                continue
            text = status_text(event)
            if kind == "done":
                self._decided = text
            if text and not job.cancel_requested:
                self.view.status = text
        if not job.finished:
            return True
        job.wait(5)
        self.job = None
        job.cleanup()
        self.view.start_enabled = True
        self.view.stop_enabled = False
        if self.done_event is not None:  # the version is stored: a Stop only skipped preparing it (nothing to resume)
            self._preparation = preparation_outcome(job.events, job.returncode, job.cancel_requested)
            self.view.status = f"{self._decided} {self._preparation}".strip()
            if settings is not None:  # the next Start trains anew: its checkpoint is of a finished, stored run
                settings.resume = False
        elif job.outcome == "cancelled" and (stored := version_stored_by_run(job.output, self.models_dir)) is not None:
            # Stop's kill landed after the version was stored, before the engine said so: nothing is left to
            # resume, and the comparison and Promote come from the stored card instead of the done event
            self._offer_decision(done_event_from_store(stored, self.models_dir))
            self._decided = f"Stopped after {stored} was stored (not active yet). Compare, then Promote or Keep old."
            self.view.status = self._decided
            if settings is not None:
                settings.resume = False
        elif job.outcome == "cancelled":
            self.view.status = "Stopped; the last finished epoch is checkpointed. Tick Resume and Start to continue."
            if settings is not None:
                settings.resume = True
        elif job.outcome != "succeeded":
            self.view.status = job.failure_text()
        self.refresh_models(settings)
        return False

    def _offer_decision(self, done_event: dict) -> None:
        """The new version is stored: show its comparison with the parent and offer Promote / Keep old."""
        self.done_event = done_event
        self.view.comparison_table = comparison_table(self.scene, done_event)
        self.view.promote_enabled = self.view.keep_old_enabled = True

    def stop(self) -> None:
        """Stop returns at once; :meth:`poll` reports when the process tree has exited."""
        if self.job is not None and not self.job.cancel_requested:
            self.job.cancel()
            self.view.stop_enabled = False
            if self.done_event is not None:
                self._preparation = "Stopping: its network is not prepared now; the new version stays."
                self.view.status = f"{self._decided} {self._preparation}"
            else:
                self.view.status = "Stopping after the current step..."

    def close(self) -> None:
        """Module destroyed: stop the tree now and remove its folder."""
        if self.job is not None:
            self.job.kill_and_remove()
            self.job = None

    # ------------------------------------------------------------------ versions
    def promote(self, settings: TrainingSettings | None) -> None:
        """Make the new version active; Roll back undoes it."""
        if self.done_event is None:
            return
        store = ModelStore(self.models_dir)
        ref = self.done_event["model"]
        name = ref.split(":")[0]
        previous = store.active_version(name)
        store.activate(ref)
        self._show_decision(f"{ref} is now active (was {name}:{previous}). Roll back returns to it.")
        self.view.promote_enabled = self.view.keep_old_enabled = False
        self.refresh_models(settings)

    def keep_old(self) -> None:
        """Leave the active version as it is; the new one stays in the store, not active."""
        if self.done_event is None:
            return
        self._show_decision(f"Kept the active version; {self.done_event['model']} stays in the store, not active.")
        self.view.promote_enabled = self.view.keep_old_enabled = False

    def _show_decision(self, text: str) -> None:
        """Show a status about the new version, and while the engine still runs, what it says about preparing
        the version's network."""
        self._decided = text
        running = self.job is not None and not self.job.cancel_requested
        self.view.status = f"{text} {self._preparation}".strip() if running else text

    def rollback(self, settings: TrainingSettings | None) -> None:
        """Return the base model's name to the version that was active before the last promotion."""
        name = self._selected_store_name(settings)
        if name is None:
            raise TrainingPanelError("Choose a stored model as base to roll back its name.")
        store = ModelStore(self.models_dir)
        current = store.active_version(name)
        version = store.rollback(name)
        self._show_decision(f"{name}: active version is {version} again (was {current}).")
        self.refresh_models(settings)
        if settings is not None:
            settings.baseModel = f"{name}:{version}"
            self.refresh_models(settings)

    def _selected_store_name(self, settings: TrainingSettings | None) -> str | None:
        entry = next((m for m in self._models if settings is not None and m.ref == settings.baseModel), None)
        if entry is None or ":" not in entry.ref:
            return None
        return entry.name

    def _update_rollback(self, settings: TrainingSettings | None) -> None:
        name = self._selected_store_name(settings)
        if name is None:
            self.view.rollback_enabled = False
            return
        from deepseg_core.model_catalog import store_root, store_state

        self.view.rollback_enabled = len(store_state(store_root(self.models_dir), name).get("history", [])) >= 2
