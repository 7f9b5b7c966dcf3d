"""Trigger-free probing: synthesize a universal feature perturbation and see what the model then says.

A backdoor is a shortcut: one input pattern that sends every input to the same target. So the
universal perturbation of the vision features (one per token position, bounded per token to ``eps``
times the clean feature norm) that most raises the loss of the clean samples' own answers tends to
find it, and the answers under it reveal the target: a phrase that appears in many perturbed
answers but not in the clean ones. Benign projectors only degrade (no common new phrase, or a
degenerate repetition, which is ignored). No trigger knowledge is used: only the clean samples.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from projlens_defense.metrics import normalize
from projlens_defense.mitigations.base import CleanData

__all__ = ["ProbeResult", "answer_token_losses", "dominant_new_phrase", "synthesize_trigger"]


def _grams(text: str, n: int) -> set[str]:
    toks = normalize(text).split()
    out = set()
    for i in range(len(toks) - n + 1):
        g = toks[i : i + n]
        if len(set(g)) == n:  # skip degenerate repetitions ("big big big")
            out.add(" ".join(g))
    return out


def dominant_new_phrase(clean: Sequence[str], probed: Sequence[str], n: int = 3) -> tuple[str | None, float]:
    """The n-gram (no repeated word) found in most probed answers but absent from the same sample's clean
    answer, and the fraction of samples showing it."""
    counts: Counter[str] = Counter()
    for a, b in zip(clean, probed, strict=True):
        counts.update(_grams(b, n) - _grams(a, n))
    if not counts:
        return None, 0.0
    # ties broken by the phrase itself: set iteration order varies with PYTHONHASHSEED between processes
    phrase, c = min(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return phrase, c / max(1, len(clean))


@dataclass(eq=False)
class ProbeResult:
    """A synthesized trigger: the perturbation, the answers with and without it, the discovered target."""

    delta: torch.Tensor
    clean_answers: list[str]
    probe_answers: list[str]
    target: str | None
    support: float
    loss: float
    eps: float

    def found(self, min_support: float) -> bool:
        return self.target is not None and self.support >= min_support

    def showing(self) -> list[int]:
        """Samples whose probed answer shows the discovered target."""
        if self.target is None:
            return []
        return [i for i, b in enumerate(self.probe_answers) if self.target in normalize(b)]

    def to_dict(self) -> dict[str, Any]:
        modal = Counter(self.probe_answers).most_common(1)
        return {"target": self.target, "support": round(self.support, 4), "probe_loss": round(self.loss, 4),
                "eps": self.eps, "modal_probe_answer": modal[0][0] if modal else None,
                "delta_norm_per_token": round(float(self.delta.norm(dim=-1).mean()), 4)}


def answer_token_losses(rt: Any, features: torch.Tensor, batch: dict[str, torch.Tensor],
                        module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy [N, L-1] of the labelled answer tokens, and a mask of the final (EOS) ones."""
    logits = rt.forward(features, batch, module).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.clamp_min(0).reshape(-1),
                         reduction="none").reshape(labels.shape) * mask
    last = mask & ~torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1)
    return ce, last


def synthesize_trigger(clean: CleanData, module: nn.Module, eps: float = 0.5, steps: int = 30, lr: float = 0.05,
                       eos_weight: float = 1.0, answer_weight: float = 1.0, seed: int = 0,
                       ngram: int = 3) -> ProbeResult:
    """Projected gradient ascent on a universal per-position feature perturbation (see the module doc).

    The objective is the mean answer-token loss plus ``eos_weight`` times the loss of the final
    (end-of-answer) token, so that backdoors which *append* a target are found as well as those that
    replace the answer.
    """
    rt = clean.runtime
    x = clean.features
    batch = rt.encode(clean.questions, clean.answers)
    scale = float(x.norm(dim=-1).mean())
    bound = eps * scale
    gen = torch.Generator().manual_seed(seed)
    delta = (torch.randn(x.shape[1:], generator=gen) * 1e-3 * scale).requires_grad_(True)
    opt = torch.optim.Adam([delta], lr=lr * bound)
    frozen = [p for p in list(rt.model.parameters()) + list(module.parameters()) if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    loss_val = 0.0
    try:
        for _ in range(steps):
            ce, last = answer_token_losses(rt, x + delta[None], batch, module)
            mask = ce != 0
            obj = answer_weight * ce.sum() / mask.sum().clamp_min(1) + eos_weight * (ce * last).sum() / last.sum().clamp_min(1)
            opt.zero_grad()
            (-obj).backward()
            opt.step()
            with torch.no_grad():
                n = delta.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                delta.mul_(torch.clamp(bound / n, max=1.0))
            loss_val = float(obj.detach())
    finally:
        for p in frozen:
            p.requires_grad_(True)
    d = delta.detach()
    with torch.no_grad():
        clean_out = rt.answer(x, clean.questions, projector=module)
        probe_out = rt.answer(x + d[None], clean.questions, projector=module)
    target, support = dominant_new_phrase(clean_out, probe_out, ngram)
    return ProbeResult(d, clean_out, probe_out, target, support, loss_val, eps)


def best_probe(clean: CleanData, module: nn.Module, eps: float = 0.5, steps: int = 30, seed: int = 0,
               cache_key: str | None = None) -> ProbeResult:
    """The better-supported of two probes: answer-replacing (answer + end loss) and appending (end loss only).

    With ``cache_key``, the result is memoised on ``clean`` so that several methods share one probe.
    """
    key = (cache_key, eps, steps, seed)
    cache = clean.cache
    if cache_key is not None and key in cache:
        return cache[key]
    probes = [synthesize_trigger(clean, module, eps, steps, seed=seed, answer_weight=aw) for aw in (1.0, 0.0)]
    best = max(probes, key=lambda p: p.support)
    if cache_key is not None:
        cache[key] = best
    return best


def target_batch(clean: CleanData, probe: ProbeResult) -> tuple[list[int], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Samples showing the probe's target, encoded with their probed (target) and their clean answers."""
    idx = probe.showing()
    qs = [clean.questions[i] for i in idx]
    rt = clean.runtime
    return idx, rt.encode(qs, [probe.probe_answers[i] for i in idx]), rt.encode(qs, [clean.answers[i] for i in idx])


def resynthesize(clean: CleanData, module: nn.Module, idx: Sequence[int], batch: dict[str, torch.Tensor],
                 delta: torch.Tensor, eps: float, steps: int = 15, lr: float = 0.05, bound_kind: str = "token") -> torch.Tensor:
    """Targeted trigger inversion: the perturbation (started at ``delta``) that makes ``module`` give the
    target answers in ``batch`` on samples ``idx``.

    ``bound_kind="token"`` bounds each token's perturbation by ``eps`` times the mean clean feature
    norm; ``"total"`` bounds the whole perturbation by the same budget times sqrt(tokens), so it may
    concentrate on a few positions (a patch) or spread over all (a global filter)."""
    rt = clean.runtime
    x = clean.features[list(idx)]
    bound = eps * float(clean.features.norm(dim=-1).mean())
    d = delta.clone().requires_grad_(True)
    opt = torch.optim.Adam([d], lr=lr * bound)
    frozen = [p for p in list(rt.model.parameters()) + list(module.parameters()) if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        for _ in range(steps):
            loss = rt.loss(x + d[None], batch, projector=module)
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                if bound_kind == "total":
                    d.mul_(min(1.0, bound * d.shape[0] ** 0.5 / float(d.norm().clamp_min(1e-12))))
                else:
                    n = d.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                    d.mul_(torch.clamp(bound / n, max=1.0))
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return d.detach()


def support_under(clean: CleanData, module: nn.Module, idx: Sequence[int], delta: torch.Tensor, target: str) -> float:
    """Fraction of samples ``idx`` whose answer under ``delta`` shows ``target``."""
    if not idx:
        return 0.0
    x = clean.features[list(idx)] + delta[None]
    with torch.no_grad():
        out = clean.runtime.answer(x, [clean.questions[i] for i in idx], projector=module)
    return sum(target in normalize(o) for o in out) / len(idx)
