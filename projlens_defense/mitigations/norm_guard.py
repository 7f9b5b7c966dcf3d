"""`norm-guard`: a run-time guard that keeps the projector inside the range clean inputs use.

ProjLens finding 2: the backdoor shift grows with the input norm and triggered inputs sit at its
high end; in small models the gate is carried by a few directions instead. The guard wraps the
projector and, per image token,

* rescales a vision feature whose norm exceeds the clean maximum (times ``1 + margin``), and
* clamps the coefficients of the hidden activation along the update's top-``k`` input directions
  (right singular vectors of the last layer's dW; of W itself without a reference) to the clean
  range ``[q, 1 - q]`` quantiles, widened by ``margin``, correcting the output through the update.

It changes nothing inside the clean range, so clean answers stay as they were. The ranges come
from the clean samples: the guard needs them (it is not data-free) and is not a weight edit: the
result is an ``nn.Module`` to run in place of the projector, not a checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from projlens_defense.linalg import svd
from projlens_defense.mitigations.base import CleanData, Mitigation, MitigationResult
from projlens_defense.projector import Projector, ProjectorModule


class NormGuard(nn.Module):
    """Wraps a projector; bounds the input norm and the hidden coefficients along ``directions``."""

    def __init__(self, inner: ProjectorModule, max_norm: float | None, directions: torch.Tensor | None,
                 gains: torch.Tensor | None, lo: torch.Tensor | None, hi: torch.Tensor | None) -> None:
        super().__init__()
        self.inner = inner
        self.max_norm = max_norm
        self.register_buffer("directions", directions)  # [hidden, k] right singular vectors
        self.register_buffer("gains", gains)  # [out, k] = U * S: the update's output per unit coefficient
        self.register_buffer("lo", lo)
        self.register_buffer("hi", hi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.max_norm is not None:
            n = x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            x = x * torch.clamp(self.max_norm / n, max=1.0)
        if self.directions is None:
            return self.inner(x)
        h = self.inner.hidden(x)
        last = self.inner._layers()[-1]
        y = F.linear(h, last.weight, last.bias)
        c = h @ self.directions
        excess = c - torch.maximum(torch.minimum(c, self.hi), self.lo)
        return y - excess @ self.gains.T


@dataclass(eq=False)
class NormGuardMitigation(Mitigation):
    """Fit the clean ranges on the clean samples; return the guarded projector as a module."""

    name = "norm-guard"
    requires_clean = True
    uses_clean = True
    run_time_only = True
    summary = "run-time guard bounding input norm and update-direction shifts to the clean range"

    mode: str = "both"
    k: int = 8
    q: float = 0.001
    margin: float = 0.1

    def apply(self, suspect: Projector, reference: Projector | None = None,
              clean: CleanData | None = None) -> MitigationResult:
        self.check(reference, clean)
        assert clean is not None
        inner = ProjectorModule(suspect).eval()
        for q in inner.parameters():
            q.requires_grad_(False)
        x = clean.features.reshape(-1, clean.features.shape[-1])
        report: dict[str, Any] = {"n_clean": len(clean), "n_tokens": int(x.shape[0])}
        max_norm = None
        if self.mode in ("both", "norm"):
            max_norm = float(x.norm(dim=-1).max()) * (1 + self.margin)
            report["max_input_norm"] = round(max_norm, 4)
        dirs = gains = lo = hi = None
        if self.mode in ("both", "direction") and suspect.num_layers >= 2:
            w = suspect.layers[-1].weight.float()
            upd = w - reference.layers[-1].weight.float() if reference is not None else w
            u, s, v = svd(upd)
            k = min(self.k, len(s))
            dirs, gains = v[:, :k].contiguous(), (u[:, :k] * s[:k]).contiguous()
            with torch.no_grad():
                c = inner.hidden(x) @ dirs
            qlo, qhi = torch.quantile(c, self.q, dim=0), torch.quantile(c, 1 - self.q, dim=0)
            width = (qhi - qlo).clamp_min(1e-6)
            lo, hi = qlo - self.margin * width, qhi + self.margin * width
            report["directions"] = {"k": k, "of": "update" if reference is not None else "weight",
                                    "ranges": [[round(float(a), 4), round(float(b), 4)] for a, b in zip(lo, hi, strict=True)]}
        guard = NormGuard(inner, max_norm, dirs, gains, lo, hi).eval()
        report["note"] = "run-time wrapper: not a weight edit; use it in place of the projector module"
        return self.result(suspect, None, reference, report, module=guard)
