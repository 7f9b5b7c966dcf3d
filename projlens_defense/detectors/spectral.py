"""Low-rank structure of the fine-tuning update dW, per projector layer.

ProjLens finding 1: the backdoor lives in a few top singular components of dW. Global spectral
statistics alone do not separate backdoored from benign fine-tunes at scale (DESIGN.md section 2),
so this detector reports scale-free shape statistics (top-k energy, stable and effective rank, the
gap between the first singular values) as evidence and as signals a calibration may weigh. On the
zoo they do not carry the decision: benign fine-tunes of the task have an even more concentrated
last-layer update than backdoored ones (benchmarks/scan_detection.py), so the default calibration
does not combine them.
"""

from __future__ import annotations

import math

import torch

from projlens_defense.detectors.base import Detector, DetectorReport
from projlens_defense.linalg import LOWRANK_MIN_DIM, singular_values
from projlens_defense.scan_input import ScanInput

__all__ = ["SpectralDetector", "spectrum_stats"]


def spectrum_stats(s: torch.Tensor, fro2: float, top_k: int = 5) -> dict[str, float]:
    """Shape statistics of a (possibly truncated) singular spectrum ``s`` of a matrix with ||M||_F^2 = fro2.

    ``top1_energy`` / ``topk_energy``: sigma_1^2 / ||M||_F^2 and sum_{i<=k} sigma_i^2 / ||M||_F^2;
    ``stable_rank``: ||M||_F^2 / sigma_1^2; ``effective_rank``: exp(entropy of sigma^2 / sum),
    over the known values plus the unknown tail spread evenly (exact when ``s`` is complete);
    ``gap12``: sigma_1 / sigma_2.
    """
    s = s.double()
    e = s**2
    fro2 = max(float(fro2), float(e.sum()), 1e-30)
    s1 = float(e[0]) if len(e) else 0.0
    out = {
        "fro_norm": math.sqrt(fro2),
        "sigma1": math.sqrt(s1),
        "top1_energy": s1 / fro2,
        f"top{top_k}_energy": float(e[:top_k].sum()) / fro2,
        "stable_rank": fro2 / max(s1, 1e-30),
        "gap12": float(s[0] / s[1]) if len(s) > 1 and float(s[1]) > 0 else float("inf"),
    }
    p = (e / fro2).clamp_min(0)
    ent = float(-(p[p > 0] * p[p > 0].log()).sum())
    tail = max(0.0, 1.0 - float(p.sum()))
    if tail > 1e-9:  # spread the unseen energy over at most as many values as we saw again
        n_tail = max(1, len(s))
        ent += -tail * math.log(tail / n_tail)
    out["effective_rank"] = math.exp(ent)
    return out


class SpectralDetector(Detector):
    """Per-layer singular spectrum of dW = W_suspect - W_reference.

    Signals (higher = more suspicious): ``<layer>.top1_energy``, ``<layer>.top{k}_energy``,
    ``<layer>.gap12`` and ``<layer>.inv_stable_rank`` for the last layer (the LLM side) and the
    first; the headline score is the last layer's top-1 energy.
    """

    name = "spectral"
    requires_reference = True

    def __init__(self, top_k: int = 5, n_values: int = 8) -> None:
        self.top_k = top_k
        self.n_values = n_values

    def score(self, inp: ScanInput) -> DetectorReport:
        deltas = inp.deltas()
        layers: dict[str, dict[str, float]] = {}
        signals: dict[str, float] = {}
        spectra: dict[str, list[float]] = {}
        for i, dw in enumerate(deltas):
            tag = "last" if i == len(deltas) - 1 else f"l{i + 1}"
            fro2 = float(torch.linalg.vector_norm(dw)) ** 2
            if min(dw.shape) <= LOWRANK_MIN_DIM:  # small layer: the exact full spectrum is cheap
                s = singular_values(dw)
            else:  # large layer: the shared randomized top-k; the effective rank assumes a flat tail
                _, s, _ = inp.svd("delta", i, self.n_values)
            st = spectrum_stats(s, fro2, self.top_k)
            name = inp.projector.layer_name(i)
            layers[name] = st
            spectra[name] = [round(float(x), 6) for x in s[: self.n_values]]
            for key in ("top1_energy", f"top{self.top_k}_energy", "gap12"):
                signals[f"{tag}.{key}"] = st[key]
            signals[f"{tag}.inv_stable_rank"] = 1.0 / st["stable_rank"]
        return DetectorReport(
            name=self.name,
            score=signals["last.top1_energy"],
            signals=signals,
            evidence={"layers": layers, "singular_values": spectra},
        )
