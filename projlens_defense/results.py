"""The typed results of the Python API (:mod:`projlens_defense.api`), which the CLI renders.

Each has ``to_dict()``: the JSON-ready record the CLI prints with ``--format json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .runinfo import ATTACK_FILE, AttackRecord

if TYPE_CHECKING:
    from .attacks.evaluate import EvalResult

__all__ = ["AnalysisResult", "AttackResult", "EvaluationResult", "GuardResult", "SanitizeResult"]


@dataclass(frozen=True)
class AttackResult:
    """What `attack` made: the checkpoint directory and the record it wrote there as ``attack.json``."""

    checkpoint: Path
    record: AttackRecord

    @property
    def written(self) -> bool:
        """False on a non-main process of `accelerate launch` (the main process writes the checkpoint)."""
        return self.record.raw.get("written") is not False

    @property
    def metrics(self) -> dict[str, Any] | None:
        """Clean accuracy, ASR and false activation on the test data (None: not evaluated)."""
        return self.record.metrics

    def to_dict(self) -> dict[str, Any]:
        return dict(self.record.raw)

    @classmethod
    def from_dict(cls, rec: object, checkpoint: Path) -> AttackResult:
        """The record ``rec`` of the checkpoint ``checkpoint`` (validated as an :class:`AttackRecord`)."""
        checkpoint = Path(checkpoint)
        return cls(checkpoint, AttackRecord.from_dict(rec, checkpoint / ATTACK_FILE))


@dataclass(frozen=True)
class EvaluationResult:
    """What `evaluate` measured: clean accuracy, ASR and false activation of a checkpoint on test data."""

    checkpoint: Path
    variant: str | None
    test_data: Path
    device: str
    dtype: str
    metrics: EvalResult

    def to_dict(self) -> dict[str, Any]:
        return {**self.metrics.to_dict(), "checkpoint": str(self.checkpoint), "variant": self.variant,
                "test_data": str(self.test_data), "device": self.device, "dtype": self.dtype}


@dataclass(frozen=True)
class SanitizeResult:
    """What `sanitize` wrote: the repaired checkpoint, the method's report and the clean accuracy before/after."""

    checkpoint: Path
    out: Path
    format: str
    method: str
    mode: str  # "few-shot" (with clean samples) or "data-free"
    reference: Path | None
    writable: bool
    params: dict[str, Any]
    report: dict[str, Any]  # what was removed (per method: directions, energy, rank, selection...)
    warnings: list[str]
    clean_accuracy: dict[str, Any] | None = None  # n, before, after, change on held-out clean samples

    def to_dict(self) -> dict[str, Any]:
        rec = {"checkpoint": str(self.checkpoint), "out": str(self.out), "format": self.format,
               "method": self.method, "mode": self.mode,
               "reference": None if self.reference is None else str(self.reference), "writable": self.writable,
               "params": self.params, "report": self.report, "warnings": self.warnings}
        return rec if self.clean_accuracy is None else {**rec, "clean_accuracy": self.clean_accuracy}


@dataclass(frozen=True)
class AnalysisResult:
    """What `analyze` wrote: the ProjLens report (``report`` is its Markdown; ``data`` what report.json holds)."""

    data: dict[str, Any]
    benign_source: str | None  # where the benign fine-tunes compared came from (None: there were none)
    report: Path

    def to_dict(self) -> dict[str, Any]:
        return {**self.data, "benign_source": self.benign_source, "report": str(self.report)}


@dataclass(frozen=True)
class GuardResult:
    """What `guard` scored: one row per image (``image``, ``score``, ``flagged``) against the calibrated threshold."""

    checkpoint: Path
    threshold: float
    mode: str
    n_probes: int
    fpr: float
    images: list[dict[str, Any]]
    errors: list[str]  # the images that could not be read

    @property
    def flagged(self) -> int:
        """How many images scored above the threshold."""
        return sum(r["flagged"] for r in self.images)

    def to_dict(self) -> dict[str, Any]:
        return {"checkpoint": str(self.checkpoint), "threshold": self.threshold, "mode": self.mode,
                "n_probes": self.n_probes, "fpr": self.fpr, "images": self.images, "errors": self.errors,
                "flagged": self.flagged}
