"""`clp`: data-free Channel Lipschitzness-based Pruning (Zheng et al., ECCV 2022) of the hidden channels.

Each hidden channel of the first layer gets an upper bound of its Lipschitz constant (the norm of its
weight row; with ``path=True`` times the norm of the next layer's column it feeds); channels whose
bound exceeds ``mean + u * std`` of the layer are pruned by zeroing the next layer's column.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from projlens_defense.mitigations.base import CleanData, Mitigation, MitigationInputError, MitigationResult
from projlens_defense.projector import Projector


def prune_channels(proj: Projector, channels: list[int], layer: int = 0) -> Projector:
    """Zero the columns of layer ``layer + 1`` fed by ``channels`` of layer ``layer``."""
    weights = [layer.weight.clone() for layer in proj.layers]
    if channels:
        weights[layer + 1][:, channels] = 0.0
    return proj.with_weights(weights)


@dataclass(eq=False)
class ClpMitigation(Mitigation):
    """Prune first-layer hidden channels with outlying Lipschitz upper bounds (no data, no reference)."""

    name = "clp"
    summary = "data-free channel Lipschitz pruning of the hidden channels"

    u: float = 3.0
    path: bool = False

    def apply(self, suspect: Projector, reference: Projector | None = None,
              clean: CleanData | None = None) -> MitigationResult:
        if suspect.num_layers < 2:
            raise MitigationInputError("clp needs a projector with a hidden layer (at least two Linear layers)")
        w1, w2 = suspect.layers[0].weight.float(), suspect.layers[1].weight.float()
        uclc = w1.norm(dim=1)
        if self.path:
            uclc = uclc * w2.norm(dim=0)
        thr = float(uclc.mean() + self.u * uclc.std())
        pruned = [int(i) for i in torch.nonzero(uclc > thr).flatten()]
        new = prune_channels(suspect, pruned)
        report = {"threshold": round(thr, 6), "pruned_channels": pruned, "n_pruned": len(pruned),
                  "n_channels": int(w1.shape[0]), "uclc": {str(i): round(float(uclc[i]), 6) for i in pruned}}
        return self.result(suspect, new, reference, report)
