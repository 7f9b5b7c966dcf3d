"""Projector-only training on cached vision features: the one loop the zoo and the attacks share."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .runtime import LlavaRuntime


def train_projector(
    rt: LlavaRuntime,
    features: torch.Tensor,
    questions: Sequence[str],
    answers: Sequence[str],
    *,
    epochs: float,
    lr: float,
    batch_size: int = 32,
    seed: int = 0,
    params: Sequence[nn.Parameter] | None = None,
    projector: nn.Module | None = None,
    desc: str = "train projector",
    progress: bool = True,
) -> list[float]:
    """Fine-tune the projector (or the given `params`) with AdamW; everything else stays frozen.

    Returns the per-step training losses. Deterministic for a seed (shuffling uses its own generator).
    """
    proj = projector if projector is not None else rt.projector
    train_params = list(params) if params is not None else list(proj.parameters())
    for p in rt.model.parameters():
        p.requires_grad_(False)
    for p in train_params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(train_params, lr=lr, weight_decay=0.0)
    n = len(questions)
    steps_per_epoch = max(1, (n + batch_size - 1) // batch_size)
    total = max(1, int(round(epochs * steps_per_epoch)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, total // 10)) * max(0.0, 1 - s / total))
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen)
    pos, losses = 0, []
    rt.model.train()
    try:
        for _ in tqdm(range(total), desc=desc, disable=not progress, leave=False):
            if pos + batch_size > n:
                order, pos = torch.randperm(n, generator=gen), 0
            idx = order[pos : pos + batch_size].tolist()
            pos += batch_size
            batch = rt.encode([questions[i] for i in idx], [answers[i] for i in idx])
            loss = rt.loss(features[idx], batch, projector=proj)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(train_params, 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
    finally:
        rt.model.eval()
        for p in train_params:
            p.requires_grad_(False)
    return losses
