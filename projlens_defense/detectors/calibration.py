"""Decision thresholds from benign fine-tunes (the null distribution), saved as JSON.

For each mode (``reference``: a reference projector is given; ``reference-free``), the calibration
holds every detector signal's *out-of-sample* values on the benign fine-tunes (signals of a
detector that learns from benign data are computed leave-one-out), the fitted detector states and
the list of signals the decision combines. At scan time each signal becomes a z-score against its
benign values, the combined score is their maximum (or mean), and the threshold is the largest
leave-one-out combined score of a benign fine-tune plus a margin, recomputed for whichever signals
are available. A calibration for the zoo ships with the package and is the default.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from projlens_defense.detectors.base import Detector, MissingInput, ScanInput
from projlens_defense.errors import CheckpointError, UsageError
from projlens_defense.projector import Projector

__all__ = [
    "DEFAULT_COMBINE",
    "MODES",
    "MODE_DETECTORS",
    "Calibration",
    "default_calibration",
    "fit_calibration",
    "load_calibration",
    "model_signature",
]

CALIBRATION_VERSION = 1
MODES = ("reference", "reference-free")
MODE_DETECTORS: dict[str, list[str]] = {
    "reference": ["spectral", "logit-lens"],
    "reference-free": ["reference-free"],
}
DEFAULT_COMBINE: dict[str, list[str]] = {
    "reference": ["lens.task_influence", "lens.influence"],
    "reference-free": ["rf.task_influence"],
}
"""Signals the decision uses by default, chosen by benchmarks/scan_detection.py on the zoo (24
backdoored vs 8 held-out benign fine-tunes: single-signal AUROC lens.task_influence 1.000,
lens.influence 0.995, lens.novelty 0.969, rf.task_influence 1.000, rf.influence 0.938; the
task_* signals need a calibration fitted on >= 3 benign fine-tunes, else the fallback applies)."""
FALLBACK_COMBINE: dict[str, list[str]] = {
    "reference": ["lens.peak"],
    "reference-free": ["rf.peak"],
}
"""Used when none of the combined signals can be computed (e.g. a calibration from another model,
whose per-token benign baseline does not fit this vocabulary): model-independent concentration."""
WEIGHT_SPACE_DETECTORS = ["spectral", "logit-lens", "reference-free"]
"""The detectors `scan` runs and `calibrate` fits (activation-space detectors need probe data)."""
RULES = ("max", "mean")
SHIPPED_CALIBRATION = Path(__file__).resolve().parent.parent / "data" / "zoo_calibration.json"
MIN_BENIGN = 3


def projector_digest(proj: Projector) -> str:
    """A short sha256 of a projector's weights and biases (as float32), to recognise a reference."""
    h = hashlib.sha256()
    for layer in proj.layers:
        for t in (layer.weight, layer.bias):
            if t is not None:
                h.update(t.detach().to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def model_signature(inp: ScanInput, digest: bool = True) -> dict[str, Any]:
    """What a calibration is specific to: projector layer shapes, vocabulary size, the reference."""
    r = inp.readout
    m = None if r is None else (r.lm_head if r.lm_head is not None else r.embed_tokens)
    out: dict[str, Any] = {
        "projector": [list(layer.weight.shape) for layer in inp.projector.layers],
        "vocab_size": None if m is None else int(m.shape[0]),
    }
    if digest:
        out["reference_digest"] = reference_digest(inp)
    return out


def reference_digest(inp: ScanInput) -> str | None:
    """:func:`projector_digest` of ``inp``'s reference (cached on the reference object)."""
    ref = inp.reference
    if ref is None:
        return None
    cached = getattr(ref, "_projlens_digest", None)
    if cached is None:
        cached = projector_digest(ref)
        ref._projlens_digest = cached  # type: ignore[attr-defined]
    return cached


@dataclass
class Calibration:
    """Benign null distributions per mode and signal, detector states and the decision rule."""

    null: dict[str, dict[str, list[float]]]
    combine: dict[str, list[str]] = field(default_factory=lambda: {k: list(v) for k, v in DEFAULT_COMBINE.items()})
    detector_states: dict[str, dict[str, Any]] = field(default_factory=dict)
    margin: float = 1.0
    rule: str = "max"
    model: dict[str, Any] = field(default_factory=dict)
    benign: list[str] = field(default_factory=list)
    created: str = ""
    tool: str = ""
    note: str = ""
    version: int = CALIBRATION_VERSION
    source: str = field(default="", compare=False)

    # ------------------------------------------------------------------ math
    def _stats(self, mode: str, signal: str, exclude: int | None = None) -> tuple[float, float]:
        vals = [v for i, v in enumerate(self.null[mode][signal]) if i != exclude and v is not None]
        vals = [v for v in vals if math.isfinite(v)]
        if not vals:
            return 0.0, 1.0
        mean = sum(vals) / len(vals)
        var = sum((v - mean) ** 2 for v in vals) / max(1, len(vals) - 1)
        std = max(math.sqrt(var), 0.05 * abs(mean), 1e-6)
        return mean, std

    def usable(self, mode: str, signals: dict[str, float], fallback: bool = False) -> list[str]:
        """The combined (or, with ``fallback``, the fallback) signals of ``mode`` calibrated and present."""
        cal = self.null.get(mode, {})
        wanted = FALLBACK_COMBINE.get(mode, []) if fallback else self.combine.get(mode, [])
        return [s for s in wanted if s in cal and s in signals and math.isfinite(signals[s])]

    def zscores(self, mode: str, signals: dict[str, float], exclude: int | None = None) -> dict[str, float]:
        """Every calibrated signal in ``signals`` as a z-score against the benign values."""
        out = {}
        for s, v in signals.items():
            if s in self.null.get(mode, {}) and v is not None and math.isfinite(v):
                mean, std = self._stats(mode, s, exclude)
                out[s] = (v - mean) / std
        return out

    def _combine(self, z: dict[str, float], used: Sequence[str]) -> float:
        vals = [z[s] for s in used]
        return max(vals) if self.rule == "max" else sum(vals) / len(vals)

    def score(self, mode: str, signals: dict[str, float]) -> tuple[float, list[str], dict[str, float]]:
        """(combined score, signals used, all z-scores); raises MissingInput when none is usable.

        Falls back to :data:`FALLBACK_COMBINE` when none of the combined signals is available.
        """
        used = self.usable(mode, signals) or self.usable(mode, signals, fallback=True)
        if not used:
            raise MissingInput(
                f"none of the calibrated signals {self.combine.get(mode, [])} is available for mode {mode!r}"
            )
        z = self.zscores(mode, signals)
        return self._combine(z, used), used, z

    def benign_scores(self, mode: str, used: Sequence[str]) -> list[float]:
        """Leave-one-out combined scores of the benign fine-tunes."""
        table = self.null[mode]
        n = len(table[used[0]])
        out = []
        for i in range(n):
            sig = {s: table[s][i] for s in used if table[s][i] is not None}
            if len(sig) != len(used):
                continue
            z = self.zscores(mode, sig, exclude=i)
            out.append(self._combine(z, used))
        return out

    def threshold(self, mode: str, used: Sequence[str]) -> float:
        """Largest leave-one-out benign combined score + margin."""
        scores = self.benign_scores(mode, used)
        return (max(scores) if scores else 0.0) + self.margin

    def matches(self, inp: ScanInput) -> list[str]:
        """Human-readable differences between ``inp``'s model and the calibration's (empty if none)."""
        if not self.model:
            return []
        mine = model_signature(inp, digest=False)
        out = []
        if self.model.get("projector") and mine["projector"] != self.model["projector"]:
            out.append(f"projector shapes {mine['projector']} (calibration: {self.model['projector']})")
        if self.model.get("vocab_size") and mine["vocab_size"] and mine["vocab_size"] != self.model["vocab_size"]:
            out.append(f"vocabulary {mine['vocab_size']} (calibration: {self.model['vocab_size']})")
        ref = self.model.get("reference_digest")
        if not out and ref and inp.reference is not None and reference_digest(inp) != ref:
            out.append(f"reference projector {reference_digest(inp)} (calibration: {ref})")
        return out

    # ------------------------------------------------------------------ I/O
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("source")
        d["thresholds"] = {
            m: round(self.threshold(m, self.combine[m]), 4)
            for m in self.null
            if self.combine.get(m) and all(s in self.null[m] for s in self.combine[m])
        }
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "") -> Calibration:
        where = source or "calibration"
        if not isinstance(d, dict) or not isinstance(d.get("null"), dict):
            raise CheckpointError(f"{where}: not a projlens-defense calibration (no 'null' table)")
        if d.get("version") != CALIBRATION_VERSION:
            raise CheckpointError(f"{where}: calibration version {d.get('version')!r}, expected {CALIBRATION_VERSION}")
        null = d["null"]
        for mode, table in null.items():
            if mode not in MODES or not isinstance(table, dict):
                raise CheckpointError(f"{where}: unknown mode {mode!r}")
            lengths = set()
            for sig, vals in table.items():
                if not isinstance(vals, list) or not all(v is None or isinstance(v, (int, float)) for v in vals):
                    raise CheckpointError(f"{where}: signal {sig!r} must be a list of numbers")
                lengths.add(len(vals))
            if len(lengths) > 1:
                raise CheckpointError(f"{where}: mode {mode!r} has signals of different lengths")
        rule = d.get("rule", "max")
        if rule not in RULES:
            raise CheckpointError(f"{where}: unknown rule {rule!r}")
        margin = d.get("margin", 1.0)
        if not isinstance(margin, (int, float)) or not math.isfinite(margin):
            raise CheckpointError(f"{where}: margin must be a number")
        combine = d.get("combine") or {}
        if not isinstance(combine, dict) or not all(isinstance(v, list) for v in combine.values()):
            raise CheckpointError(f"{where}: 'combine' must map modes to lists of signal names")
        return cls(
            null={m: {s: [None if v is None else float(v) for v in vals] for s, vals in t.items()} for m, t in null.items()},
            combine={m: [str(s) for s in v] for m, v in combine.items()},
            detector_states=d.get("detector_states") or {},
            margin=float(margin),
            rule=rule,
            model=d.get("model") or {},
            benign=[str(b) for b in d.get("benign") or []],
            created=str(d.get("created", "")),
            tool=str(d.get("tool", "")),
            note=str(d.get("note", "")),
            source=source,
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")


def load_calibration(path: str | os.PathLike[str]) -> Calibration:
    """Read a calibration JSON file (one-line CheckpointError if it is not one)."""
    from projlens_defense.checkpoint.container import read_json

    return Calibration.from_dict(read_json(Path(path)), str(path))


def default_calibration() -> Calibration:
    """The calibration shipped for the zoo (``projlens_defense/data/zoo_calibration.json``)."""
    try:  # the file beside the package's modules (works for wheels and editable installs alike)
        text = SHIPPED_CALIBRATION.read_text()
    except OSError:
        raise CheckpointError("the shipped zoo calibration is missing; pass --calibration FILE") from None
    return Calibration.from_dict(json.loads(text), "zoo calibration (shipped)")


def fit_calibration(
    benign: Sequence[ScanInput],
    detectors: dict[str, Callable[[], Detector]],
    combine: dict[str, list[str]] | None = None,
    margin: float = 1.0,
    rule: str = "max",
    note: str = "",
) -> Calibration:
    """Fit a calibration on benign fine-tunes.

    ``detectors`` maps registry names to factories. A detector that learns from benign data is
    refitted without each benign input before scoring it, so every stored value is out of sample;
    the stored detector state is then fitted on all of them.
    """
    if len(benign) < MIN_BENIGN:
        raise UsageError(f"calibration needs at least {MIN_BENIGN} benign fine-tunes, got {len(benign)}")
    if rule not in RULES:
        raise UsageError(f"rule must be one of {RULES}")
    has_ref = all(b.reference is not None for b in benign)
    modes = [m for m in MODES if m == "reference-free" or has_ref]
    sigs = [model_signature(b) for b in benign]
    if any(s != sigs[0] for s in sigs):
        raise UsageError("benign fine-tunes differ in projector shapes or vocabulary; calibrate one model at a time")
    null: dict[str, dict[str, list[float | None]]] = {m: {} for m in modes}
    states: dict[str, dict[str, Any]] = {}
    for name, factory in detectors.items():
        det = factory()
        if not all(det.can_score(b) for b in benign):
            continue
        learns = type(det).fit is not Detector.fit
        rows: list[dict[str, float]] = []
        for i, b in enumerate(benign):
            if learns:
                det.fit([x for j, x in enumerate(benign) if j != i])
            try:
                rows.append(det.score(b).signals)
            except MissingInput:
                rows.append({})
        if learns:
            det.fit(benign)
        get_state = getattr(det, "get_state", None)
        if callable(get_state):
            states[name] = get_state()
        for mode in modes:
            if name not in MODE_DETECTORS[mode]:
                continue
            for sig in sorted({k for r in rows for k in r}):
                null[mode][sig] = [r.get(sig) for r in rows]
    combine = combine or {m: [s for s in DEFAULT_COMBINE[m] if s in null[m]] for m in modes}
    for m in modes:
        missing = [s for s in combine.get(m, []) if s not in null[m]]
        if missing:
            raise UsageError(f"cannot combine {missing} in mode {m!r}: not measured (available: {sorted(null[m])})")
    from importlib.metadata import PackageNotFoundError, version

    try:
        tool = f"projlens-defense {version('projlens-defense')}"
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        tool = "projlens-defense"
    return Calibration(
        null=null,  # type: ignore[arg-type]
        combine={m: combine.get(m, []) for m in modes},
        detector_states=states,
        margin=margin,
        rule=rule,
        model=sigs[0],
        benign=[b.path or f"<benign {i}>" for i, b in enumerate(benign)],
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        tool=tool,
        note=note,
    )
