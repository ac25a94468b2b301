"""Batch segmentation bookkeeping: sharding cases over ranks, per-case records, the run summary.

A batch (``deepseg segment in/ --output out/``, also under ``torchrun``) writes, with each case's
outputs and in the same all-or-nothing commit, a record ``out/<case>.deepseg.json`` (rank, seconds,
domain verdict, backend, per-segment volumes). A case whose outputs and record are complete is
skipped by a rerun, so a killed run (or rank) is resumed by running the same command again. Failed
cases are written by their rank to ``out/.deepseg-failed-rank<r>.json``. When every rank is done,
rank 0 writes one summary of all cases: ``out/deepseg_summary.json`` and ``out/deepseg_summary.csv``.
"""

from __future__ import annotations

import csv
import io as _io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from .events import strict_json
from .fileutil import atomic_write_text

T = TypeVar("T")
RECORD_SUFFIX = ".deepseg.json"
SUMMARY_JSON = "deepseg_summary.json"
SUMMARY_CSV = "deepseg_summary.csv"


def shard(items: Sequence[T], rank: int, world: int) -> list[T]:
    """This rank's share: every ``world``-th item from ``rank`` (deterministic, disjoint, complete)."""
    return list(items[rank::world])


def record_path(output_folder: Path, case: str) -> Path:
    """Where a case's record goes in a batch's output folder."""
    return output_folder / f"{case}{RECORD_SUFFIX}"


def record_text(record: dict[str, Any]) -> str:
    """A case record as strict JSON text."""
    return json.dumps(strict_json(record), indent=2) + "\n"


def read_record(output_folder: Path, case: str) -> dict[str, Any] | None:
    """A case's record, or None when there is none (or it cannot be read)."""
    try:
        return json.loads(record_path(output_folder, case).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def failures_path(output_folder: Path, rank: int) -> Path:
    """Where a rank lists the cases it could not segment."""
    return output_folder / f".deepseg-failed-rank{rank}.json"


def write_failures(output_folder: Path, rank: int, failures: list[dict[str, Any]]) -> None:
    """This rank's failed cases (an empty list clears an earlier run's)."""
    atomic_write_text(failures_path(output_folder, rank), json.dumps(strict_json(failures), indent=2) + "\n")


def write_summary(output_folder: Path, cases: Sequence[str], world: int, model: str) -> dict[str, Any]:
    """Rank 0: one summary of every case of the run (done now, done earlier, failed, missing)."""
    failed: dict[str, dict[str, Any]] = {}
    for rank in range(world):
        try:
            for entry in json.loads(failures_path(output_folder, rank).read_text(encoding="utf-8")):
                failed[entry["case"]] = entry
        except (OSError, json.JSONDecodeError):
            continue
    rows = []
    for case in cases:
        record = read_record(output_folder, case)
        if record is not None:
            rows.append(record)
        elif case in failed:
            rows.append({"case": case, "status": "failed", **failed[case]})
        else:
            rows.append({"case": case, "status": "missing"})
    counts = {status: sum(1 for r in rows if r.get("status") == status) for status in ("done", "failed", "missing")}
    summary = {"model": model, "ranks": world, "cases": len(rows), **counts, "results": rows}
    atomic_write_text(output_folder / SUMMARY_JSON, json.dumps(strict_json(summary), indent=2) + "\n")
    atomic_write_text(output_folder / SUMMARY_CSV, summary_csv(rows))
    return summary


def summary_csv(rows: Sequence[dict[str, Any]]) -> str:
    """One CSV row per case: status, rank, seconds, verdict, backend, then ``<segment> [ml]`` columns."""
    segment_names: list[str] = []
    for row in rows:
        for segment in row.get("segments", []):
            if segment["name"] not in segment_names:
                segment_names.append(segment["name"])
    buffer = _io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        ["case", "status", "rank", "seconds", "domain_check", "backend", *(f"{n} [ml]" for n in segment_names), "error"]
    )
    for row in rows:
        volumes = {s["name"]: s["ml"] for s in row.get("segments", [])}
        writer.writerow(
            [
                row["case"],
                row.get("status", ""),
                row.get("rank", ""),
                row.get("seconds", ""),
                row.get("domain_check", ""),
                row.get("backend", ""),
                *(f"{volumes[n]:.6g}" if n in volumes else "" for n in segment_names),
                row.get("error", ""),
            ]
        )
    return buffer.getvalue()
