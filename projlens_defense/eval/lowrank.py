"""Top-k singular components of the fine-tuning update: injection and ablation (ProjLens finding 1).

``inject(k)``: the reference weights plus the top-k components of dW = W_suspect - W_reference;
``ablate(k)``: the suspect weights minus them. Applied to the chosen layers (all by default);
injection keeps the reference biases and the reference weights of unchosen layers, ablation keeps
the suspect's (run them with :class:`~projlens_defense.projector.ProjectorModule`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from projlens_defense.linalg import column_basis, top_singular
from projlens_defense.projector import Projector

__all__ = ["LowRankUpdate", "TaskRemovedUpdate", "resolve_layers"]


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


class TaskRemovedUpdate(LowRankUpdate):
    """dW split into a task part (inside the benign updates' top-``task_rank`` output subspace, per layer)
    and the rest, whose top-k components are injected / ablated."""

    def __init__(self, suspect: Projector, reference: Projector, benign: Sequence[Projector], max_k: int = 8,
                 task_rank: int = 8, layers: str | Sequence[int] = "all", seed: int = 0) -> None:
        self.suspect, self.reference, self.max_k = suspect, reference, max_k
        self.layers = resolve_layers(layers, suspect.num_layers)
        full = suspect.delta(reference)
        bdel = [b.delta(reference) for b in benign]
        self.task: list[torch.Tensor] = []
        self.deltas = []
        for i, dw in enumerate(full):
            u = column_basis([d[i] / d[i].norm().clamp_min(1e-12) for d in bdel], task_rank)
            t = u @ (u.T @ dw)
            self.task.append(t)
            self.deltas.append(dw - t)
        self.svd = {i: top_singular(self.deltas[i], max_k, seed=seed) for i in self.layers}

    def inject(self, k: int) -> Projector:
        ws = [layer.weight.float().clone() for layer in self.reference.layers]
        for i in self.layers:
            ws[i] = ws[i] + self.task[i] + self.top(i, k)
        return self.reference.with_weights(ws)
