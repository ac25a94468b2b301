"""The DeepSegTraining panel's logic (no Qt): run ``deepseg train --json`` as a subprocess, turn its
events into live MRML table + plot nodes, build the old-vs-new comparison table, promote or keep.

The training always stores the new version *without* activating it, so nothing changes for users
of the model until **Promote**; **Keep old** leaves the active version as it was (the new version
stays in the store and can be promoted later).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import slicer

from deepseg_core.locations import default_checkpoint_dir
from deepseg_core.model_card import region_title
from deepseg_core.model_store import ModelStore
from DeepSegLib.segment_job import DeepSegJob, launch


@dataclass(frozen=True)
class TrainingRequest:
    """The panel's settings (the CLI's flags)."""

    dataset: str
    name: str
    base: str | None = None
    epochs: int = 10
    steps_per_epoch: int = 20
    loss: str = "dice_ce"
    arch: str = "3d"
    freeze_encoder_epochs: int = 0
    label_mapping: tuple[str, ...] = ()
    checkpoints: str | None = None
    resume: bool = False
    device: str = "auto"
    models_dir: str | None = None
    #: dropout after every conv (``--dropout``; Monte-Carlo dropout uncertainty needs > 0); None: the base's own
    dropout: float | None = None


def start_training(request: TrainingRequest, python: str | None = None) -> DeepSegJob:
    """Start ``deepseg train --json --no-activate``; poll the returned job for events.

    Cancelling it (SIGTERM) keeps the last finished epoch's checkpoint; start again with
    ``resume=True`` and the same ``checkpoints`` folder to continue.
    """
    checkpoints = request.checkpoints or str(default_checkpoint_dir(request.name))
    arguments = ["train", "--dataset", request.dataset, "--name", request.name]
    arguments += ["--epochs", str(request.epochs), "--steps", str(request.steps_per_epoch), "--loss", request.loss]
    arguments += ["--arch", request.arch, "--freeze-encoder-epochs", str(request.freeze_encoder_epochs)]
    arguments += ["--checkpoints", checkpoints, "--device", request.device, "--json", "--no-activate"]
    if request.base:
        arguments += ["--base", request.base]
    for entry in request.label_mapping:
        arguments += ["--map-label", entry]
    if request.resume:
        arguments.append("--resume")
    if request.models_dir:
        arguments += ["--models-dir", request.models_dir]
    if request.dropout is not None:
        arguments += ["--dropout", repr(float(request.dropout))]
    return launch(arguments, Path(tempfile.mkdtemp(prefix="deepseg-train-job-")), Path(checkpoints), python)


def version_stored_by_run(checkpoints: Path, models_dir: str | None) -> str | None:
    """``NAME:VERSION`` that the training run checkpointed in ``checkpoints`` stored, or None (its last finished
    epoch is there to resume). ``last/state.json`` records the version once stored; a run killed between storing
    it and recording that (Stop kills the tree 5 s after asking it to stop) is found by the run id its card keeps."""
    try:
        state = json.loads((Path(checkpoints) / "last" / "state.json").read_text())
    except (OSError, ValueError):
        return None
    if state.get("stored_as"):
        return str(state["stored_as"])
    run_id, name = state.get("run_id"), (state.get("run") or {}).get("name")
    if not run_id or not name:
        return None
    return ModelStore(models_dir).version_trained_by(name, run_id)


def done_event_from_store(ref: str, models_dir: str | None) -> dict:
    """The ``done`` event of the run that stored ``ref`` (model, parent, validation Dice per label), rebuilt from
    its card for a run whose own event never came (:func:`version_stored_by_run`). The card keeps Dice only, so a
    region's row has no values list."""
    card = ModelStore(models_dir).card(ref)
    metrics = card.metrics
    training = metrics.get("training") or {}
    parent = f"{card.name}:{card.parent_version}" if card.parent_version is not None else training.get("base")
    parent_scores = (metrics.get("parent_validation") or {}).get("dice")
    return {
        "event": "done",
        "model": card.ref,
        "parent": parent,
        "validation": {label: {"dice": dice} for label, dice in metrics["validation"]["dice"].items()},
        "parent_validation": {label: {"dice": dice} for label, dice in parent_scores.items()} if parent_scores else None,
        "validation_cases": len(metrics["validation"].get("cases", [])),
    }


def parse_label_mapping_text(text: str) -> tuple[str, ...]:
    """The panel's mapping field, ``"tumor=liver lesion; Leber=liver"``, as ``--map-label`` entries."""
    return tuple(entry.strip() for entry in text.split(";") if entry.strip())


class TrainingCurves:
    """Loss and validation Dice per epoch in a table node, drawn by a plot chart node.

    One Dice column per dataset label; a region-based nnU-Net model's validation also scores its
    multi-value regions (``"region": true`` rows), which get a column and a curve when they first
    appear, empty on the epochs before."""

    def __init__(self, scene: slicer.vtkMRMLScene, label_names: Sequence[str], name: str = "DeepSeg training") -> None:
        self.scene = scene
        self.name = name
        #: validation row name -> its column in the table (labels first, then regions as they appear)
        self.dice_columns: dict[str, str] = {}
        self.table = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{name} curves")
        self.chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", f"{name} chart")
        self.chart.SetTitle("Training loss and validation Dice")
        self.chart.SetXAxisTitle("epoch")
        self.series = []
        self._add_column("epoch", plotted=False)
        self._add_column("loss")
        for label in label_names:
            self.dice_columns[label] = self._add_column(f"Dice {label}")

    def _add_column(self, column: str, plotted: bool = True) -> str:
        """A numeric column (empty on the rows already there) and, if ``plotted``, its curve."""
        array = self.table.AddColumn()
        array.SetName(column)
        self.table.SetColumnType(column, 11)  # VTK_DOUBLE (VTK_FLOAT is 10): numeric columns for plotting
        for row in range(self.table.GetTable().GetNumberOfRows()):
            self.table.GetTable().SetValueByName(row, column, float("nan"))
        if plotted:
            series = self.scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"{self.name} {column}")
            series.SetAndObserveTableNodeID(self.table.GetID())
            series.SetXColumnName("epoch")
            series.SetYColumnName(column)
            series.SetPlotType(series.PlotTypeScatter)
            self.chart.AddAndObservePlotSeriesNodeID(series.GetID())
            self.series.append(series)
        return column

    def add_event(self, event: dict) -> bool:
        """Append a row for an ``epoch_end`` event (Dice left empty on epochs without validation)."""
        if event.get("event") != "epoch_end":
            return False
        validation = event.get("validation") or {}
        for name, scores in validation.items():
            if scores.get("region") and name not in self.dice_columns:
                self.dice_columns[name] = self._add_column(f"Dice {row_title(name, scores)}")
        table = self.table.GetTable()
        row = table.InsertNextBlankRow()
        table.SetValueByName(row, "epoch", float(event["epoch"]))
        table.SetValueByName(row, "loss", float(event["loss"]))
        for name, column in self.dice_columns.items():
            value = validation.get(name, {}).get("dice")
            table.SetValueByName(row, column, float(value) if value is not None else float("nan"))
        table.Modified()
        self.table.Modified()
        return True


def row_title(name: str, scores: dict) -> str:
    """How a validation row is titled: a region of several values (nnU-Net's "whole tumor") is scored as
    their union, so its title says which."""
    return region_title(name, scores["values"]) if scores.get("region") and scores.get("values") else name


def status_text(event: dict) -> str:
    """The panel's status line for one event."""
    kind = event.get("event")
    if kind == "epoch_end":
        return f"Epoch {event['epoch']}/{event['epochs']}: loss {event['loss']:.4f}, about {event.get('eta_s', 0):.0f} s left"
    if kind == "resumed":
        return f"Resumed after epoch {event['epoch']}."
    if kind == "done":
        return f"Done: {event['model']} stored (not active yet). Compare, then Promote or Keep old."
    return ""


def preparation_text(event: dict) -> str:
    """What the status line adds, after the new version is stored, for the engine's ``status`` and ``prepared``
    events about preparing its network for this computer."""
    message = str(event.get("message", ""))
    if message.startswith("prepared "):  # "prepared NAME:VERSION for openvino on this computer in 1.9 s"
        message = f"Prepared {message.removeprefix('prepared ')}"
    return message if message.endswith(".") else f"{message}."


def preparation_outcome(events: list[dict], returncode: int | None, stop_requested: bool) -> str:
    """What the status line says, once a training that stored its new version has ended, about preparing that
    version's network for this computer (``events``: the run's).

    The engine says ``status`` ("Preparing ...") before it exports and ``prepared`` when done; it exits 0 also
    when a Stop landed once the work was done, or when preparing failed (logged: the first Segment tries again).
    With neither event, there was nothing to prepare (CUDA, no CPU runtime) or a Stop came first.
    """
    done_at = next((i for i, event in enumerate(events) if event.get("event") == "done"), len(events))
    after_done = events[done_at + 1 :]
    kinds = [event.get("event") for event in after_done]
    prepared = [event for event in after_done if event.get("event") == "prepared"]
    if prepared:
        return preparation_text(prepared[-1])
    if "status" not in kinds:
        return ""
    if returncode == 0:
        if stop_requested:  # the Stop landed after the work, before the engine said so
            return "Its network is prepared for this computer."
        return "Its network could not be prepared for this computer; its first Segment will try again."
    if stop_requested:
        return "Stopped before its network was prepared for this computer: its first Segment will prepare it."
    return "Preparing its network for this computer failed; its first Segment will try again."


def comparison_table(scene: slicer.vtkMRMLScene, done_event: dict) -> slicer.vtkMRMLTableNode:
    """Old vs new Dice per label (and per region of a region-based nnU-Net model) on the fixed validation split,
    from the ``done`` event."""
    table_node = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{done_event['model']} vs {done_event.get('parent') or 'none'}")
    new = done_event["validation"]
    old = done_event.get("parent_validation") or {}
    columns = ["label", f"Dice {done_event.get('parent') or 'parent'}", f"Dice {done_event['model']}", "change"]
    for column in columns:
        table_node.AddColumn().SetName(column)
    table = table_node.GetTable()
    for name, scores in new.items():
        row = table.InsertNextBlankRow()
        before = old.get(name, {}).get("dice")
        table.SetValue(row, 0, row_title(name, scores))
        table.SetValue(row, 1, f"{before:.3f}" if before is not None else "-")
        table.SetValue(row, 2, f"{scores['dice']:.3f}")
        table.SetValue(row, 3, f"{scores['dice'] - before:+.3f}" if before is not None else "-")
    if "validation_cases" in done_event:  # both versions on the same cases; one or two say little about a difference
        row = table.InsertNextBlankRow()
        cases = str(done_event["validation_cases"])
        parent_cases = cases if done_event.get("parent_validation") else "-"  # from scratch: no parent scored
        for column, value in enumerate(("validation cases", parent_cases, cases, "")):
            table.SetValue(row, column, value)
    table_node.Modified()
    return table_node


def promote(model_ref: str, models_dir: str | None = None) -> str:
    """Make ``NAME:VERSION`` the active version; returns the version that was active before."""
    store = ModelStore(models_dir)
    name = model_ref.split(":")[0]
    previous = store.active_version(name)
    store.activate(model_ref)
    return f"{name}:{previous}" if previous is not None else ""
