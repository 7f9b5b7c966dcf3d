"""Projector-only training on cached vision features: the one loop the zoo, the attacks and the mitigations share.

Two paths, one recipe:

* **single process** (the default, CPU): a plain PyTorch loop, bit-identical for a seed.
* **🤗 Accelerate** when launched by ``accelerate launch`` (or ``torchrun``; detected from the launcher's
  environment, see :func:`accelerate_requested`): the training module (the LLaVA model with the
  projector being trained), optimizer, batch loader and scheduler go through ``Accelerator.prepare``,
  so multi-GPU / multi-CPU DDP, DeepSpeed and FSDP come from accelerate's own config. The recipe
  does not change with the number of processes: ``batch_size`` is the *global* batch, split across
  processes (``split_batches=True``); the step count, batch order and LR schedule are the
  single-process ones; each slice's loss is weighted by its share of the batch's answer tokens, so
  the averaged gradient is the global batch's; gradients are clipped with ``accelerator.clip_grad_norm_``.
  After training the full weights are gathered (``get_state_dict``) back into the unwrapped model on
  CPU, so the caller saves and evaluates as before; only the main process writes (:func:`is_main_process`).
  With one process the result is bit-identical to the plain path; with two CPU processes it matches to
  float round-off (tests/test_accelerate.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .runtime import LlavaRuntime

ENV_FLAG = "PROJLENS_ACCELERATE"
"""Environment override: ``1`` forces the Accelerate path (e.g. one GPU without a launcher), ``0`` disables it."""

_ACCELERATOR: Any = None


def accelerate_requested() -> bool:
    """True when fine-tuning goes through Accelerate: :data:`ENV_FLAG` if set, else launched by
    ``accelerate launch`` (which exports ``ACCELERATE_MIXED_PRECISION``) or by any launcher with ``WORLD_SIZE > 1``."""
    flag = os.environ.get(ENV_FLAG, "").strip().lower()
    if flag:
        return flag not in ("0", "false", "no", "off")
    try:
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    except ValueError:
        world = 1
    return "ACCELERATE_MIXED_PRECISION" in os.environ or world > 1


def get_accelerator() -> Any:
    """The process's one ``accelerate.Accelerator`` (created on first use, from the launcher's config)."""
    global _ACCELERATOR
    if _ACCELERATOR is None:
        from accelerate import Accelerator
        from accelerate.utils import DataLoaderConfiguration

        from .errors import UsageError

        acc = Accelerator(dataloader_config=DataLoaderConfiguration(split_batches=True))
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if world > acc.num_processes:  # e.g. `--multi_gpu` without GPUs: every process would train and write alone
            raise UsageError(f"launched {world} processes but Accelerate runs them as {acc.num_processes} "
                             "(no GPU? for CPU processes set ACCELERATE_USE_CPU=1)")
        _ACCELERATOR = acc
    return _ACCELERATOR


def is_main_process() -> bool:
    """Whether this process writes outputs (always, unless running under Accelerate on a non-main rank)."""
    return not accelerate_requested() or bool(get_accelerator().is_main_process)


def distributed_info() -> dict[str, Any] | None:
    """Provenance of an Accelerate run (processes, distributed type, precision, device); None for the plain path."""
    if not accelerate_requested():
        return None
    acc = get_accelerator()
    return {"launcher": "accelerate", "num_processes": acc.num_processes, "distributed_type": getattr(acc.distributed_type, "value", str(acc.distributed_type)),
            "mixed_precision": str(acc.mixed_precision), "device": str(acc.device)}


def _batches(n: int, batch_size: int, total: int, seed: int) -> Iterator[list[int]]:
    """The training batch order: a seeded permutation walked in full batches, reshuffled when it runs out."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen)
    pos = 0
    for _ in range(total):
        if pos + batch_size > n:
            order, pos = torch.randperm(n, generator=gen), 0
        yield order[pos : pos + batch_size].tolist()
        pos += batch_size


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
    accelerate: bool | None = None,
    penalty: Callable[[nn.Module], torch.Tensor] | None = None,
) -> list[float]:
    """Fine-tune the projector (or the given `params`) with AdamW; everything else stays frozen.

    Returns the per-step training losses (under Accelerate: averaged over processes). Deterministic for a
    seed (shuffling uses its own generator). ``accelerate``: None = :func:`accelerate_requested`.
    ``penalty``: a term of the projector added to each step's loss (adaptive attacks; single-process only).
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
    batches = _batches(n, batch_size, total, seed)
    if accelerate if accelerate is not None else accelerate_requested():
        if penalty is not None:
            from .errors import UsageError

            raise UsageError("a training penalty (adaptive attack) runs in a single process, not under Accelerate")
        return _train_accelerate(rt, proj, train_params, opt, sched, features, questions, answers, list(batches),
                                 desc, progress)
    losses = []
    rt.model.train()
    try:
        for idx in tqdm(batches, total=total, desc=desc, disable=not progress, leave=False):
            batch = rt.encode([questions[i] for i in idx], [answers[i] for i in idx])
            loss = rt.loss(features[idx], batch, projector=proj)
            opt.zero_grad(set_to_none=True)
            (loss + penalty(proj) if penalty is not None else loss).backward()
            torch.nn.utils.clip_grad_norm_(train_params, 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
    finally:
        rt.model.eval()
        for p in train_params:
            p.requires_grad_(False)
    return losses


# ----------------------------------------------------------------------------- the Accelerate path
class ProjectorLoss(nn.Module):
    """The module Accelerate wraps: the LLaVA model (frozen but for the projector) and, if the projector
    being trained is not the model's own, that projector. ``forward`` returns the answer-token loss,
    computed only through this module's own submodules (so DDP/FSDP/DeepSpeed wrappers see the whole pass)."""

    def __init__(self, rt: LlavaRuntime, projector: nn.Module) -> None:
        super().__init__()
        self.model = rt.model
        self.image_token_id = rt.image_token_id
        own = rt.projector
        base = projector.get_base_model() if hasattr(projector, "get_base_model") else None  # peft wraps in place
        self.projector = None if projector is own or base is own else projector

    def forward(self, features: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
        proj = self.projector if self.projector is not None else self.model.model.multi_modal_projector
        emb = self.model.get_input_embeddings()(input_ids)
        img = proj(features.to(emb.dtype))
        mask = (input_ids == self.image_token_id).unsqueeze(-1)
        embeds = emb.masked_scatter(mask.expand_as(emb), img.reshape(-1, img.shape[-1]).to(emb.dtype))
        return self.model(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels).loss


class _FixedBatches(torch.utils.data.Sampler):
    """A batch sampler replaying a precomputed batch order (Accelerate splits each batch across processes)."""

    def __init__(self, batches: list[list[int]]) -> None:
        self.batches = batches
        self.batch_size = len(batches[0]) if batches else 1

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class _Indices(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def _train_accelerate(rt: LlavaRuntime, proj: nn.Module, train_params: list[nn.Parameter], opt: torch.optim.Optimizer,
                      sched: Any, features: torch.Tensor, questions: Sequence[str], answers: Sequence[str],
                      batches: list[list[int]], desc: str, progress: bool) -> list[float]:
    """The training loop through ``Accelerator.prepare`` (see the module docstring)."""
    from accelerate.utils import DistributedType

    from .errors import UsageError

    acc = get_accelerator()
    if batches and len(batches[0]) > 1 and len(batches[0]) % acc.num_processes:
        raise UsageError(f"batch size {len(batches[0])} must be a multiple of the {acc.num_processes} processes "
                         "(each process takes an equal slice of every batch)")
    loader = torch.utils.data.DataLoader(_Indices(len(questions)), batch_sampler=_FixedBatches(batches))
    module, opt, loader, sched = acc.prepare(ProjectorLoss(rt, proj), opt, loader, sched)
    clip = (lambda: module.parameters()) if acc.distributed_type == DistributedType.FSDP else (lambda: train_params)
    losses: list[float] = []
    module.train()
    try:
        for idx in tqdm(loader, desc=desc, disable=not (progress and acc.is_local_main_process), leave=False):
            idx = idx.tolist()
            batch = rt.encode([questions[i] for i in idx], [answers[i] for i in idx])
            batch = {k: v.to(acc.device) for k, v in batch.items()}
            loss = module(features[idx].to(acc.device), **batch)
            if acc.num_processes > 1:  # weight each slice by its answer tokens: the global batch's token mean
                n_tok = (batch["labels"][:, 1:] != -100).sum().float()
                total_tok = acc.reduce(n_tok.clone(), "sum")
                log_loss = acc.reduce(loss.detach() * n_tok, "sum") / total_tok
                loss = loss * (n_tok * acc.num_processes / total_tok)  # the engine averages over processes
            else:
                log_loss = loss.detach()
            opt.zero_grad(set_to_none=True)
            acc.backward(loss)
            acc.clip_grad_norm_(clip(), 1.0)
            opt.step()
            sched.step()
            losses.append(log_loss.item())
        acc.wait_for_everyone()
        state = acc.get_state_dict(module)  # a collective: gathers sharded weights (FSDP / ZeRO-3)
        wrapper = acc.unwrap_model(module)
        own = dict(wrapper.named_parameters())
        own.update(dict(wrapper.named_buffers()))
        for k, t in (state or {}).items():  # restore full weights where the engine sharded them
            if k in own and own[k].data_ptr() != t.data_ptr():
                own[k].data = t.detach().to("cpu", own[k].dtype)
        wrapper.to("cpu")
    finally:
        rt.model.eval()
        for p in train_params:
            p.requires_grad_(False)
        acc.free_memory()
    return losses
