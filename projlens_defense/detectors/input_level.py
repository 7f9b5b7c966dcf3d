"""Input-level detection: which incoming images make a projector fire its backdoor.

An :class:`InputDetector` scores single inputs of one suspect model. It is calibrated on clean
probe images only (never on triggered ones): :meth:`InputDetector.calibrate` learns what clean
inputs look like and sets a threshold from out-of-sample clean scores, :meth:`score_inputs`
scores new inputs. It is also a :class:`~projlens_defense.detectors.base.Detector`: given a
:class:`ScanInput` whose :class:`~projlens_defense.scan_input.ProbeData` holds clean ``probes`` and the ``inputs`` to
judge (vision features [N, tokens, vision_dim]), :meth:`score` returns the fraction flagged and every score.

:class:`ShiftInputDetector` is the mechanism-based one (ProjLens finding 2): a triggered input
moves the projector output along the few directions the fine-tune wrote (the top left singular
vectors of the last layer's dW, and the trigger-free excitation direction) further than any clean
input does. Its score is the largest, over image tokens and those two channels, whitened distance
of the output shift in clean standard deviations; without a reference it falls back to the
whitened projector output itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from projlens_defense.detectors.activation import excite
from projlens_defense.detectors.base import Detector, DetectorReport
from projlens_defense.detectors.probes import probe_features
from projlens_defense.linalg import top_singular
from projlens_defense.projector import Projector
from projlens_defense.scan_input import MissingInput, ScanInput

__all__ = [
    "InputDetector",
    "ShiftInputDetector",
    "Whitener",
    "clean_threshold",
]

def clean_threshold(scores: Sequence[float] | np.ndarray, fpr: float) -> float:
    """The threshold that lets at most ``fpr`` of these clean scores through (flag = score > thr).

    With n clean scores and ``fpr < 1/n`` this is their maximum, whose expected false-positive
    rate on new clean inputs is about 1/(n+1).
    """
    s = np.sort(np.asarray(scores, float))
    if not len(s):
        return float("inf")
    k = int(np.floor(fpr * len(s)))
    return float(s[len(s) - 1 - min(k, len(s) - 1)])


class Whitener:
    """Mean and shrunk inverse covariance of row vectors: ``distance(x) = ||(x - mean) L||``.

    ``shrink`` mixes the covariance with its mean variance times the identity (Ledoit-Wolf
    style), so 64 probe images x 576 tokens in 4096 dimensions still give a stable inverse.
    """

    def __init__(self, shrink: float = 0.1) -> None:
        self.shrink = shrink
        self.mean: torch.Tensor | None = None
        self.factor: torch.Tensor | None = None

    def fit(self, x: torch.Tensor) -> Whitener:
        x = x.reshape(-1, x.shape[-1]).double()
        self.mean = x.mean(0)
        xc = x - self.mean
        cov = xc.T @ xc / max(1, x.shape[0] - 1)
        scale = float(cov.diagonal().mean()) or 1.0
        cov = (1 - self.shrink) * cov + self.shrink * scale * torch.eye(cov.shape[0], dtype=cov.dtype)
        evals, evecs = torch.linalg.eigh(cov)
        self.factor = (evecs / evals.clamp_min(1e-12 * scale).sqrt()).float()
        self.mean = self.mean.float()
        return self

    def distance(self, x: torch.Tensor) -> torch.Tensor:
        """Whitened distance of each row (leading dims kept)."""
        if self.mean is None or self.factor is None:
            raise RuntimeError("Whitener used before fit")
        return ((x.float() - self.mean) @ self.factor).norm(dim=-1)


def _reduce(d: torch.Tensor, how: str, top: int) -> torch.Tensor:
    """Per-image score from per-token values [N, T]."""
    if how == "max":
        return d.amax(dim=1)
    if how == "mean":
        return d.mean(dim=1)
    if how == "top":
        return d.topk(min(top, d.shape[1]), dim=1).values.mean(dim=1)
    raise ValueError(f"unknown reduction {how!r} (max, mean, top)")


class InputDetector(Detector):
    """Base class of input-level detectors (higher score = more likely triggered).

    Subclasses implement :meth:`calibrate` (clean probes only; sets :attr:`threshold`) and
    :meth:`score_inputs`. ``batch_level`` detectors (Spectral Signatures, Activation
    Clustering) score an input relative to the batch it arrives in.
    """

    batch_level: ClassVar[bool] = False
    needs: ClassVar[tuple[str, ...]] = ("probes", "inputs")
    """The fields of ``ScanInput.probe_data`` (:class:`~projlens_defense.scan_input.ProbeData`) :meth:`score` needs."""

    def __init__(self, fpr: float = 0.01) -> None:
        self.fpr = fpr
        self.threshold: float | None = None

    def can_score(self, inp: ScanInput) -> bool:
        return not inp.probe_data.missing(self.needs)

    def calibrate(self, inp: ScanInput) -> InputDetector:
        """Learn clean behaviour from ``inp``'s clean probes and set :attr:`threshold`."""
        raise NotImplementedError

    def score_inputs(self, inp: ScanInput, features: torch.Tensor | None, images: Sequence[np.ndarray] | None = None,
                     questions: Sequence[str] | None = None) -> np.ndarray:
        """One score per input (vision features [M, tokens, dim], or images for image-level detectors)."""
        raise NotImplementedError

    def flags(self, scores: np.ndarray) -> np.ndarray:
        """Inputs above the calibrated threshold."""
        if self.threshold is None:
            raise RuntimeError(f"{self.name}: calibrate() before flagging")
        return np.asarray(scores) > self.threshold

    def score(self, inp: ScanInput) -> DetectorReport:
        """Calibrate on ``probe_data.probes``, judge ``probe_data.inputs``; score = fraction flagged."""
        missing = inp.probe_data.missing(self.needs)
        if missing:
            raise MissingInput(f"{self.name}: needs {', '.join(f'ScanInput.probe_data.{n}' for n in missing)}")
        self.calibrate(inp)
        data = inp.probe_data
        feats = data.inputs
        scores = self.score_inputs(inp, None if feats is None else torch.as_tensor(feats).float(),
                                   data.input_images, data.input_questions)
        flagged = self.flags(scores)
        frac = float(flagged.mean()) if len(flagged) else 0.0
        return DetectorReport(
            name=self.name,
            score=frac,
            signals={f"{self.name}.flagged_fraction": frac, f"{self.name}.max_score": float(np.max(scores, initial=-np.inf))},
            evidence={"threshold": self.threshold, "scores": [round(float(s), 5) for s in scores],
                      "flagged": [int(i) for i in np.flatnonzero(flagged)]},
        )

    def get_state(self) -> dict[str, Any]:  # pragma: no cover - overridden where state exists
        return {"threshold": self.threshold}


class ShiftInputDetector(InputDetector):
    """Whitened output shift of each image token along what the fine-tune wrote (ProjLens finding 2).

    With a reference the shift ``P_suspect(x) - P_reference(x)`` is read in two channels: (1) the
    top ``k`` left singular vectors ``U_k`` of the last layer's dW, (2) the trigger-free *excitation*
    direction (:func:`~projlens_defense.detectors.activation.excite`: where a small universal feature
    perturbation pushes the outputs hardest, the suspected target direction of the activation
    analysis). A patch trigger can move a few tokens along (2) while hiding in the noise of the
    ``k``-dimensional (1), and a global style trigger the other way round. Without a reference the
    one channel is the projector output itself. Each channel's token vectors are whitened against
    the clean probe tokens and reduced over tokens (``reduce``, max by default); the image score is
    the largest channel score in clean standard deviations (mean and spread of 2-fold cross-fitted
    clean probe scores, each half scored by statistics of the other), and the threshold lets
    ``fpr`` of those cross-fitted clean scores through.
    """

    name = "input-shift"

    def __init__(self, k: int = 8, reduce: str = "max", top: int = 4, shrink: float = 0.1, fpr: float = 0.01,
                 folds: int = 2, excite: bool = True) -> None:
        super().__init__(fpr=fpr)
        self.k = k
        self.reduce = reduce
        self.top = top
        self.shrink = shrink
        self.folds = folds
        self.excite = excite
        self.basis: torch.Tensor | None = None
        self.direction: torch.Tensor | None = None
        self.mode: str | None = None
        self._suspect: Projector | None = None
        self._reference: Projector | None = None
        self.whiteners: list[Whitener] = []
        self.standard: list[tuple[float, float]] = []
        self.clean_scores: np.ndarray | None = None

    # ------------------------------------------------------------------ representation
    def setup(self, suspect: Projector, reference: Projector | None = None) -> ShiftInputDetector:
        """Choose the representation: the output shift (reference; channels read at calibration) or the raw output."""
        self._suspect, self._reference = suspect, reference
        self.direction = None
        if reference is not None:
            dw = suspect.delta(reference)[-1]
            u, _, _ = top_singular(dw, self.k)
            self.basis, self.mode = u, "shift"
        else:
            self.basis, self.mode = None, "output"
        return self

    @torch.no_grad()
    def represent(self, features: torch.Tensor, outputs: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Per-token representation of each channel, [N, T, width], of vision features (``outputs``: the suspect's)."""
        if self._suspect is None:
            raise RuntimeError("ShiftInputDetector.setup() first")
        x = features.float()
        if x.ndim == 2:
            x = x[:, None]
        n, width = x.shape[0], self._suspect.out_dim  # [N, T', out]: a merger returns one row per 4 patches, flat
        out = (self._suspect.forward(x) if outputs is None else outputs.float()).reshape(n, -1, width)
        if self.mode != "shift":
            return [out]
        assert self._reference is not None and self.basis is not None
        shift = out - self._reference.forward(x).reshape(n, -1, width)
        reps = [shift @ self.basis]
        if self.direction is not None:
            reps.append((shift @ self.direction)[..., None])
        return reps

    def _channel_scores(self, reps: list[torch.Tensor]) -> np.ndarray:
        if not self.whiteners:
            raise RuntimeError(f"{self.name}: calibrate() first")
        z = [(_reduce(w.distance(r), self.reduce, self.top).numpy() - mu) / sd
             for w, r, (mu, sd) in zip(self.whiteners, reps, self.standard, strict=True)]
        return np.max(np.stack(z), axis=0)

    # ------------------------------------------------------------------ calibration
    def calibrate_features(self, probes: torch.Tensor) -> ShiftInputDetector:
        """Whitening statistics, standardisation and threshold from clean probe features [N, T, dim] (after setup)."""
        if self.mode == "shift" and self.excite:
            assert self._suspect is not None and self._reference is not None
            self.direction = excite(self._suspect, self._reference, probes).direction
        reps = self.represent(probes)
        n = reps[0].shape[0]
        folds = max(1, min(self.folds, n // 2))
        self.whiteners, self.standard = [], []
        z = []
        for rep in reps:
            oos = np.zeros(n)
            if folds > 1:
                idx = np.arange(n)
                for f in range(folds):
                    held = idx % folds == f
                    w = Whitener(self.shrink).fit(rep[torch.from_numpy(~held)])
                    oos[held] = _reduce(w.distance(rep[torch.from_numpy(held)]), self.reduce, self.top).numpy()
            whitener = Whitener(self.shrink).fit(rep)
            if folds == 1:
                oos = _reduce(whitener.distance(rep), self.reduce, self.top).numpy()
            mu, sd = float(oos.mean()), float(oos.std()) or 1.0
            self.whiteners.append(whitener)
            self.standard.append((mu, sd))
            z.append((oos - mu) / sd)
        self.clean_scores = np.max(np.stack(z), axis=0)
        self.threshold = clean_threshold(self.clean_scores, self.fpr)
        return self

    def calibrate(self, inp: ScanInput) -> ShiftInputDetector:
        self.setup(inp.projector, inp.reference)
        return self.calibrate_features(probe_features(inp))

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def score_features(self, features: torch.Tensor, outputs: torch.Tensor | None = None) -> np.ndarray:
        """Image scores of vision features [M, T, dim] (``outputs``: the suspect's outputs, if already computed)."""
        return self._channel_scores(self.represent(features, outputs))

    def score_inputs(self, inp: ScanInput, features: torch.Tensor | None, images: Sequence[np.ndarray] | None = None,
                     questions: Sequence[str] | None = None) -> np.ndarray:
        if features is None:
            raise MissingInput(f"{self.name}: needs vision features of the inputs")
        return self.score_features(features)

    def get_state(self) -> dict[str, Any]:
        return {"k": self.k, "reduce": self.reduce, "mode": self.mode, "threshold": self.threshold,
                "channels": ["top-k"] + (["excitation"] if self.direction is not None else []),
                "fpr": self.fpr, "n_probes": None if self.clean_scores is None else len(self.clean_scores)}
