"""`channel-restore`: a PSR-style baseline, restoring the projector's most-changed hidden channels to the reference.

PSR (a published post-training projector defense) restores "fragile" channels with a few hundred clean samples.
Its exact channel criterion is not public in a form we could reproduce, so this is our reading of the
description, labelled as such: a hidden channel j (row j of the first layer, its bias, column j of the second) is
ranked by how far its fine-tune change moves the projector's outputs on the clean samples,
``mean_x || W2s[:, j] h_s,j(x) - W2r[:, j] h_r,j(x) ||``; channels are restored in that order, in steps, as long
as the clean accuracy on the samples stays within ``acc_tol`` of the unrepaired projector's.

Measured beside `subspace` in ``benchmarks/threat_table.py`` (nothing tuned on those checkpoints).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from projlens_defense.mitigations.base import CleanData, Mitigation, MitigationInputError, MitigationResult
from projlens_defense.mitigations.fine_prune import few_shot_accuracy, longest_prefix_keeping_accuracy
from projlens_defense.projector import Projector, ProjectorModule


def restore_channels(suspect: Projector, reference: Projector, channels: list[int]) -> Projector:
    """``suspect`` with hidden ``channels`` (first layer's rows and biases, second layer's columns) set back to the
    reference's."""
    w = [layer.weight.clone() for layer in suspect.layers]
    b = [None if layer.bias is None else layer.bias.clone() for layer in suspect.layers]
    if channels:
        idx = torch.tensor(channels)
        w[0][idx] = reference.layers[0].weight[idx].to(w[0].dtype)
        if b[0] is not None and reference.layers[0].bias is not None:
            b[0][idx] = reference.layers[0].bias[idx].to(b[0].dtype)
        w[1][:, idx] = reference.layers[1].weight[:, idx].to(w[1].dtype)
    return suspect.with_weights(w, b)


@dataclass(eq=False)
class ChannelRestoreMitigation(Mitigation):
    """Restore the hidden channels whose update moves clean outputs most, while clean accuracy allows."""

    name = "channel-restore"
    requires_reference = True
    requires_clean = True
    uses_clean = True
    summary = "PSR-style: restore the most-changed hidden channels to the reference while clean accuracy holds"

    step: float = 0.05
    max_fraction: float = 0.9
    acc_tol: float = 0.02

    def apply(self, suspect: Projector, reference: Projector | None = None,
              clean: CleanData | None = None) -> MitigationResult:
        self.check(reference, clean)
        assert reference is not None and clean is not None
        if suspect.num_layers != 2:
            raise MitigationInputError("channel-restore needs a two-layer projector (one hidden layer)")
        suspect.delta(reference)  # shape check with a clear error
        with torch.no_grad():
            hs = ProjectorModule(suspect).hidden(clean.features).reshape(-1, suspect.hidden_dim).float()
            hr = ProjectorModule(reference).hidden(clean.features).reshape(-1, suspect.hidden_dim).float()
            w2s, w2r = suspect.layers[1].weight.float(), reference.layers[1].weight.float()
            # || w2s_j h_s,j - w2r_j h_r,j ||^2 = a^2 |w2s_j|^2 - 2 a b <w2s_j, w2r_j> + b^2 |w2r_j|^2 per sample
            ss, rr, sr = (w2s * w2s).sum(0), (w2r * w2r).sum(0), (w2s * w2r).sum(0)
            move = (hs.pow(2) * ss - 2 * hs * hr * sr + hr.pow(2) * rr).clamp_min(0).sqrt().mean(0)
        order = torch.argsort(move, descending=True).tolist()
        base_acc = few_shot_accuracy(clean, ProjectorModule(suspect))
        restored = longest_prefix_keeping_accuracy(clean, order, lambda ch: restore_channels(suspect, reference, ch),
                                                   base_acc, self.step, self.max_fraction, self.acc_tol)
        report = {"n_restored": len(restored), "n_channels": suspect.hidden_dim, "restored_channels": sorted(restored),
                  "few_shot_accuracy_before": round(base_acc, 4), "criterion": "clean-output movement (PSR-style)"}
        return self.result(suspect, restore_channels(suspect, reference, restored), reference, report)
