"""`finetune`: plain clean fine-tuning of the projector on the few clean samples (the classic baseline).

A baseline, not a repair: it keeps (often raises) clean accuracy, but a few clean samples do not overwrite a
projector backdoor. Measured: badnets on the micro zoo (64 samples), ASR 0.92 -> 0.78 with clean 0.86 -> 0.92
(tests/test_mitigations_behaviour.py); on the default zoo's 8 variants ASR stays 0.78-1.00
(benchmarks/results/mitigation_table.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from projlens_defense.mitigations.base import CleanData, Mitigation, MitigationResult
from projlens_defense.projector import Projector, ProjectorModule


def finetune_module(module: ProjectorModule, clean: CleanData, epochs: float, lr: float, batch_size: int,
                    seed: int) -> list[float]:
    """Fine-tune ``module`` in place on the clean samples' answers; returns the step losses."""
    from projlens_defense.training import train_projector

    return train_projector(clean.runtime, clean.features, clean.questions, clean.answers, epochs=epochs, lr=lr,
                           batch_size=batch_size, seed=seed, projector=module, progress=False,
                           desc="clean fine-tune")


def clean_loss(module: ProjectorModule, clean: CleanData, batch_size: int = 16) -> float:
    """Mean answer-token loss of the clean samples through ``module``: how well a projector fits the task there."""
    import torch

    rt, n, total = clean.runtime, len(clean), 0.0
    with torch.no_grad():
        for i in range(0, n, batch_size):
            idx = list(range(i, min(n, i + batch_size)))
            batch = rt.encode([clean.questions[j] for j in idx], [clean.answers[j] for j in idx])
            total += float(rt.loss(clean.features[idx], batch, projector=module)) * len(idx)
    return total / n


def loss_report(losses: list[float]) -> dict[str, Any]:
    """Steps and first / last step loss of a fine-tune, as the repairs that fine-tune report them."""
    return {"steps": len(losses), "loss_first": round(losses[0], 5) if losses else None,
            "loss_last": round(losses[-1], 5) if losses else None}


@dataclass(eq=False)
class FinetuneMitigation(Mitigation):
    """AdamW on the clean samples' answers, every projector parameter trainable."""

    name = "finetune"
    requires_clean = True
    uses_clean = True
    summary = "clean fine-tuning on the given samples"

    epochs: float = 10.0
    lr: float = 0.001
    batch_size: int = 16
    seed: int = 0

    def apply(self, suspect: Projector, reference: Projector | None = None,
              clean: CleanData | None = None) -> MitigationResult:
        self.check(reference, clean)
        assert clean is not None
        module = ProjectorModule(suspect)
        losses = finetune_module(module, clean, self.epochs, self.lr, self.batch_size, self.seed)
        report = {"n_clean": len(clean), **loss_report(losses)}
        return self.result(suspect, module.to_projector(), reference, report)
