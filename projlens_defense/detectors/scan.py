"""The scan: find checkpoints under the given paths, run the detectors, decide with a calibration.

Reads only what the detectors need (see :mod:`~projlens_defense.detectors.loading`), never
executes anything from a checkpoint, and turns every problem with one checkpoint into an
``error`` entry for that checkpoint instead of stopping the whole scan.
"""

from __future__ import annotations

import math
import os
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from projlens_defense.checkpoint.container import CONFIG_NAME, INDEX_NAME, PICKLE_SUFFIXES, SINGLE_NAME
from projlens_defense.checkpoint.scope import checkpoint_scope
from projlens_defense.detectors import DETECTORS
from projlens_defense.detectors.base import Detector, DetectorReport
from projlens_defense.detectors.calibration import (
    DEFAULT_FPR,
    MODE_DETECTORS,
    Calibration,
    calibration_for,
    checked_fpr,
    reference_digest,
)
from projlens_defense.detectors.loading import LoadedCheckpoint, load_checkpoint
from projlens_defense.detectors.task_residual import SIGNAL_PREFIX as TASK_RESIDUAL_PREFIX
from projlens_defense.errors import (
    CheckpointError,
    NothingScannableError,
    ProjlensError,
)
from projlens_defense.jsonsafe import finite
from projlens_defense.projector import Projector
from projlens_defense.scan_input import MissingInput, ScanInput
from projlens_defense.task_subspace import REPAIR_FPR, fitted_task_subspace, residual_share_test

__all__ = ["ScanResult", "Scanner", "find_checkpoints", "repair_judge"]

_CHECKPOINT_MARKERS = frozenset({CONFIG_NAME, INDEX_NAME, SINGLE_NAME, "mm_projector.bin", "mm_projector.safetensors"})
_TENSOR_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)


@dataclass
class ScanResult:
    """The outcome for one checkpoint (the JSON object ``scan --format json`` prints per checkpoint).

    ``verdict``: ``clean``, ``suspicious``, ``inconclusive`` (``reason`` says why: no calibration for
    this model, or a reference-free scan that cannot back a clean verdict) or ``error``; ``score`` /
    ``threshold``: the calibrated combined z-score and the threshold set for the false-positive rate
    ``fpr``; ``p_value``: the chance a benign fine-tune of this model scores as high;
    ``suspected_target_tokens``: ranked; ``format``:
    the checkpoint format; ``errors``: why it could not be judged; ``warnings``: caveats (e.g. a
    calibration fitted for another model); ``mode``: ``reference`` or ``reference-free``;
    ``signals`` / ``zscores``: every raw signal and its z-score against the benign fine-tunes;
    ``signals_used``: those the decision combined; ``detectors``: each detector's report; ``scope``: what the
    scan examined (the projector) and what it did not (the checkpoint's other tensors, per component, and with a
    reference how many of them differ from it; see :mod:`projlens_defense.checkpoint.scope`);
    ``projector_verdict``: the projector's own verdict. They differ only when the projector is judged clean but
    tensors outside it differ from the reference: the checkpoint is then ``inconclusive`` (what changed there is
    outside what the scan examines, so it cannot clear the checkpoint), its projector ``clean``.
    """

    path: str
    verdict: str
    score: float | None = None
    threshold: float | None = None
    p_value: float | None = None
    fpr: float | None = None
    reason: str | None = None
    suspected_target_tokens: list[str] = field(default_factory=list)
    format: str | None = None
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    mode: str | None = None
    reference: str | None = None
    calibration: str | None = None
    signals: dict[str, float] = field(default_factory=dict)
    zscores: dict[str, float] = field(default_factory=dict)
    signals_used: list[str] = field(default_factory=list)
    detectors: list[dict[str, Any]] = field(default_factory=list)
    scope: dict[str, Any] | None = None
    projector_verdict: str | None = None
    bytes_read: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return finite(asdict(self))


def _is_checkpoint_dir(path: Path) -> bool:
    try:
        names = {e.name for e in os.scandir(path)}
    except OSError as e:
        raise CheckpointError(f"{path}: cannot list directory: {e.strerror or e}") from None
    return bool(names & _CHECKPOINT_MARKERS)


def find_checkpoints(path: str | os.PathLike[str]) -> tuple[list[Path], bool]:
    """Checkpoint candidates under ``path`` and whether ``path`` is a folder of checkpoints.

    A file, or a directory holding a model (``config.json``, ``model.safetensors``, an index,
    ``mm_projector.*``), is one checkpoint. Any other directory is a folder of checkpoints: each
    visible subdirectory and each tensor file directly inside it is a candidate.
    """
    p = Path(path)
    try:
        st = os.stat(p)
    except OSError as e:
        raise CheckpointError(f"{p}: cannot read: {e.strerror or e}") from None
    if not stat.S_ISDIR(st.st_mode) or _is_checkpoint_dir(p):
        return [p], False
    try:
        entries = sorted(os.scandir(p), key=lambda e: e.name)
    except OSError as e:
        raise CheckpointError(f"{p}: cannot list directory: {e.strerror or e}") from None
    out = []
    for e in entries:
        if e.name.startswith("."):
            continue
        try:
            if e.is_dir():
                out.append(Path(e.path))
            elif e.is_file() and e.name.lower().endswith(_TENSOR_SUFFIXES):
                out.append(Path(e.path))
        except OSError:
            continue
    return out, True


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:500] if text else type(e).__name__


NO_CALIBRATION = ("no calibration for this model{what}: fit one with `projlens-defense calibrate --reference REF "
                  "--data CLEAN.json --generate 8`, or pass --calibration FILE")
REFERENCE_FREE_CLEAN = ("below the threshold, but without the reference the weight-only signals cannot back a "
                        "clean verdict: scan with --reference for one")
OUTSIDE_CHANGED = ("the projector is judged clean, but {what} differ from the reference: outside what a "
                   "projector scan examines, so the checkpoint cannot be declared clean (check those parts with a "
                   "tool for them; projector_verdict is the projector's own)")


def _share_test_reason(inp: ScanInput, cal: Calibration) -> str | None:
    """Why a reference-mode update below the lens threshold still cannot be called clean: its top component
    outside the benign task subspace carries more of the update than the benign fine-tunes' top one (the
    data-free repair's test, at its rate ``REPAIR_FPR``, so a benign update trips it with that probability);
    None when no layer does or the calibration has no task subspace for this model."""
    if inp.reference is None:
        return None
    deltas = inp.deltas()
    task = fitted_task_subspace(cal, deltas)
    if task is None:
        return None
    over = []
    for li, (d, layer) in enumerate(zip(deltas, task, strict=True)):
        share, bound, over_bound = residual_share_test(d, layer, REPAIR_FPR)
        if over_bound:
            over.append(f"{inp.projector.layer_name(li)} {share:.3f} > {bound:.3f}")
    if not over:
        return None
    return ("below the lens threshold, but the update's top component outside the benign task subspace exceeds "
            f"the benign bound (FPR {REPAIR_FPR}) in " + ", ".join(over) + ": a clean verdict cannot be backed; "
            "`sanitize` (data-free) removes such components")


def _configured_detectors(names: Sequence[str], cal: Calibration | None) -> list[Detector]:
    """The registered detectors ``names``, each with its state from ``cal`` where it has one."""
    out = []
    for name in names:
        det = DETECTORS[name]()
        state = cal.detector_states.get(name) if cal is not None else None
        if state:
            det.set_state(state)
        out.append(det)
    return out


def _reference_free_reason(inp: ScanInput, cal: Calibration, res: ScanResult) -> str | None:
    """Why a reference-mode update below every reference-mode bound still cannot be called clean: the calibrated
    reference-free test, which reads the suspect's projector alone, flags it. The two modes see different things
    (on the instructed zoo a malicious-injection backdoor scored below the reference-mode threshold while the
    reference-free scan flagged it), so a `clean` verdict needs both; this moves a benign fine-tune from `clean` to
    `inconclusive` with that test's rate, never to `suspicious`. Only a test that flags none of the calibration's
    own benign fine-tunes (each held out) may veto: one that does is no ground to withhold `clean`. Its signals are
    added to ``res``."""
    mode = "reference-free"
    if mode not in cal.null:
        return None
    signals: dict[str, float] = {}
    for det in _configured_detectors(MODE_DETECTORS[mode], cal):
        if not det.can_score(inp):
            return None
        try:
            signals.update(det.score(inp).signals)
        except MissingInput:
            return None
    try:
        score, used, z = cal.score(mode, signals)
    except MissingInput:
        return None
    threshold = cal.threshold(mode, used)
    res.signals.update(signals)
    res.zscores.update({k: round(v, 4) for k, v in z.items() if k in signals})
    if not (math.isfinite(score) and score > threshold):
        return None
    if cal.benign_flagged(mode, used):  # it flags a benign fine-tune of its own null: no ground for a veto
        return None
    return (f"below every reference-mode bound, but the reference-free test flags it (score {score:.2f} > "
            f"{threshold:.2f} on {', '.join(used)}, at FPR {cal.fpr}): the two modes disagree, so a clean verdict "
            "cannot be backed")


class Scanner:
    """Scans checkpoints against an optional reference, deciding with a calibration.

    ``calibration``: the benign null to decide with; None looks up, per checkpoint, the cached
    self-generated calibration of its model (:func:`calibration_for`). ``detectors`` restricts which
    registered detectors run (default: those of the mode); ``ov_layers`` is how many leading LLM
    layers the attention lens reads; ``fpr`` the false-positive rate the threshold is set for (default
    :data:`~projlens_defense.detectors.calibration.DEFAULT_FPR`, whatever rate a calibration was printed for);
    ``cross_check``: a reference-mode `clean` also needs the calibrated reference-free test below its threshold
    (off for a repair's self-check, which only asks whether the scan still flags a candidate).
    """

    def __init__(self, calibration: Calibration | None = None, reference: str | os.PathLike[str] | None = None,
                 detectors: Sequence[str] | None = None, ov_layers: int = 2, mode: str | None = None,
                 fpr: float = DEFAULT_FPR, cross_check: bool = True) -> None:
        self.calibration = calibration
        self.cross_check = cross_check
        self.fpr = checked_fpr(fpr)
        self.ov_layers = ov_layers
        self.reference_path = None if reference is None else str(reference)
        self.reference: LoadedCheckpoint | None = None
        if reference is not None:
            self.reference = load_checkpoint(reference, readout=True, ov_layers=ov_layers)
        # ``mode``: for judge() on inputs that already carry their reference projector
        self.mode = mode or ("reference" if reference is not None else "reference-free")
        if self.mode not in MODE_DETECTORS:
            raise ProjlensError(f"unknown scan mode {self.mode!r}; known: {', '.join(MODE_DETECTORS)}")
        names = list(detectors) if detectors else MODE_DETECTORS[self.mode]
        unknown = [n for n in names if n not in DETECTORS]
        if unknown:
            raise ProjlensError(f"unknown detector(s) {unknown}; known: {', '.join(DETECTORS)}")
        self.detector_names = names

    def _detectors(self, cal: Calibration | None) -> list[Detector]:
        return _configured_detectors(self.detector_names, cal)

    def build_input(self, ck: LoadedCheckpoint, warnings: list[str]) -> ScanInput:
        """The ScanInput of a loaded checkpoint, borrowing the reference's LLM read-out if it has none."""
        readout, ov, final, vocab = ck.readout, ck.ov_layers, ck.final_norm, ck.vocab
        ref = self.reference
        if readout is None and ref is not None and ref.readout is not None:
            readout, ov, final = ref.readout, ref.ov_layers, ref.final_norm
            vocab = vocab or ref.vocab
            warnings.append("no LLM weights in the checkpoint: the logit lens reads the reference's LLM")
        elif vocab is None and ref is not None:
            vocab = ref.vocab
        return ScanInput(
            projector=ck.projector,
            reference=None if ref is None else ref.projector,
            readout=readout,
            ov_layers=ov,
            final_norm=final,
            vocab=vocab,
            path=str(ck.info.path),
            format=ck.info.format,
        )

    def scan(self, path: str | os.PathLike[str]) -> ScanResult:
        """Scan one checkpoint; problems become an ``error`` result (NothingScannableError propagates)."""
        t0 = time.perf_counter()
        res = ScanResult(path=str(path), verdict="error", mode=self.mode, reference=self.reference_path)
        ck = None
        try:
            ck = load_checkpoint(path, readout=True, ov_layers=self.ov_layers)
            res.format = ck.info.format
            res.warnings += ck.notes
            inp = self.build_input(ck, res.warnings)
            self._judge(inp, res)
            res.projector_verdict = res.verdict
            self._scope(ck, res)
        except NothingScannableError:
            raise
        except ProjlensError as e:
            res.errors.append(_first_line(e))
        except MemoryError:
            res.errors.append("out of memory while scanning")
        except Exception as e:  # noqa: BLE001 - a hostile file must not crash a multi-file scan
            res.errors.append(f"internal error while scanning ({type(e).__name__}: {_first_line(e)})")
        res.bytes_read = ck.bytes_read if ck is not None else 0
        res.seconds = round(time.perf_counter() - t0, 4)
        return res

    def _scope(self, ck: LoadedCheckpoint, res: ScanResult) -> None:
        """Record what the scan did not examine; warn when those parts differ from the reference, and then do not
        call the checkpoint clean (a backdoor there is outside the scan's scope, not absent)."""
        try:
            scope = checkpoint_scope(ck.info, None if self.reference is None else self.reference.info)
        except CheckpointError as e:
            res.warnings.append(f"could not compare the tensors outside the projector ({_first_line(e)})")
            return
        res.scope = scope.to_dict()
        changed = scope.differing()
        res.warnings += scope.differing_warnings("not examined by this scan (a backdoor there is out of its scope)")
        if changed and res.verdict == "clean":
            res.verdict = "inconclusive"
            res.reason = OUTSIDE_CHANGED.format(what=" and ".join(f"{n} {c} tensor(s)" for c, n in changed.items()))

    def calibration_of(self, inp: ScanInput) -> Calibration | None:
        """The calibration to judge ``inp`` with: the one given, else the cached one of its model."""
        cal = self.calibration if self.calibration is not None else calibration_for(inp)
        return None if cal is None else cal.at_fpr(self.fpr)

    def judge(self, inp: ScanInput) -> ScanResult:
        """The verdict on an input already in memory (e.g. a repaired projector with its model's read-out)."""
        res = ScanResult(path=inp.path or "<in memory>", verdict="error", mode=self.mode, reference=self.reference_path)
        self._judge(inp, res)
        res.projector_verdict = res.verdict
        return res

    def _judge(self, inp: ScanInput, res: ScanResult) -> None:
        if inp.reference is not None and all(
            float(torch.linalg.vector_norm(d)) == 0.0 for d in inp.deltas()
        ) and all(d is None or float(torch.linalg.vector_norm(d)) == 0.0 for d in inp.bias_deltas()):
            res.verdict = "clean"
            res.warnings.append("the projector is identical to the reference: nothing was fine-tuned")
            return
        cal = self.calibration_of(inp)
        mismatch = cal.matches(inp) if cal is not None else []
        if mismatch:
            res.warnings.append(f"calibration {cal.source or ''} was fitted for another model ("  # type: ignore[union-attr]
                                + "; ".join(mismatch) + "): not used")
            cal = None
        res.calibration = None if cal is None else (cal.source or "given")
        reports: list[DetectorReport] = []
        for det in self._detectors(cal):
            if not det.can_score(inp):
                why = "no reference" if det.requires_reference and inp.reference is None else "no LLM read-out"
                res.warnings.append(f"{det.name}: skipped ({why})")
                continue
            try:
                reports.append(det.score(inp))
            except MissingInput as e:
                res.warnings.append(f"{det.name}: skipped ({e})")
        if not reports:
            skipped = "; ".join(w for w in res.warnings if ": skipped (" in w)
            res.errors.append(f"cannot decide in {self.mode!r} mode: no detector could score it ({skipped})")
            return
        for r in reports:
            res.signals.update(r.signals)
        res.detectors = [r.to_dict() for r in reports]
        lens = "logit-lens" if self.mode == "reference" else "reference-free"
        tok = next((r for r in reports if r.name == lens), None) or next((r for r in reports if r.suspected_tokens), None)
        res.suspected_target_tokens = list(tok.suspected_tokens) if tok else []
        if cal is None:
            digest = reference_digest(inp)
            res.verdict = "inconclusive"
            res.reason = NO_CALIBRATION.format(what=f" (reference projector {digest})" if digest else "")
            return
        if self.mode not in cal.null:
            res.verdict = "inconclusive"
            res.reason = f"the calibration has no {self.mode!r} mode; recalibrate with benign fine-tunes"
            return
        try:
            score, used, z = cal.score(self.mode, res.signals)
        except MissingInput as e:
            res.verdict = "inconclusive"
            res.reason = f"cannot decide: {e}"
            return
        res.score = round(score, 4)
        res.threshold = round(cal.threshold(self.mode, used), 4)
        res.p_value = float(f"{cal.p_value(self.mode, z, used):.4g}")
        res.fpr = cal.fpr
        res.signals_used = used
        res.zscores = {k: round(v, 4) for k, v in z.items()}
        if math.isfinite(score) and score > cal.threshold(self.mode, used):
            res.verdict = "suspicious"
        elif self.mode == "reference-free":
            res.verdict = "inconclusive"
            res.reason = REFERENCE_FREE_CLEAN
        else:
            res.verdict = "clean"
            reason = _share_test_reason(inp, cal)
            if reason is None and self.cross_check:
                reason = _reference_free_reason(inp, cal, res)
            if reason:
                res.verdict = "inconclusive"
                res.reason = reason

    def scan_paths(self, paths: Sequence[str | os.PathLike[str]]) -> tuple[list[ScanResult], list[str]]:
        """Scan every checkpoint under ``paths``; returns (results, skipped entries).

        Raises NothingScannableError when no path holds a checkpoint.
        """
        results: list[ScanResult] = []
        skipped: list[str] = []
        for p in paths:
            try:
                candidates, folder = find_checkpoints(p)
            except ProjlensError as e:
                results.append(ScanResult(path=str(p), verdict="error", errors=[_first_line(e)], mode=self.mode))
                continue
            for c in candidates:
                try:
                    results.append(self.scan(c))
                except NothingScannableError as e:
                    if not folder:
                        skipped.append(_first_line(e))
                    else:
                        skipped.append(f"{c}: not a checkpoint")
        if not results:
            where = ", ".join(str(p) for p in paths)
            detail = "; ".join(skipped[:3]) if skipped else "no checkpoints found"
            raise NothingScannableError(f"{where}: nothing scannable ({detail})")
        return results, skipped


def repair_judge(lens: ScanInput | None, calibration: Calibration | None,
                 fpr: float = REPAIR_FPR) -> Callable[..., ScanResult] | None:
    """A repair's self-check: the reference-mode verdict, against ``calibration`` at the repair's rate ``fpr``, of
    ``lens``'s model with its projector replaced by a candidate; None without a calibration, the LLM read-out or
    the reference projector. ``judge(projector, as_scan=True)`` is instead the verdict `scan` prints for it (all
    reference-mode signals, the calibration's own rate, the reference-free cross-check), so that a repair can act on
    what the user was told."""
    if lens is None or calibration is None or lens.reference is None or "reference" not in calibration.null:
        return None
    as_scanned = Scanner(calibration=calibration, mode="reference")
    # the lens signals only: the repair's own selection already is the task-residual test, so the self-check adds
    # the lens's evidence (on the seed-2 transfer rows both choices removed the same components)
    lens_only = [s for s in calibration.combine.get("reference", []) if not s.startswith(TASK_RESIDUAL_PREFIX)]
    if lens_only:
        calibration = replace(calibration, combine={**calibration.combine, "reference": lens_only})
    scanner = Scanner(calibration=calibration, mode="reference", fpr=fpr, cross_check=False)

    def judge(projector: Projector, as_scan: bool = False) -> ScanResult:
        return (as_scanned if as_scan else scanner).judge(replace(lens, projector=projector, _cache={}))

    return judge
