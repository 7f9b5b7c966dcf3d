"""Adaptive attacks: a poisoning fine-tune by an attacker who knows how the scan and the repairs look.

Three strategies, each a penalty (or a stage) added to the attack's own training loop:

* ``spread``: keep the update's spectrum inside the benign range. The attacker first makes one benign fine-tune
  with the same recipe, measures its per-layer top-1 and top-``k`` energy shares, and penalises the poisoned
  update's shares above them (the spectral statistics and the low-rank picture the repairs rely on).
* ``hide-target``: keep the target's tokens out of the logit-lens reading of the update. The lens reads the
  last layer's dW through a linear map R (vocabulary x hidden, the scan's own reading of this model); the penalty
  is the target tokens' energy in ``R @ dW`` relative to the average word token's, so no direction of the
  update's column space reads as the target more than an ordinary word does.
* ``mimic``: bury the backdoor under a benign update. A benign fine-tune at ``benign_scale`` x the learning rate
  comes first, the poisoning fine-tune continues from it: the update's top directions are the task's.

Each is measured in ``benchmarks/threat_table.py``; nothing in the defense was tuned on these checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

ADAPTIVE_KINDS = ("spread", "hide-target", "mimic")

Penalty = Callable[[nn.Module], torch.Tensor]


@dataclass
class Adaptive:
    """An attacker's adaptation: ``kind`` (see the module docstring), the penalty ``weight``, ``top_k`` (the
    energy share the spread penalty bounds besides the top-1) and ``benign_scale`` (mimic's learning-rate factor)."""

    kind: str
    weight: float = 10.0
    top_k: int = 4
    benign_scale: float = 3.0

    def __post_init__(self) -> None:
        if self.kind not in ADAPTIVE_KINDS:
            raise ValueError(f"unknown adaptive attack {self.kind!r} ({', '.join(ADAPTIVE_KINDS)})")

    def params(self) -> dict:
        return asdict(self)


def layer_weights(projector: nn.Module) -> list[torch.Tensor]:
    """The projector's weight matrices (its 2-D parameters, input layer first)."""
    return [p for _, p in projector.named_parameters() if p.ndim == 2]


def energy_shares(delta: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-1, top-``k``) shares of ``delta``'s squared singular values; differentiable."""
    s2 = torch.linalg.svdvals(delta).pow(2)
    total = s2.sum().clamp_min(1e-20)
    return s2[0] / total, s2[:k].sum() / total


def spread_penalty(reference: Sequence[torch.Tensor], benign: Sequence[torch.Tensor], k: int,
                   weight: float) -> Penalty:
    """Penalise each layer's top-1 / top-``k`` energy share above the benign update's (``benign`` - ``reference``)."""
    bounds = []
    for ref, ben in zip(reference, benign, strict=True):
        b1, bk = energy_shares((ben - ref).float(), k)
        bounds.append((float(b1), float(bk)))
    refs = [r.detach().clone() for r in reference]

    def penalty(projector: nn.Module) -> torch.Tensor:
        out = torch.zeros(())
        for w, ref, (b1, bk) in zip(layer_weights(projector), refs, bounds, strict=True):
            delta = w - ref
            if float(delta.detach().norm()) < 1e-8:  # the first step: no spectrum yet
                continue
            s1, sk = energy_shares(delta, k)
            out = out + torch.relu(s1 - b1).pow(2) + torch.relu(sk - bk).pow(2)
        return weight * out

    penalty.bounds = bounds  # type: ignore[attr-defined]
    return penalty


def hide_target_penalty(reference_last: torch.Tensor, reading: torch.Tensor, word_mask: torch.Tensor,
                        target_ids: Sequence[int], weight: float) -> Penalty:
    """Penalise the target tokens' share of the lens reading of the last layer's update above an average word's.

    ``reading`` [V, hidden]: the lens map (token scores of each unit hidden direction); ``word_mask`` [V]: the
    tokens the lens z-scores over; ``target_ids``: the target text's word tokens.
    """
    ids = torch.tensor(sorted({int(t) for t in target_ids if 0 <= int(t) < reading.shape[0]
                               and bool(word_mask[int(t)])}), dtype=torch.long)
    if not len(ids):
        raise ValueError("the target text has no word token the lens reads")
    words = reading[word_mask].detach()
    targets = reading[ids].detach()
    ref = reference_last.detach().clone()

    def penalty(projector: nn.Module) -> torch.Tensor:
        delta = layer_weights(projector)[-1] - ref
        if float(delta.detach().norm()) < 1e-8:
            return torch.zeros(())
        on_words = words @ delta
        centre = on_words.mean(0, keepdim=True)
        word_energy = (on_words - centre).pow(2).sum(1).mean().clamp_min(1e-20)
        target_energy = (targets @ delta - centre).pow(2).sum(1).mean()
        return weight * torch.relu(target_energy / word_energy - 1.0)

    return penalty


BENIGN_SEED_OFFSET = 7919
"""The attacker's own benign fine-tune (spread's measurement, mimic's first stage) uses seed + this."""


def prepare_adaptive(adaptive: Adaptive, rt, model_path, clean_features: torch.Tensor, questions: Sequence[str],
                     answers: Sequence[str], target: str, *, epochs: float, lr: float, batch_size: int, seed: int,
                     progress: bool = True) -> tuple[Penalty | None, dict]:
    """Run what ``adaptive`` needs before the poisoning fine-tune; returns (penalty for it, a record of what was done).

    ``spread`` trains a benign copy of the projector to measure the benign spectrum; ``mimic`` trains the
    runtime's own projector benignly at ``benign_scale`` x ``lr`` (the poisoning fine-tune then continues from
    it); ``hide-target`` reads the reference model's lens map (the scan's reading).
    """
    import copy

    from ..training import train_projector

    recipe = {"epochs": epochs, "batch_size": batch_size, "seed": seed + BENIGN_SEED_OFFSET, "progress": progress}
    reference = [w.detach().clone() for w in layer_weights(rt.projector)]
    if adaptive.kind == "spread":
        benign = copy.deepcopy(rt.projector)
        train_projector(rt, clean_features, questions, answers, lr=lr, projector=benign,
                        desc="attacker's benign fine-tune (spread)", **recipe)
        pen = spread_penalty(reference, layer_weights(benign), adaptive.top_k, adaptive.weight)
        return pen, {"benign_shares": [list(b) for b in pen.bounds]}  # type: ignore[attr-defined]
    if adaptive.kind == "mimic":
        train_projector(rt, clean_features, questions, answers, lr=lr * adaptive.benign_scale,
                        desc="attacker's benign stage (mimic)", **recipe)
        moved = [float((w - r).norm()) for w, r in zip(layer_weights(rt.projector), reference, strict=True)]
        return None, {"benign_stage_update_norms": moved}
    reading, mask = lens_map(model_path)
    ids = rt.tokenizer(target, add_special_tokens=False)["input_ids"]
    pen = hide_target_penalty(reference[-1], reading, mask, ids, adaptive.weight)
    return pen, {"target_token_ids": sorted({int(i) for i in ids})}


def lens_map(model_path) -> tuple[torch.Tensor, torch.Tensor]:
    """(R [V, hidden], word mask [V]): the scan's default lens reading of every unit direction of the model at
    ``model_path`` (R @ w is the raw token score of direction w; linear in w)."""
    from ..detectors.loading import load_checkpoint
    from ..lens import lens_reading
    from ..scan_input import ScanInput

    ck = load_checkpoint(model_path)
    if not ck.has_readout:
        raise ValueError(f"{model_path}: no LLM read-out in the checkpoint, nothing to hide the target from")
    inp = ScanInput(projector=ck.projector, readout=ck.readout, ov_layers=ck.ov_layers, final_norm=ck.final_norm,
                    vocab=ck.vocab)
    hidden = ck.projector.out_dim
    reading = lens_reading(inp, torch.eye(hidden), [f"e{i}" for i in range(hidden)])
    return reading.raw[:, 0 : 2 * hidden : 2].clone(), reading.mask
