"""``deepseg train`` and ``deepseg evaluate``: retraining on a dataset and measuring a model on it."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .events import EventSink


def cmd_train(args: argparse.Namespace) -> int:
    """Train a new version (fine-tune with ``--base``, else from scratch) and store it."""
    from .locations import default_checkpoint_dir
    from .model_store import ModelStore
    from .training.engine import RetrainConfig, Stopped, retrain

    config = RetrainConfig(
        epochs=args.epochs,
        steps_per_epoch=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        loss=args.loss,
        arch=args.arch,
        freeze_encoder_epochs=args.freeze_encoder_epochs,
        validate_every=args.validate_every,
        seed=args.seed,
        label_mapping=parse_label_mapping(args.map_label),
        dropout=args.dropout,
    )
    sink = EventSink(json_mode=args.json)
    checkpoints = Path(args.checkpoints) if args.checkpoints else default_checkpoint_dir(args.name)

    stored: list[str] = []

    def on_event(event: dict) -> None:
        if event.get("event") == "done":
            stored.append(event["model"])
        sink.emit(event)
        if not args.json and event.get("event") == "epoch_end":
            val = event.get("validation")
            dice = " ".join(f"{k} {v['dice']:.3f}" for k, v in val.items()) if val else ""
            print(f"epoch {event['epoch']}/{event['epochs']} loss {event['loss']:.4f} {dice} (ETA {event['eta_s']:.0f} s)")

    sink.emit({"event": "start", "name": args.name, "base": args.base, "pid": os.getpid()})
    try:
        outcome = retrain(
            args.dataset,
            args.name,
            config,
            checkpoints,
            base=args.base,
            store=ModelStore(args.models_dir),
            resume=args.resume,
            device=args.device if args.device != "auto" else ("cuda" if _cuda() else "cpu"),
            on_event=on_event,
            stop_after_epoch=args.stop_after_epoch,
            activate=not args.no_activate,
        )
    except Stopped as exc:
        print(str(exc), file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        if not stored:
            raise
        from .cli import cancelled_before_preparing

        # the Stop landed as the version was stored: it stays, and only its preparation is left to its first run
        return cancelled_before_preparing(stored[0], "stored")
    if outcome.card is None:  # a torchrun rank other than 0: rank 0 stores, reports and prepares
        return 0
    if not args.json:
        print(f"stored {outcome.card.ref} (parent {outcome.card.parent_version}); checkpoints in {checkpoints}")
        print(f"{'label':<16}{'new Dice':>10}{'parent Dice':>13}")
        for name, value in outcome.validation["mean"].items():
            parent = outcome.parent_validation["mean"][name]["dice"] if outcome.parent_validation else float("nan")
            print(f"{name:<16}{value['dice']:>10.3f}{parent:>13.3f}")
    if args.no_prepare:
        return 0
    from .cli import prepare_for_this_computer

    # the new version's first Segment would otherwise export and compile its network (seconds to a minute)
    return prepare_for_this_computer(outcome.card.ref, ModelStore(args.models_dir), args.json, "stored")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Per-case and mean metrics of a model on a dataset split, as JSON."""
    from .datasets import Dataset
    from .inference import Segmenter
    from .model_store import ModelStore
    from .training.engine import evaluate_model, match_labels

    dataset = Dataset.open(args.dataset)
    split = dataset.split()
    ids = sorted(dataset.cases) if args.split == "all" else split[args.split]
    segmenter = Segmenter.load(args.model, device=args.device, store=ModelStore(args.models_dir))
    value_map = match_labels(dataset, segmenter.card, parse_label_mapping(args.map_label))
    result = evaluate_model(segmenter, dataset, ids, value_map=value_map, backend=args.backend)
    result["model"] = segmenter.card.ref
    result["split"] = args.split
    from .cli import print_json

    print_json(result)
    return 0


def parse_label_mapping(items: list[str] | None) -> dict[str, str]:
    """``["tumor=liver lesion", ...]`` -> ``{"tumor": "liver lesion"}`` (dataset name -> model name)."""
    from .errors import ConfigError

    mapping = {}
    for item in items or []:
        dataset_name, sep, model_name = item.partition("=")
        if not sep or not dataset_name.strip() or not model_name.strip():
            raise ConfigError("invalid --map-label", expected="'DATASET LABEL=MODEL LABEL'", found=item)
        mapping[dataset_name.strip()] = model_name.strip()
    return mapping


def add_train_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``deepseg train`` and ``deepseg evaluate``."""
    p = sub.add_parser("train", help="train a new model version on a dataset (fine-tune with --base)")
    p.add_argument("--dataset", required=True)
    p.add_argument("--name", required=True, help="model name of the new version")
    p.add_argument("--base", default=None, help="NAME[:VERSION] or folder to fine-tune; omit to train from scratch")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--steps", type=int, default=20, help="optimiser steps per epoch")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--loss", default="dice_ce")
    p.add_argument("--arch", default="3d", choices=["3d", "2.5d", "2d"], help="from scratch only")
    p.add_argument("--freeze-encoder-epochs", type=int, default=0)
    p.add_argument(
        "--dropout",
        type=float,
        default=None,
        metavar="P",
        help="dropout probability after every conv, needed for --uncertainty-method mc_dropout (e.g. 0.1);"
        " default: the base's own (0 from scratch); on a base without dropout the layers are added, its weights kept",
    )
    p.add_argument(
        "--map-label",
        action="append",
        metavar="'DATASET=MODEL'",
        help="fine-tune on a dataset that names a label differently from the base model (repeatable)",
    )
    p.add_argument("--validate-every", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoints", default=None, help="checkpoint folder (default: a temp folder named after --name)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint folder's last checkpoint")
    p.add_argument(
        "--stop-after-epoch",
        type=int,
        default=None,
        metavar="N",
        help="stop once epoch N is finished and checkpointed, as Stop does (exit code 130); --resume continues."
        " For tests and jobs cut into time slices",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--no-activate", action="store_true", help="store the new version without making it active")
    p.add_argument(
        "--no-prepare",
        action="store_true",
        help="do not export and compile the new version's network for this computer's CPU runtime now (its first run will)",
    )
    p.add_argument("--models-dir", default=None)
    p.add_argument("--json", action="store_true", help="JSON-lines events on stdout")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="metrics of a model on a dataset split (JSON)")
    p.add_argument("--model", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--split", default="validation", choices=["validation", "train", "all"])
    p.add_argument(
        "--backend",
        default="torch",
        choices=["auto", "torch", "openvino", "onnxruntime"],
        help="inference backend (default torch: the numbers of training's validation)",
    )
    p.add_argument("--map-label", action="append", metavar="'DATASET=MODEL'", help="dataset label -> model label")
    p.add_argument("--device", default="auto")
    p.add_argument("--models-dir", default=None)
    p.set_defaults(func=cmd_evaluate)
