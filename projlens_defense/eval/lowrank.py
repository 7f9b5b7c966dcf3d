"""Top-k singular components of the fine-tuning update: injection and ablation (ProjLens finding 1).

``inject(k)``: the reference weights plus the top-k components of dW = W_suspect - W_reference;
``ablate(k)``: the suspect weights minus them. Applied to the chosen layers (all by default);
injection keeps the reference biases and the reference weights of unchosen layers, ablation keeps
the suspect's. :class:`ProjectorModule` turns a :class:`~projlens_defense.projector.Projector`
view into an ``nn.Module`` that a runtime can run in place of the model's own projector.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from projlens_defense.detectors.base import top_singular
from projlens_defense.projector import Projector

__all__ = ["LowRankUpdate", "ProjectorModule", "resolve_layers"]


class ProjectorModule(nn.Module):
    """An ``nn.Module`` computing a :class:`Projector` view's forward (float32, no parameters)."""

    def __init__(self, projector: Projector) -> None:
        super().__init__()
        self.view = projector

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.view.forward(x.float()).to(x.dtype)


def resolve_layers(layers: str | Sequence[int], num_layers: int) -> list[int]:
    """``"all"``, ``"first"``, ``"last"`` or explicit indices -> sorted layer indices."""
    if isinstance(layers, str):
        if layers == "all":
            return list(range(num_layers))
        if layers == "last":
            return [num_layers - 1]
        if layers == "first":
            return [0]
        raise ValueError(f"layers must be all, first, last or indices, got {layers!r}")
    out = sorted({i % num_layers for i in layers})
    if not out:
        raise ValueError("no layers selected")
    return out


class LowRankUpdate:
    """The update of ``suspect`` over ``reference``, split into its top ``max_k`` singular components per layer."""

    def __init__(self, suspect: Projector, reference: Projector, max_k: int = 8, layers: str | Sequence[int] = "all",
                 seed: int = 0) -> None:
        self.suspect = suspect
        self.reference = reference
        self.deltas = suspect.delta(reference)
        self.layers = resolve_layers(layers, suspect.num_layers)
        self.max_k = max_k
        self.svd = {i: top_singular(self.deltas[i], max_k, seed=seed) for i in self.layers}

    def singular_values(self, i: int) -> torch.Tensor:
        return self.svd[i][1]

    def top(self, i: int, k: int) -> torch.Tensor:
        """Rank-``k`` part of layer ``i``'s dW (zeros for k <= 0)."""
        u, s, v = self.svd[i]
        k = min(k, s.shape[0])
        if k <= 0:
            return torch.zeros_like(self.deltas[i])
        return (u[:, :k] * s[:k]) @ v[:, :k].T

    def inject(self, k: int) -> Projector:
        """Reference weights + the top-``k`` components of dW on the chosen layers."""
        ws = [layer.weight.float().clone() for layer in self.reference.layers]
        for i in self.layers:
            ws[i] = ws[i] + self.top(i, k)
        return self.reference.with_weights(ws)

    def ablate(self, k: int) -> Projector:
        """Suspect weights - the top-``k`` components of dW on the chosen layers."""
        ws = [layer.weight.float().clone() for layer in self.suspect.layers]
        for i in self.layers:
            ws[i] = ws[i] - self.top(i, k)
        return self.suspect.with_weights(ws)
