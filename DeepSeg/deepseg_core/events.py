"""Progress and result events: JSON lines for programs (the Slicer module), a bar for people.

Library code reports through callbacks; only the CLI decides whether an event becomes a JSON line
on stdout (``--json``) or a progress bar on a terminal's stderr.
"""

from __future__ import annotations

import json
import math
import sys
import time
from typing import Any, TextIO


def strict_json(value: Any) -> Any:
    """``value`` with every inf/nan float replaced by its string, so ``json.dumps`` writes strict JSON."""
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def to_json_line(event: dict[str, Any]) -> str:
    """One strict-JSON line (inf/nan written as strings), no trailing newline."""
    return json.dumps(strict_json(event), separators=(",", ":"))


class EventSink:
    """Writes events as JSON lines (``json_mode``) or as a human progress bar and messages."""

    def __init__(self, json_mode: bool, out: TextIO | None = None, err: TextIO | None = None) -> None:
        self.json_mode = json_mode
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self._last_bar = 0.0
        self._bar_open = False  # a bar drawn without its closing newline

    def emit(self, event: dict[str, Any]) -> None:
        """Send one event (a dict with an ``"event"`` key)."""
        if self.json_mode:
            self.out.write(to_json_line(event) + "\n")
            self.out.flush()
        elif event.get("event") == "progress":
            self._bar(event)
        elif event.get("event") == "status":
            self.err.write(("\n" if self._bar_open else "") + f"{event.get('message', '')}\n")
            self._bar_open = False
            self.err.flush()

    def _bar(self, event: dict[str, Any]) -> None:
        if not self.err.isatty():
            return
        now = time.monotonic()
        done, total = int(event["done"]), int(event["total"])
        if done < total and now - self._last_bar < 0.1:
            return
        self._last_bar = now
        width = 30
        filled = int(width * done / max(total, 1))
        eta = event.get("eta_s", 0.0)
        label = event.get("case", "")
        self.err.write(f"\r{label[:28]:<28} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} ETA {eta:5.1f}s")
        self._bar_open = done < total
        if done >= total:
            self.err.write("\n")
        self.err.flush()
