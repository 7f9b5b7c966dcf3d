"""Activation-space analysis (ProjLens finding 2) and the model-level activation detector.

Run up to 64 clean probe images through the vision tower once, pass their features through the
reference and the suspect projector and look at the per-token output shift
``s_t = P_suspect(x_t) - P_reference(x_t)``:

* its **dominant direction**: the mean shift (the direction all tokens share), and the top
  singular directions of the token shifts;
* the **logit-lens reading** of that direction (which vocabulary tokens it points to), with the
  attention (OV) lens of :mod:`~projlens_defense.detectors.logit_lens`;
* the **regression** of each token's shift along the direction against its input feature norm
  (slope, intercept, R^2), per token and per image (token means).

A benign fine-tune of the same task also shifts every output, toward its own answer words. Fitted
on benign fine-tunes, :class:`ActivationDetector` learns the subspace those task shifts span and
removes it before taking the dominant direction, so what is left is what this fine-tune does and
benign ones do not; its decision signals are z-scored against the benign fine-tunes
(leave-one-out), like the weight-space calibration.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from projlens_defense.detectors.base import Detector, DetectorReport
from projlens_defense.detectors.probes import probe_features
from projlens_defense.lens import LensReading, available_readings, lens_reading
from projlens_defense.linalg import top_singular
from projlens_defense.projector import Projector
from projlens_defense.scan_input import MissingInput, ScanInput
from projlens_defense.tokens import token_name

__all__ = [
    "MAX_PROBES",
    "ActivationDetector",
    "Excitation",
    "LineFit",
    "ShiftAnalysis",
    "analyze_shift",
    "benign_subspace",
    "excite",
    "fit_line",
    "output_shift",
]

MAX_PROBES = 64
"""The analysis uses at most this many clean probe images (the issue's budget)."""
DECISION_SIGNALS = ["act.gain"]
"""Signals the calibrated model-level score combines (max of their benign z-scores); chosen on the
zoo by benchmarks/analyze_table.py, where the excitation gain separated every backdoored
checkpoint from every benign fine-tune and the lens novelty / residual share overlapped."""


@dataclass
class LineFit:
    """Least-squares line ``y = slope * x + intercept`` with its R^2 over ``n`` points."""

    slope: float
    intercept: float
    r2: float
    n: int

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def fit_line(x: torch.Tensor, y: torch.Tensor) -> LineFit:
    """Ordinary least squares of ``y`` on ``x`` (flattened); R^2 is 0 for a constant ``y``."""
    x, y = x.reshape(-1).double(), y.reshape(-1).double()
    n = int(x.numel())
    if n < 2:
        return LineFit(float("nan"), float("nan"), float("nan"), n)
    xc, yc = x - x.mean(), y - y.mean()
    sxx = float((xc * xc).sum())
    slope = float((xc * yc).sum()) / sxx if sxx > 0 else 0.0
    intercept = float(y.mean()) - slope * float(x.mean())
    ss_tot = float((yc * yc).sum())
    ss_res = float(((y - (slope * x + intercept)) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 0.0
    return LineFit(slope, intercept, r2, n)


@torch.no_grad()
def output_shift(suspect: Projector, reference: Projector, features: torch.Tensor) -> torch.Tensor:
    """``P_suspect(x) - P_reference(x)`` for vision features [N, T, dim] -> [N, T, out_dim]."""
    x = features.float()
    return suspect.forward(x) - reference.forward(x)


def benign_subspace(shifts: Sequence[torch.Tensor], rank: int) -> torch.Tensor:
    """Orthonormal basis [out_dim, rank] of the directions benign fine-tunes shift outputs along.

    Each benign shift (tokens x out_dim) is scaled to unit Frobenius norm so that no single
    fine-tune (e.g. one with a larger learning rate) dominates.
    """
    if not shifts or rank <= 0:
        dim = shifts[0].shape[-1] if shifts else 0
        return torch.zeros(dim, 0)
    rows = [s.reshape(-1, s.shape[-1]).float() for s in shifts]
    m = torch.cat([r / r.norm().clamp_min(1e-12) for r in rows])
    return top_singular(m, rank)[2].contiguous()


@dataclass(eq=False)
class ShiftAnalysis:
    """The shift of the suspect's outputs on clean probes, after removing ``basis`` (benign subspace).

    ``direction``: unit dominant (shared) direction = normalised mean residual shift;
    ``svd_directions`` [out_dim, k]: top singular directions of the residual token shifts (each
    oriented so that tokens project positively on average), ``svd_energy`` their energy share;
    ``token_norm`` / ``token_proj`` [N, T]: input feature norm and shift along ``direction`` per
    token; ``per_token`` / ``per_image``: the regressions of shift on norm; ``residual``: share of
    the shift's energy outside the benign subspace; ``shared``: |mean residual shift| / RMS of the
    token residual shifts (1 = every token moves the same way).
    """

    direction: torch.Tensor
    svd_directions: torch.Tensor
    svd_energy: list[float]
    token_norm: torch.Tensor
    token_proj: torch.Tensor
    per_token: LineFit
    per_image: LineFit
    residual: float
    shared: float
    shift_rms: float
    basis_rank: int

    def project(self, shift: torch.Tensor) -> torch.Tensor:
        """Shift(s) [..., out_dim] along the dominant direction."""
        return shift.float() @ self.direction

    def summary(self) -> dict[str, Any]:
        """JSON-ready numbers (no tensors)."""
        return {
            "per_token": self.per_token.to_dict(),
            "per_image": self.per_image.to_dict(),
            "residual_energy": self.residual,
            "shared": self.shared,
            "shift_rms": self.shift_rms,
            "svd_energy": self.svd_energy,
            "benign_subspace_rank": self.basis_rank,
            "n_images": int(self.token_norm.shape[0]),
            "n_tokens": int(self.token_norm.numel()),
        }


def _align(shift: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shift as [N, T', out] with the matching input norms [N, T'] (a merger joins g features per token)."""
    n = x.shape[0]
    if shift.ndim == 3 and shift.shape[:2] == x.shape[:2]:
        return shift, x.norm(dim=-1)
    s = shift.reshape(n, -1, shift.shape[-1])
    return s, x.reshape(n, s.shape[1], -1).norm(dim=-1)


def analyze_shift(suspect: Projector, reference: Projector, probes: torch.Tensor,
                  basis: torch.Tensor | None = None, k: int = 3, shift: torch.Tensor | None = None) -> ShiftAnalysis:
    """Dominant shift direction and shift-vs-norm regressions on clean ``probes`` [N, T, dim].

    ``basis`` [out_dim, r] (e.g. :func:`benign_subspace`) is projected out first; ``shift`` may
    pass a precomputed :func:`output_shift`.
    """
    x = probes.float()
    if x.ndim == 2:
        x = x[:, None]
    s = output_shift(suspect, reference, x) if shift is None else shift.float()
    s, norm = _align(s, x)
    flat = s.reshape(-1, s.shape[-1])
    total = float((flat**2).sum())
    if basis is not None and basis.numel():
        b = basis.float()
        flat_r = flat - (flat @ b) @ b.T
    else:
        flat_r = flat
    resid = float((flat_r**2).sum())
    mean = flat_r.mean(0)
    mnorm = float(mean.norm())
    _, sv, v = top_singular(flat_r, k)  # randomized for LLaVA-scale token matrices
    dirs = v.clone()
    for j in range(dirs.shape[1]):
        if float((flat_r @ dirs[:, j]).mean()) < 0:
            dirs[:, j] = -dirs[:, j]
    # the shared direction; with no shared component at all, the top singular direction
    direction = mean / mnorm if mnorm > 0 else dirs[:, 0]
    energy = (sv**2 / max(resid, 1e-30)).tolist()
    proj = s @ direction
    rms = math.sqrt(resid / max(1, flat_r.shape[0]))
    return ShiftAnalysis(
        direction=direction,
        svd_directions=dirs,
        svd_energy=[float(e) for e in energy],
        token_norm=norm,
        token_proj=proj,
        per_token=fit_line(norm, proj),
        per_image=fit_line(norm.mean(1), proj.mean(1)),
        residual=resid / total if total > 0 else 0.0,
        shared=mnorm / rms if rms > 0 else 0.0,
        shift_rms=math.sqrt(total / max(1, flat.shape[0])),
        basis_rank=0 if basis is None else int(basis.shape[1]),
    )


@dataclass(eq=False)
class Excitation:
    """The bounded feature-space perturbation that most moves the suspect's outputs out of the benign subspace.

    ``direction``: unit mean residual shift of the perturbed probes (what the lens reads);
    ``gain``: its length over the RMS token shift of the clean probes; ``delta``: the perturbation
    [T, dim] (one vector per token position, each at most ``eps`` times the median token norm).
    """

    direction: torch.Tensor
    gain: float
    mean_norm: float
    delta: torch.Tensor


def excite(suspect: Projector, reference: Projector, probes: torch.Tensor, basis: torch.Tensor | None = None,
           eps: float = 1.0, steps: int = 100, lr: float = 0.05, seed: int = 0) -> Excitation:
    """Search a trigger-free excitation: per-position additive feature perturbations, bounded by ``eps``
    times the median probe token norm, that maximise the mean output shift outside ``basis``.

    A backdoor is a direction the suspect writes for some inputs and benign fine-tunes do not; a
    clean probe may barely touch it (a noise trigger lives where clean features never go), so the
    analysis also looks where a small universal perturbation of the clean features can push the
    outputs. No trigger is assumed: the perturbation is found by gradient ascent from noise.
    """
    x = probes.float()
    if x.ndim == 2:
        x = x[:, None]
    b = basis.float() if basis is not None and basis.numel() else None
    scale = float(x.norm(dim=-1).median()) or 1.0
    g = torch.Generator().manual_seed(seed)
    delta = (0.01 * scale * torch.randn(x.shape[1:], generator=g)).requires_grad_(True)
    opt = torch.optim.Adam([delta], lr=lr * scale)

    def bounded(d: torch.Tensor) -> torch.Tensor:
        return d * torch.clamp(eps * scale / d.norm(dim=-1, keepdim=True).clamp_min(1e-12), max=1.0)

    def mean_residual(d: torch.Tensor) -> torch.Tensor:
        xs = x + d
        sh = (suspect.forward(xs) - reference.forward(xs)).reshape(-1, suspect.out_dim)
        m = sh.mean(0)
        return m - b @ (b.T @ m) if b is not None else m

    with torch.enable_grad():
        for _ in range(steps):
            loss = -(mean_residual(bounded(delta)) ** 2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        d = bounded(delta.detach())
        m = mean_residual(d)
        clean = (suspect.forward(x) - reference.forward(x)).reshape(-1, suspect.out_dim)
        rms = float(clean.pow(2).sum(1).mean().sqrt())
    mn = float(m.norm())
    return Excitation(direction=m / max(mn, 1e-12), gain=mn / rms if rms > 0 else 0.0, mean_norm=mn, delta=d)


def _positive_reading(inp: ScanInput, directions: torch.Tensor, names: list[str]) -> LensReading:
    """Lens reading of ``directions`` keeping only their positive orientation (the way outputs move)."""
    r = lens_reading(inp, directions, names)
    keep = [i for i, lab in enumerate(r.labels) if lab.endswith("+")]
    return LensReading(z=r.z[:, keep], raw=r.raw[:, keep], labels=[r.labels[i] for i in keep], mask=r.mask)


class ActivationDetector(Detector):
    """Model-level detector from the output shift on clean probes (needs ``ScanInput.probe_data.probes``).

    The dominant direction read through the lens is, with ``excite`` (default), the mean shift
    under the trigger-free :func:`excite` perturbation, else the mean shift of the clean probes;
    both after removing the benign task subspace once fitted. Signals (higher = more suspicious):
    ``act.peak`` (the reading's best token z-score), ``act.shared`` and, once fitted on benign
    fine-tunes, ``act.novelty`` (largest per-token deviation of the reading from the benign
    readings, in benign standard deviations), ``act.residual`` (share of the clean shift outside
    the benign subspace), ``act.gain`` (excited residual mean shift over the clean shift RMS) and
    ``act.score``: the max of the decision signals' z-scores against the benign fine-tunes
    (leave-one-out), with ``evidence['threshold']`` (the Student-t prediction bound at false-positive rate ``fpr``).
    Suspected tokens are ranked by the reading minus the benign mean reading once fitted (by the
    reading itself before).
    """

    name = "activation"
    learns = True
    requires_reference = True
    requires_readout = False

    def __init__(self, benign_rank: int = 4, excite: bool = True, eps: float = 1.0, steps: int = 100,
                 n_tokens: int = 10, std_floor: float = 0.5, fpr: float = 0.01, max_probes: int = MAX_PROBES,
                 signals: Sequence[str] = DECISION_SIGNALS) -> None:
        self.benign_rank = benign_rank
        self.excite = excite
        self.eps = eps
        self.steps = steps
        self.n_tokens = n_tokens
        self.std_floor = std_floor
        self.fpr = fpr
        self.max_probes = max_probes
        self.signals = list(signals)
        self.basis: torch.Tensor | None = None
        self.baseline: dict[str, Any] | None = None
        self.null: dict[str, list[float | None]] | None = None
        self._memo: weakref.WeakKeyDictionary[ScanInput, torch.Tensor] = weakref.WeakKeyDictionary()

    # ------------------------------------------------------------------ helpers
    def can_score(self, inp: ScanInput) -> bool:
        return inp.reference is not None and inp.probe_data.probes is not None

    def probes(self, inp: ScanInput) -> torch.Tensor:
        return probe_features(inp)[: self.max_probes]

    def shift(self, inp: ScanInput) -> torch.Tensor:
        """The output shift on ``inp``'s probes (memoised per input object)."""
        hit = self._memo.get(inp)
        if hit is None:
            if inp.reference is None:
                raise MissingInput("activation: needs a reference projector")
            hit = self._memo[inp] = output_shift(inp.projector, inp.reference, self.probes(inp))
        return hit

    def analyze(self, inp: ScanInput, basis: torch.Tensor | None = None) -> ShiftAnalysis:
        """:func:`analyze_shift` of ``inp``'s clean probes with the fitted benign subspace (or ``basis``)."""
        b = self.basis if basis is None else basis
        return analyze_shift(inp.projector, inp.reference, self.probes(inp), b, shift=self.shift(inp))  # type: ignore[arg-type]

    def excitation(self, inp: ScanInput, basis: torch.Tensor | None = None) -> Excitation:
        """:func:`excite` on ``inp``'s probes outside the fitted benign subspace (or ``basis``)."""
        b = self.basis if basis is None else basis
        return excite(inp.projector, inp.reference, self.probes(inp), b, eps=self.eps, steps=self.steps)  # type: ignore[arg-type]

    @staticmethod
    def _has_lens(inp: ScanInput) -> bool:
        return bool(inp.readout is not None and available_readings(inp))

    def _reading(self, inp: ScanInput, dominant: torch.Tensor, a: ShiftAnalysis) -> LensReading | None:
        if not self._has_lens(inp):
            return None
        dirs = [dominant[:, None], a.direction[:, None], a.svd_directions]
        names = ["dominant", "clean-mean"] + [f"clean-s{i + 1}" for i in range(a.svd_directions.shape[1])]
        try:
            return _positive_reading(inp, torch.cat(dirs, 1), names)
        except MissingInput:
            return None

    def relative(self, scores: torch.Tensor, baseline: dict[str, Any] | None = None) -> torch.Tensor | None:
        """Per-token reading minus the benign fine-tunes' mean reading (None when unfitted).

        Tokens every fine-tune of the task points at (its answer words, generic words like
        "sure") drop out; what is left is what this checkpoint reads and benign ones do not.
        """
        b = self.baseline if baseline is None else baseline
        if not b or int(b["vocab_size"]) != scores.shape[0]:
            return None
        return scores - torch.tensor(b["mean"], dtype=torch.float32)

    def _novelty(self, scores: torch.Tensor, baseline: dict[str, Any] | None) -> torch.Tensor | None:
        if not baseline or int(baseline["vocab_size"]) != scores.shape[0]:
            return None
        mu = torch.tensor(baseline["mean"], dtype=torch.float32)
        sd = torch.tensor(baseline["std"], dtype=torch.float32).clamp_min(max(self.std_floor, 1e-6))
        return ((scores - mu) / sd).masked_fill(torch.isinf(scores), float("-inf"))

    def measure(self, inp: ScanInput, basis: torch.Tensor | None = None, baseline: dict[str, Any] | None = None,
                ) -> tuple[dict[str, float], ShiftAnalysis, Excitation | None, LensReading | None, torch.Tensor | None]:
        """(signals, clean analysis, excitation, lens reading, per-token novelty) of ``inp``.

        ``basis`` / ``baseline`` default to the fitted ones (none when unfitted).
        """
        basis = self.basis if basis is None else basis
        baseline = self.baseline if baseline is None else baseline
        if basis is None:
            basis = torch.zeros(inp.projector.out_dim, 0)
        a = self.analyze(inp, basis)
        e = self.excitation(inp, basis) if self.excite else None
        reading = self._reading(inp, e.direction if e is not None else a.direction, a)
        sig = {"act.shared": a.shared}
        if basis.numel():
            sig["act.residual"] = a.residual
            if e is not None:
                sig["act.gain"] = e.gain
        nov = None
        if reading is not None:
            sc = reading.z[:, 0]
            sig["act.peak"] = float(sc.max())
            nov = self._novelty(sc, baseline)
            if nov is not None:
                sig["act.novelty"] = float(nov.max())
        return sig, a, e, reading, nov

    # ------------------------------------------------------------------ fit
    def _fit_parts(self, benign: Sequence[ScanInput]) -> tuple[torch.Tensor, dict[str, Any] | None]:
        basis = benign_subspace([self.shift(b) for b in benign], self.benign_rank)
        rows = []
        for b in benign:
            _, _, _, r, _ = self.measure(b, basis, {})
            if r is not None:
                rows.append(r.z[:, 0])
        baseline = None
        if rows and len({r.shape[0] for r in rows}) == 1:
            x = torch.stack(rows)
            x = x.masked_fill(torch.isinf(x), 0.0)
            sd = x.std(0) if len(rows) > 1 else torch.zeros(x.shape[1])
            baseline = {"vocab_size": int(x.shape[1]), "n": len(rows), "mean": x.mean(0).tolist(), "std": sd.tolist()}
        return basis, baseline

    def fit(self, benign: Sequence[ScanInput]) -> ActivationDetector:
        """Learn the benign task subspace, the benign lens readings and the signals' benign null.

        Every stored benign signal value is out of sample: computed with the subspace and the
        baseline fitted on the other benign fine-tunes.
        """
        benign = [b for b in benign if self.can_score(b)]
        if len(benign) < 3:
            raise MissingInput(f"activation: fitting needs >= 3 benign fine-tunes with probes, got {len(benign)}")
        rows = []
        for i, b in enumerate(benign):
            basis, baseline = self._fit_parts([x for j, x in enumerate(benign) if j != i])
            rows.append(self.measure(b, basis, baseline or {})[0])
        self.null = {sig: [r.get(sig) for r in rows] for sig in sorted({k for r in rows for k in r})}
        self.basis, self.baseline = self._fit_parts(benign)
        return self

    def fit_basis(self, benign: Sequence[ScanInput]) -> ActivationDetector:
        """Learn the benign task subspace and mean reading only (enough for the analysis; no calibrated score)."""
        benign = [b for b in benign if self.can_score(b)]
        if benign:
            self.basis, self.baseline = self._fit_parts(benign)
        return self

    def get_state(self) -> dict[str, Any]:
        """The fitted state, JSON-serialisable."""
        return {"benign_rank": self.benign_rank, "excite": self.excite, "eps": self.eps, "steps": self.steps,
                "std_floor": self.std_floor, "fpr": self.fpr, "signals": self.signals,
                "basis": None if self.basis is None else self.basis.T.tolist(),
                "baseline": self.baseline, "null": self.null}

    def set_state(self, state: dict[str, Any]) -> ActivationDetector:
        """Restore :meth:`get_state` output."""
        for key in ("benign_rank", "steps"):
            setattr(self, key, int(state.get(key, getattr(self, key))))
        for key in ("eps", "std_floor", "fpr"):
            setattr(self, key, float(state.get(key, getattr(self, key))))
        self.excite = bool(state.get("excite", self.excite))
        self.signals = list(state.get("signals", self.signals))
        basis = state.get("basis")
        self.basis = None if basis is None else torch.tensor(basis, dtype=torch.float32).T.contiguous()
        self.baseline = state.get("baseline")
        self.null = state.get("null")
        return self

    # ------------------------------------------------------------------ calibrated score
    def _calibration(self) -> Any:
        from projlens_defense.detectors.calibration import Calibration

        assert self.null is not None
        return Calibration(null={"reference": self.null}, combine={"reference": list(self.signals)},
                           fpr=self.fpr, rule="max")

    def calibrated(self, signals: dict[str, float]) -> tuple[float, float, list[str]] | None:
        """(score, threshold, signals used) against the benign null, or None when unfitted."""
        if not self.null:
            return None
        cal = self._calibration()
        try:
            score, used, _ = cal.score("reference", signals)
        except MissingInput:
            return None
        return score, cal.threshold("reference", used), used

    def benign_scores(self) -> list[float]:
        """Leave-one-out calibrated scores of the benign fine-tunes the detector was fitted on."""
        if not self.null:
            return []
        cal = self._calibration()
        used = cal.usable("reference", {s: 0.0 for s in self.signals})
        return cal.benign_scores("reference", used) if used else []

    # ------------------------------------------------------------------ score
    def score(self, inp: ScanInput) -> DetectorReport:
        if not self.can_score(inp):
            raise MissingInput("activation: needs a reference projector and clean probes (ScanInput.probe_data.probes)")
        signals, a, e, reading, nov = self.measure(inp)
        evidence: dict[str, Any] = {"shift": a.summary(), "direction": "excited" if e is not None else "clean-mean",
                                    "benign_subspace_rank": 0 if self.basis is None else int(self.basis.shape[1])}
        if e is not None:
            evidence["excitation"] = {"gain": e.gain, "mean_norm": e.mean_norm, "eps": self.eps}
        tokens: list[str] = []
        if reading is not None:
            sc = reading.z[:, 0]
            n = min(self.n_tokens, int(reading.mask.sum()))
            rel = self.relative(sc)
            key = sc if rel is None else rel
            top = []
            for t in torch.topk(key, n).indices.tolist():
                item: dict[str, Any] = {"token": token_name(inp.vocab, t), "id": t, "z": round(float(sc[t]), 3)}
                if rel is not None:
                    item["relative"] = round(float(rel[t]), 3)
                if nov is not None:
                    item["novelty"] = round(float(nov[t]), 3)
                top.append(item)
            evidence["top_tokens"] = top
            evidence["ranking"] = "z" if rel is None else "z minus the benign mean reading"
            evidence["reading"] = reading.labels[0].split(":")[0]
            evidence["per_direction"] = reading.column_tops(inp.vocab)
            if nov is not None:
                evidence["most_novel_tokens"] = [{"token": token_name(inp.vocab, t), "id": t,
                                                  "novelty": round(float(nov[t]), 3)}
                                                 for t in torch.topk(nov, n).indices.tolist()]
            tokens = [x["token"] for x in top]
        cal = self.calibrated(signals)
        headline = signals.get("act.peak", a.shared)
        if cal is not None:
            signals["act.score"] = cal[0]
            evidence.update(threshold=cal[1], signals_used=cal[2], verdict="suspicious" if cal[0] > cal[1] else "clean")
            headline = cal[0]
        return DetectorReport(name=self.name, score=float(headline), signals=signals, evidence=evidence,
                              suspected_tokens=tokens)
