"""Error types that speak to the user: what was expected, what was found, what to do."""

from __future__ import annotations

from pathlib import Path


class DeepSegError(Exception):
    """Base class of every error DeepSeg raises on purpose.

    The message always has the shape ``<subject>: <problem>. Expected ...; found ... <hint>``
    so that the CLI and the Slicer panel can show it unchanged.
    """

    def __init__(
        self,
        problem: str,
        *,
        subject: str | Path | None = None,
        expected: str | None = None,
        found: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.problem = problem
        self.subject = str(subject) if subject is not None else None
        self.expected = expected
        self.found = found
        self.hint = hint
        super().__init__(self._compose())

    def _compose(self) -> str:
        parts = [f"{self.subject}: {self.problem}" if self.subject else self.problem]
        if self.expected is not None or self.found is not None:
            parts.append(f"Expected {self.expected or '?'}; found {self.found or '?'}.")
        if self.hint:
            parts.append(self.hint)
        return " ".join(p if p.endswith(".") else p + "." for p in parts)


class ImageError(DeepSegError):
    """An image or segmentation file is missing, unreadable, or not a usable 3D volume."""


class ConfigError(DeepSegError, ValueError):
    """A configuration value (network, loss, profile, ...) is invalid."""


class ShapeError(DeepSegError, ValueError):
    """A tensor or array has a shape the operation cannot accept."""
