"""Everything the DeepSeg panel decides, without Qt, tested on real MRML scenes.

``DeepSeg.py``'s widget only forwards clicks here and copies :class:`PanelView` into its widgets,
so what no test can run (the Qt widget code) is a line or two per button. This class decides:

- which models the selector lists and which one the parameter node holds (also on first open and
  after a scene close: the model shown is the model saved);
- whether Segment may run, what it starts (a ``deepseg segment`` process tree, never a thread);
- the job's lifecycle: progress and ETA, the domain-check verdict, Cancel (non-blocking; the
  panel says *Cancelled* and the scene stays as it was), Failed with the engine's message;
- what a finished run puts into the scene (segments, uncertainty overlay, measurement table), and
  Undo of the last run;
- export of the corrected segmentation into a dataset.

Before the first Segment nothing here imports torch or jsonschema: models are listed from
``model.json`` files read as JSON (:mod:`.model_choices`), the device line comes from
``nvidia-smi`` (:mod:`.dependencies`), and engine modules are imported only once a run starts.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import slicer

from . import dependencies
from .model_choices import ModelEntry, available_models
from .segment_job import DeepSegJob, SegmentRequest, start_segmentation

DOMAIN_COLOURS = {"ok": "green", "caution": "darkorange", "out_of_distribution": "red"}


class PanelError(Exception):
    """Something the user must fix before the action can run; the message says what."""


@dataclass
class PanelSettings:
    """The panel's saved state: the fields of ``DeepSegParameterNode`` in ``DeepSeg.py`` (a test
    checks that names, types and defaults agree). The widget passes its parameter node, which has
    the same attributes; tests pass this class."""

    inputVolume: slicer.vtkMRMLScalarVolumeNode | None = None
    additionalVolume: slicer.vtkMRMLScalarVolumeNode | None = None
    outputSegmentation: slicer.vtkMRMLSegmentationNode | None = None
    model: str = ""
    device: str = "auto"
    overlap: float = 0.5
    tta: bool = False
    instances: bool = True
    uncertainty: bool = False
    measurements: bool = True
    datasetFolder: Path = field(default_factory=Path)
    caseId: str = ""
    overwriteCase: bool = False
    backend: str = "auto"
    precision: str = "float32"


#: the choices of the Device selector (the parameter node's ``Choice``).
DEVICE_CHOICES = ("auto", "cuda", "cpu")
#: the choices of the Advanced > Inference backend selector.
BACKEND_CHOICES = ("auto", "torch", "openvino", "onnxruntime")
#: the choices of the Advanced > CPU precision selector.
PRECISION_CHOICES = ("float32", "bfloat16")


@dataclass
class PanelView:
    """What the widgets show; the widget copies it after every action and poll."""

    models: list[ModelEntry] = field(default_factory=list)
    model_index: int = -1
    model_description: str = ""
    second_channel_visible: bool = False
    device_info: str = ""
    segment_enabled: bool = True
    cancel_enabled: bool = False
    undo_enabled: bool = False
    next_uncertain_enabled: bool = False
    show_measurements_enabled: bool = False
    progress_percent: int = 0
    status: str = ""
    domain_text: str = ""
    domain_colour: str = "black"
    uncertain_regions_text: str = ""
    export_status: str = ""


@dataclass(frozen=True)
class FoldChoice:
    """One line of *Import model...*'s question about an nnU-Net folder's folds.

    ``folds``: what ``deepseg models import --folds`` gets (``("0",)``), or None for every fold,
    nnU-Net's own default (an ensemble: one network pass per fold)."""

    label: str
    folds: tuple[str, ...] | None


#: the checkpoint ``deepseg models import`` reads from an nnU-Net fold (nnU-Net's default).
NNUNET_CHECKPOINT = "checkpoint_final.pth"


def fold_choices(folder: str | Path) -> list[FoldChoice]:
    """What to ask before importing ``folder``: nothing (``[]``) unless it is an nnU-Net v2 results
    folder (``plans.json``, ``dataset.json``) with two or more ``fold_N/checkpoint_final.pth``; then
    all folds first (the engine's default, as nnU-Net's), and each fold alone. Reads only file names."""
    folder = Path(folder)
    if not ((folder / "plans.json").is_file() and (folder / "dataset.json").is_file()):
        return []
    numbers = sorted(
        int(path.name[5:]) for path in folder.glob("fold_*") if path.name[5:].isdigit() and (path / NNUNET_CHECKPOINT).is_file()
    )
    if len(numbers) < 2:
        return []
    every = FoldChoice(f"All {len(numbers)} folds (nnU-Net's ensemble: about {len(numbers)}x the time of one)", None)
    return [every] + [FoldChoice(f"Fold {number} only", (str(number),)) for number in numbers]


def progress_text(event: dict) -> tuple[int | None, str]:
    """``(percent or None, status line)`` for one ``deepseg segment --json`` event."""
    kind = event.get("event")
    if kind == "start":
        return 0, f"Segmenting with {event.get('model')} on {event.get('device')}..."
    if kind == "progress":
        done, total = int(event.get("done", 0)), max(1, int(event.get("total", 1)))
        return round(100 * done / total), f"Tile {done}/{total}, about {float(event.get('eta_s', 0.0)):.0f} s left"
    if kind == "case_done":
        return 100, f"Done in {float(event.get('seconds', 0.0)):.1f} s."
    if kind == "case_failed":
        return None, f"Failed: {event.get('error')}"
    if kind == "status":  # the engine exporting the network for this computer (first run of a model version)
        return None, str(event.get("message", ""))
    return None, ""


class _JobNodes(NamedTuple):
    """The nodes a running Segment was started with: the volumes it reads and the output it fills."""

    volume: slicer.vtkMRMLScalarVolumeNode
    additional_volume: slicer.vtkMRMLScalarVolumeNode | None
    output: slicer.vtkMRMLSegmentationNode
    model: str


def _remove_with_displays(scene: slicer.vtkMRMLScene, node: slicer.vtkMRMLDisplayableNode) -> None:
    displays = [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
    for each in [*displays, node]:
        scene.RemoveNode(each)


class DeepSegPanelLogic:
    """The DeepSeg panel's decisions and state (see the module docstring).

    Args:
        scene: the MRML scene the panel works on.
        models_dir: model store folder (None: ``$DEEPSEG_MODELS`` or ``~/.deepseg/models``).
        python: interpreter or launcher command for the engine (None: ``PythonSlicer`` in Slicer).
        find_spec: how to check that a package is importable (tests make packages unimportable).
    """

    def __init__(
        self,
        scene: slicer.vtkMRMLScene,
        models_dir: str | None = None,
        python: str | list[str] | None = None,
        find_spec: Callable[[str], object | None] = importlib.util.find_spec,
    ) -> None:
        self.scene = scene
        self.models_dir = models_dir
        self.python = python
        self.find_spec = find_spec
        self.view = PanelView()
        self.job: DeepSegJob | None = None
        self.job_kind = ""  # "segment" or "import"
        self.problems: list[str] = []
        self._snapshot = None
        self._review = None
        self._discard_result = False
        self._created_output: slicer.vtkMRMLSegmentationNode | None = None
        self._job_nodes: _JobNodes | None = None

    # ------------------------------------------------------------------ models and device
    def refresh_models(self, settings: PanelSettings | None) -> None:
        """Re-read the model list and keep ``settings.model`` on a listed model (the first when unset)."""
        self.view.models, self.problems = available_models(self.models_dir)
        if self.problems:
            self.view.status = "Some model folders could not be read: " + " ".join(self.problems)
        self.sync_model(settings)

    def sync_model(self, settings: PanelSettings | None) -> None:
        """Make the parameter node hold the model the selector shows (first open, scene close, refresh)."""
        refs = [entry.ref for entry in self.view.models]
        if settings is not None and refs and settings.model not in refs:
            settings.model = refs[0]
        index = refs.index(settings.model) if settings is not None and settings.model in refs else (0 if refs else -1)
        self._show_model(index)

    def choose_model(self, settings: PanelSettings | None, index: int) -> None:
        """The user picked entry ``index`` of the selector."""
        if 0 <= index < len(self.view.models) and settings is not None:
            settings.model = self.view.models[index].ref
        self._show_model(index)

    def _show_model(self, index: int) -> None:
        entry = self.view.models[index] if 0 <= index < len(self.view.models) else None
        self.view.model_index = index
        self.view.model_description = entry.description if entry else "No model found. Import one with Import model..."
        self.view.second_channel_visible = entry is not None and len(entry.channels) > 1

    def refresh_device_info(self) -> None:
        """The device line, from ``nvidia-smi`` and torch's installed version string (no CUDA here)."""
        torch_version = dependencies.installed_torch_build() if dependencies.importable("torch", self.find_spec) else None
        self.view.device_info = dependencies.device_summary(dependencies.nvidia_gpu(), torch_version)

    def install_offer(self) -> dependencies.InstallOffer | None:
        """What must be installed before the engine can run (None: nothing), for the consent dialog."""
        return dependencies.install_offer(self.find_spec, self.python)

    # ------------------------------------------------------------------ Segment and the job
    def segment_request(self, settings: PanelSettings) -> SegmentRequest:
        """The run the settings ask for; :class:`PanelError` names what is missing."""
        refs = [entry.ref for entry in self.view.models]
        if not settings.model or settings.model not in refs:
            raise PanelError("Choose a model first (the list is empty: import a model or click Refresh).")
        if settings.inputVolume is None:
            raise PanelError("Choose an input volume first (load one, or the sample case under Sample data).")
        if settings.device not in DEVICE_CHOICES:
            raise PanelError(f"Unknown device {settings.device!r}; choose one of {', '.join(DEVICE_CHOICES)}.")
        if settings.backend not in BACKEND_CHOICES:
            raise PanelError(f"Unknown inference backend {settings.backend!r}; choose one of {', '.join(BACKEND_CHOICES)}.")
        if settings.precision not in PRECISION_CHOICES:
            raise PanelError(f"Unknown precision {settings.precision!r}; choose one of {', '.join(PRECISION_CHOICES)}.")
        if settings.precision == "bfloat16" and settings.backend == "onnxruntime":
            raise PanelError("ONNX Runtime has no bfloat16: choose precision float32, or backend auto, openvino or torch.")
        entry = self.view.models[refs.index(settings.model)]
        if len(entry.channels) > 1 and settings.additionalVolume is None:
            raise PanelError(f"This model needs {len(entry.channels)} input volumes ({', '.join(entry.channels)}).")
        return SegmentRequest(
            model=settings.model,
            device=settings.device,
            overlap=settings.overlap,
            tta=settings.tta,
            instances=settings.instances,
            uncertainty=settings.uncertainty,
            measurements=settings.measurements,
            backend=settings.backend,
            precision=settings.precision,
            models_dir=self.models_dir,
        )

    def start_segment(self, settings: PanelSettings) -> DeepSegJob:
        """Start Segment (dependencies must be installed; see :meth:`install_offer`)."""
        from .mrml_bridge import volume_from_node

        if self.job is not None:
            raise PanelError("A segmentation is already running; wait for it or click Cancel.")
        dependencies.require_engine(self.python, self.find_spec, PanelError)
        request = self.segment_request(settings)
        channels = [volume_from_node(settings.inputVolume)]
        if self.view.second_channel_visible:
            channels.append(volume_from_node(settings.additionalVolume))
        created = None
        if settings.outputSegmentation is None:
            created = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{settings.inputVolume.GetName()} DeepSeg")
            created.CreateDefaultDisplayNodes()
        try:
            self.job = start_segmentation(channels, request, self.python)
        except BaseException:
            if created is not None:
                _remove_with_displays(self.scene, created)
            raise
        self.job_kind = "segment"
        self._created_output = created
        if created is not None:
            settings.outputSegmentation = created
        # the result goes onto the volumes the run read and into the output chosen now, whatever the selectors
        # show when it finishes: labels of one volume must not be put on another of the same grid
        self._job_nodes = _JobNodes(
            settings.inputVolume,
            settings.additionalVolume if len(channels) > 1 else None,
            settings.outputSegmentation,
            request.model,
        )
        self._discard_result = False
        self.view.segment_enabled = False
        self.view.cancel_enabled = True
        self.view.progress_percent = 0
        self.view.status = "Starting..."
        self.view.domain_text = ""
        self.view.domain_colour = "black"
        return self.job

    def poll(self, settings: PanelSettings | None) -> bool:
        """Read new events; when the job has finished, apply or report it. True while it still runs."""
        from .result_review import domain_check_text

        job = self.job
        if job is None:
            return False
        for event in job.poll():
            if event.get("event") == "domain_check":
                verdict, self.view.domain_text = domain_check_text(event)
                self.view.domain_colour = DOMAIN_COLOURS.get(verdict, "black")
            percent, text = progress_text(event)
            if percent is not None:
                self.view.progress_percent = percent
            if text and not job.cancel_requested:
                self.view.status = text
        if not job.finished:
            return True
        job.wait(5)
        self.job = None
        self.view.segment_enabled = True
        self.view.cancel_enabled = False
        try:
            if self.job_kind == "import":
                self._finish_import(job, settings)
            else:
                self._finish(job, settings)
        finally:
            job.cleanup()
        return False

    def start_import(self, folder: str, name: str = "", folds: tuple[str, ...] | None = None) -> DeepSegJob:
        """Import model...: ``deepseg models import FOLDER`` (DeepSeg, nnU-Net v2 or MONAI bundle) as a job.

        ``folds``: for an nnU-Net folder, the folds to import (a :class:`FoldChoice`'s); None: all."""
        import tempfile

        from .segment_job import launch

        if self.job is not None:
            raise PanelError("DeepSeg is busy; wait for the current run or click Cancel.")
        if not folder or not Path(folder).is_dir():
            raise PanelError(f"Choose the folder of a trained model (found: {folder or 'nothing'}).")
        dependencies.require_engine(self.python, self.find_spec, PanelError)
        arguments = ["models", "import", str(folder), "--json"]
        if name.strip():
            arguments += ["--name", name.strip()]
        if folds:
            arguments += ["--folds", *folds]
        if self.models_dir:
            arguments += ["--models-dir", self.models_dir]
        workdir = Path(tempfile.mkdtemp(prefix="deepseg-import-"))
        self.job = launch(arguments, workdir, workdir, self.python)
        self.job_kind = "import"
        self.view.segment_enabled = False
        self.view.cancel_enabled = True
        which = f" (fold {', '.join(folds)})" if folds else ""
        self.view.status = f"Importing {folder}{which}..."
        return self.job

    def _finish_import(self, job: DeepSegJob, settings: PanelSettings | None) -> None:
        imported = next((e for e in job.events if e.get("event") == "imported"), None)
        # exit 0 (also a stop the engine took after the work), or a stop after the engine said "prepared",
        # changed nothing: the import is complete
        finished = job.returncode == 0 or any(e.get("event") == "prepared" for e in job.events)
        if job.outcome == "cancelled" and imported is None:
            self.view.status = "Import cancelled; the store is unchanged."
            return
        if not finished and imported is not None:  # stopped while preparing: the model is in the store
            if settings is not None:
                settings.model = imported["model"]
            self.refresh_models(settings)
            how = "was cancelled" if job.outcome == "cancelled" else "did not finish"
            self.view.status = f"Imported {imported['model']}; preparing it for this computer {how} (its first run will)."
            return
        if not finished or imported is None:
            self.view.status = f"Import failed: {job.error or f'the engine exited with code {job.returncode}'}"
            return
        if settings is not None:
            settings.model = imported["model"]
        self.refresh_models(settings)
        source = imported.get("source", {}).get("format", "")
        self.view.status = f"Imported {imported['model']}" + (f" from {source}" if source else "") + "; it is selected."

    def _finish(self, job: DeepSegJob, settings: PanelSettings | None) -> None:
        from .result_review import load_review
        from .scene_logic import apply_segmentation_file

        outcome = job.outcome
        created, self._created_output = self._created_output, None
        nodes, self._job_nodes = self._job_nodes, None
        removed = nodes is not None and not all(
            node is None or self.scene.IsNodePresent(node) for node in (nodes.volume, nodes.additional_volume, nodes.output)
        )
        if outcome != "succeeded" or self._discard_result or settings is None or removed:
            if created is not None and self.scene.IsNodePresent(created):
                _remove_with_displays(self.scene, created)  # the node made for this run goes with it
            if settings is not None and created is not None and settings.outputSegmentation is created:
                settings.outputSegmentation = None
            self.view.progress_percent = 0
            if outcome == "cancelled" or self._discard_result or settings is None:
                self.view.status = "Cancelled; the scene is unchanged."
            elif outcome != "succeeded":
                self.view.status = job.failure_text()
            else:
                self.view.status = (
                    "A volume or the output segmentation of the run was removed from the scene while it ran:"
                    " its result was not applied."
                )
            return
        if nodes is None:
            raise RuntimeError("a segmentation finished that start_segment did not start")
        volume, additional, output, chosen_model = nodes
        model = next((e.get("model") for e in job.events if e.get("event") == "start"), chosen_model)
        _, self._snapshot = apply_segmentation_file(job.output, output, volume, model, additional_volume_node=additional)
        self.view.undo_enabled = True
        self.view.status += f" Segments written to {output.GetName()}."
        try:
            self._review = load_review(self.scene, job.workdir, volume, self._review)
        except Exception as exc:  # the segments are in; a broken overlay or table must not hide that
            self.view.status += f" The uncertainty map or measurements could not be shown: {exc}"
            self._review = None
        navigator = self._review.navigator if self._review else None
        self.view.next_uncertain_enabled = navigator is not None and len(navigator) > 0
        self.view.show_measurements_enabled = self._review is not None and self._review.table_node is not None
        self.view.uncertain_regions_text = f"{len(navigator)} uncertain region(s)." if navigator is not None else ""

    def cancel(self) -> None:
        """Cancel returns at once; :meth:`poll` reports *Cancelled* when the process tree has exited."""
        if self.job is not None and not self.job.cancel_requested:
            self.job.cancel()
            self.view.cancel_enabled = False
            self.view.status = "Cancelling..."

    def abandon(self) -> None:
        """The scene is closing: stop the job and never apply its result."""
        self._discard_result = True
        self.cancel()
        self._snapshot = None
        self._review = None
        self.view.undo_enabled = self.view.next_uncertain_enabled = self.view.show_measurements_enabled = False

    def close(self) -> None:
        """The module is being destroyed (application exit): stop the tree now and remove its folder."""
        if self.job is not None:
            self.job.kill_and_remove()
            self.job = None
        self._job_nodes = self._created_output = None

    # ------------------------------------------------------------------ after a run
    def undo(self) -> None:
        """Undo last Segment: segments as before the run; its overlay and table removed."""
        from .result_review import remove_review
        from .scene_logic import PREDICTION_ATTRIBUTE, forget_prediction

        if self._snapshot is None:
            return
        undone_prediction = self._snapshot.node.GetAttribute(PREDICTION_ATTRIBUTE)
        self._snapshot.restore()
        self._snapshot = None
        forget_prediction(self.scene, undone_prediction)
        remove_review(self.scene, self._review)
        self._review = None
        self.view.undo_enabled = self.view.next_uncertain_enabled = self.view.show_measurements_enabled = False
        self.view.uncertain_regions_text = ""
        self.view.status = "Last Segment undone."

    def next_uncertain(self) -> None:
        """Centre the slice views on the next uncertain region."""
        if self._review is None or self._review.navigator is None:
            return
        region = self._review.navigator.next_region(self.scene)
        self.view.uncertain_regions_text = self._review.navigator.status(region)

    @property
    def measurement_table(self) -> slicer.vtkMRMLTableNode | None:
        """The last run's measurement table node, if any."""
        return self._review.table_node if self._review is not None else None

    def export(self, settings: PanelSettings) -> None:
        """Export the corrected segmentation as a dataset case (nothing is written on any error)."""
        from .scene_logic import export_corrected_case

        if settings.inputVolume is None or settings.outputSegmentation is None:
            raise PanelError("Segment a volume (or choose a segmentation as Output) before exporting.")
        if not settings.caseId.strip():
            raise PanelError("Enter a case id for the exported case.")
        if not str(settings.datasetFolder) or str(settings.datasetFolder) == ".":
            raise PanelError("Choose the dataset folder to export into (create one with `deepseg dataset create`).")
        extra = [settings.additionalVolume] if self.view.second_channel_visible and settings.additionalVolume else []
        record = export_corrected_case(
            str(settings.datasetFolder),
            settings.caseId.strip(),
            settings.inputVolume,
            settings.outputSegmentation,
            overwrite=settings.overwriteCase,
            additional_volume_nodes=extra,
        )
        effort = record.provenance
        changed = f"{effort.changed_voxels} voxels changed" if effort.changed_voxels is not None else "no prediction to compare"
        self.view.export_status = f"Case {record.case_id} added to {record.split} ({changed})."
