"""`fine-prune`: Fine-Pruning (Liu et al., RAID 2018) on the projector's hidden channels.

Hidden channels (the first layer's outputs, after the activation) are pruned in increasing order of
their mean activation on the clean samples, as long as the clean accuracy on those samples stays
within ``acc_tol`` of the unpruned projector; the pruned projector is then fine-tuned on the same
samples with the pruned channels held at zero.

Measured on the micro zoo (64 samples): badnets ASR 0.92 -> 0.04 with clean 0.86 -> 0.90, 66 of 128 channels
pruned (tests/test_mitigations_behaviour.py); on a micro zoo built on another CPU ASR 0.995 -> 0.27 (in
process) and 0.915 (the CLI's sample draw) with clean kept: it need not clear a backdoor; on the default zoo
it leaves blended at ASR 0.50 and costs 2.5-6.8 points of clean accuracy (benchmarks/results/mitigation_table.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from projlens_defense.metrics import clean_accuracy
from projlens_defense.mitigations.base import (
    CleanData,
    Mitigation,
    MitigationInputError,
    MitigationResult,
)
from projlens_defense.mitigations.clp import prune_channels
from projlens_defense.mitigations.finetune import finetune_module
from projlens_defense.projector import Projector, ProjectorModule


def few_shot_accuracy(clean: CleanData, module: torch.nn.Module) -> float:
    """Clean accuracy of ``module`` on the clean samples themselves (greedy answers)."""
    out = clean.runtime.answer(clean.features, clean.questions, projector=module)
    return clean_accuracy(out, clean.answers)


def longest_prefix_keeping_accuracy(clean: CleanData, order: list[int], edit: Callable[[list[int]], Projector],
                                    base_acc: float, step: float, max_fraction: float, acc_tol: float) -> list[int]:
    """The longest prefix of ``order`` (grown in steps of ``step`` x its length, up to ``max_fraction``) whose
    ``edit`` keeps the accuracy on the clean samples within ``acc_tol`` of ``base_acc``."""
    n = len(order)
    chosen: list[int] = []
    k, stride = 0, max(1, round(step * n))
    while k + stride <= round(max_fraction * n):
        trial = order[: k + stride]
        if few_shot_accuracy(clean, ProjectorModule(edit(trial))) < base_acc - acc_tol:
            break
        k += stride
        chosen = trial
    return chosen


@dataclass(eq=False)
class FinePruneMitigation(Mitigation):
    """Prune dormant hidden channels until clean accuracy drops, then fine-tune."""

    name = "fine-prune"
    requires_clean = True
    uses_clean = True
    summary = "prune hidden channels dormant on clean data, then clean fine-tuning"

    step: float = 0.05
    max_fraction: float = 0.9
    acc_tol: float = 0.04
    epochs: float = 5.0
    lr: float = 0.001
    batch_size: int = 16
    seed: int = 0

    def apply(self, suspect: Projector, reference: Projector | None = None,
              clean: CleanData | None = None) -> MitigationResult:
        self.check(reference, clean)
        assert clean is not None
        if suspect.num_layers < 2:
            raise MitigationInputError("fine-prune needs a projector with a hidden layer")
        with torch.no_grad():
            act = ProjectorModule(suspect).hidden(clean.features).reshape(-1, suspect.hidden_dim).mean(0)
        order = torch.argsort(act).tolist()
        n = suspect.hidden_dim
        base_acc = few_shot_accuracy(clean, ProjectorModule(suspect))
        pruned = longest_prefix_keeping_accuracy(clean, order, lambda ch: prune_channels(suspect, ch), base_acc,
                                                 self.step, self.max_fraction, self.acc_tol)
        module = ProjectorModule(prune_channels(suspect, pruned))
        if pruned:
            idx = torch.tensor(pruned)
            module.weights[1].register_hook(lambda g: g.index_fill(1, idx, 0.0))
        losses = finetune_module(module, clean, self.epochs, self.lr, self.batch_size, self.seed)
        with torch.no_grad():
            if pruned:
                module.weights[1][:, pruned] = 0.0
        report = {"n_pruned": len(pruned), "n_channels": n, "pruned_channels": sorted(pruned),
                  "few_shot_accuracy_before": round(base_acc, 4), "finetune_steps": len(losses)}
        return self.result(suspect, module.to_projector(), reference, report)
