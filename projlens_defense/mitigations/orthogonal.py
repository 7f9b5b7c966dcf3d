"""`orthogonal`: SVD + principal-angle purification against a short benign fine-tune.

A short fine-tune of the reference on the clean samples gives a benign update whose top singular
subspaces stand for "what the task changes". Each of the suspect update's top components whose
left or right singular vector lies far (by principal angle) from the benign subspace is removed.

What it does in practice: it lowers ASR but need not clear it, and it removes components from a benign
update too (the short benign fine-tune spans only part of the task's update), at a cost in clean accuracy.
Measured on the micro zoo (64 samples): badnets ASR 0.92 -> 0.18 with clean 0.86 -> 0.85 (on a build from
another CPU 0.995 -> 0.03 with clean 0.89 -> 0.815), and the benign control
loses components and clean 0.905 -> 0.86 (tests/test_mitigations_behaviour.py); on the default zoo it leaves
targeted-refusal and malicious-injection at ASR 1.00 and costs up to 13 points of clean accuracy
(benchmarks/results/mitigation_table.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from projlens_defense.linalg import svd
from projlens_defense.mitigations.base import CleanData, Mitigation, MitigationResult
from projlens_defense.mitigations.finetune import finetune_module
from projlens_defense.projector import Projector, ProjectorModule


def principal_angle(x: torch.Tensor, basis: torch.Tensor) -> float:
    """Angle in degrees between unit vector ``x`` and the span of orthonormal columns ``basis``."""
    c = float((basis.T @ x).norm().clamp(max=1.0))
    return math.degrees(math.acos(c))


@dataclass(eq=False)
class OrthogonalMitigation(Mitigation):
    """Remove top update components far from a benign update's top subspaces."""

    name = "orthogonal"
    requires_reference = True
    requires_clean = True
    uses_clean = True
    summary = "remove top update directions far (principal angle) from a short benign fine-tune"

    layers: str = "last"
    k: int = 8
    benign_k: int = 8
    max_angle: float = 60.0
    epochs: float = 5.0
    lr: float = 0.005
    batch_size: int = 16
    seed: int = 0

    def apply(self, suspect: Projector, reference: Projector | None = None,
              clean: CleanData | None = None) -> MitigationResult:
        self.check(reference, clean)
        assert reference is not None and clean is not None
        delta = suspect.delta(reference)
        benign = ProjectorModule(reference)
        finetune_module(benign, clean, self.epochs, self.lr, self.batch_size, self.seed)
        bdelta = benign.to_projector().delta(reference)
        layers = [suspect.num_layers - 1] if self.layers == "last" else list(range(suspect.num_layers))
        weights = [layer.weight.clone() for layer in suspect.layers]
        removed = []
        for li in layers:
            u, s, v = svd(delta[li])
            bu, _, bv = svd(bdelta[li])
            bu, bv = bu[:, : self.benign_k], bv[:, : self.benign_k]
            energy = float(s.pow(2).sum())
            for i in range(min(self.k, len(s))):
                au, av = principal_angle(u[:, i], bu), principal_angle(v[:, i], bv)
                if max(au, av) > self.max_angle:
                    weights[li] -= s[i] * torch.outer(u[:, i], v[:, i])
                    removed.append({"layer": suspect.layer_name(li), "component": i, "sigma": round(float(s[i]), 6),
                                    "energy": round(float(s[i] ** 2) / energy, 6), "angle_left": round(au, 2),
                                    "angle_right": round(av, 2)})
        new = suspect.with_weights(weights)
        return self.result(suspect, new, reference, {"removed": removed, "rank": len(removed),
                                                     "energy_removed": round(sum(r["energy"] for r in removed), 6)})
