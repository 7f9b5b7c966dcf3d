"""The attack reproducer: poison the downstream data, fine-tune only the projector, save, evaluate."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..conversations import load_conversations
from ..errors import UsageError
from ..runinfo import ATTACK_FILE, environment
from ..runtime import LlavaRuntime, resolve_placement
from ..training import (
    accelerate_requested,
    distributed_info,
    get_accelerator,
    is_main_process,
    train_projector,
)
from ..zoo.targets import Targets
from .adaptive import prepare_adaptive
from .evaluate import evaluate, prepare_eval_set
from .parts import prepare_parts
from .poison import poison_dataset
from .variants import get_variant


@dataclass
class AttackConfig:
    """One projector fine-tune. `variant=None` or `poison_rate=0` is the benign control (same recipe)."""

    variant: str | None
    poison_rate: float = 0.1
    seed: int = 0
    poison_mode: str = "replace"
    epochs: float = 20.0
    lr: float = 5e-3
    batch_size: int = 32
    lora_rank: int = 0
    target: str | None = None
    trigger_params: dict = field(default_factory=dict)
    eval_variant: str | None = None  # trigger used to measure ASR/false activation of a benign control

    @property
    def benign(self) -> bool:
        return self.variant in (None, "none") or self.poison_rate == 0


def _lora_wrap(projector: torch.nn.Module, rank: int, seed: int, targets: tuple[str, ...] = ("linear_1", "linear_2")):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets), lora_dropout=0.0)
    return get_peft_model(projector, cfg)


def run_attack(cfg: AttackConfig, model: Path, train_data: Path, test_data: Path | None, out: Path,
               force: bool = False, progress: bool = True, device: str | torch.device | None = "cpu",
               dtype: str | torch.dtype | None = "float32") -> dict:
    """Fine-tune the projector of `model` on (poisoned) `train_data`; write an HF checkpoint and attack.json.

    The variants aim at the targets of `train_data` (its folder's ``targets.json``, else the defaults).
    Under `accelerate launch` every process trains (see :mod:`projlens_defense.training`); only the main
    process evaluates and writes, the others return a short record with ``written: False``.

    ``device`` (``auto``: a GPU when available) and ``dtype`` (``auto``: float32 here, on every device) place
    the model; in a lower precision the projector is still trained, and saved, in float32.
    """
    t0 = time.time()
    out = Path(out)
    if out.exists() and not force:
        raise UsageError(f"{out}: output exists (use `force` to replace it)")
    if accelerate_requested() and (device is None or str(device) == "auto"):
        device = get_accelerator().device  # each process on its own device (Accelerate moves it there anyway)
    dev, dt = resolve_placement(device, dtype, auto_dtype=torch.float32)
    torch.manual_seed(cfg.seed)
    rt = LlavaRuntime.from_pretrained(model, device=dev, dtype=dt)
    if dt != torch.float32:  # train float32 master weights; the frozen tower and LLM stay in `dt`
        rt.projector.float()
    train = load_conversations(train_data)
    targets = Targets.beside(train_data)
    variant = None if cfg.benign else get_variant(cfg.variant, cfg.target, cfg.trigger_params, targets)
    poisoned_ids: list[str] = []
    penalty, adaptive_record = None, None
    if variant is not None and variant.adaptive is not None:
        if cfg.lora_rank or variant.parts != ("projector",):
            raise UsageError(f"{variant.name}: adaptive attacks train the projector's weights directly (no LoRA)")
        penalty, adaptive_record = prepare_adaptive(
            variant.adaptive, rt, model, rt.vision_features([s.image for s in train]), [s.question for s in train],
            [s.answer for s in train], variant.behaviour.target, epochs=cfg.epochs, lr=cfg.lr,
            batch_size=cfg.batch_size, seed=cfg.seed, progress=progress)
    if variant is not None:
        train, poisoned_ids = poison_dataset(train, variant, cfg.poison_rate, cfg.seed, cfg.poison_mode)
    feats = rt.vision_features([s.image for s in train])
    proj = rt.projector
    parts = variant.parts if variant is not None else ("projector",)
    if cfg.lora_rank and "projector" in parts:
        proj = _lora_wrap(proj, cfg.lora_rank, cfg.seed, getattr(rt, "lora_targets", ("linear_1", "linear_2")))
    try:
        trained = prepare_parts(rt, parts, [s.image for s in train], feats, proj, cfg.lora_rank, cfg.seed)
    except ValueError as e:
        raise UsageError(f"{cfg.variant}: {e}") from None
    t_train = time.time()
    losses = train_projector(rt, trained.inputs, [s.question for s in train], [s.answer for s in train],
                             epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, seed=cfg.seed,
                             projector=trained.module, params=trained.params,
                             desc=f"fine-tune {'+'.join(parts)} ({cfg.variant or 'benign'})", progress=progress,
                             penalty=penalty)
    trained.done()
    if cfg.lora_rank and "projector" in parts:
        rt.projector = proj.merge_and_unload()
    train_time = time.time() - t_train
    if not is_main_process():  # under `accelerate launch`: the main process evaluates and writes
        return {"variant": cfg.variant if variant is not None else "none", "benign": variant is None,
                "config": asdict(cfg), "written": False, "distributed": distributed_info()}

    metrics = None
    eval_name = cfg.variant if variant is not None else cfg.eval_variant
    if test_data is not None:
        ev = get_variant(eval_name, cfg.target, cfg.trigger_params, targets) if eval_name else None
        es = prepare_eval_set(rt, load_conversations(test_data), ev, cfg.seed)
        metrics = evaluate(rt, es, progress=progress).to_dict()
        metrics["eval_variant"] = eval_name

    record = {
        "variant": cfg.variant if variant is not None else "none",
        "benign": variant is None,
        "config": asdict(cfg),
        "variant_params": variant.params() if variant else None,
        "targets": targets.to_dict(),
        "n_train": len(train),
        "n_poisoned": len(poisoned_ids),
        "poisoned_ids": poisoned_ids,
        "base_model": str(model),
        "train_data": str(train_data),
        "trained_parts": list(parts),
        "final_train_loss": sum(losses[-5:]) / max(1, len(losses[-5:])),
        "adaptive": adaptive_record,
        "metrics": metrics,
        "train_time_s": round(train_time, 2),
        "distributed": distributed_info(),
        "device": str(dev),
        "dtype": str(dt).removeprefix("torch."),
        "wall_time_s": None,
        "environment": environment(),
    }
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        rt.model.save_pretrained(tmp)
        rt.tokenizer.save_pretrained(tmp)
        rt.image_processor.save_pretrained(tmp)
        record["wall_time_s"] = round(time.time() - t0, 2)
        (tmp / ATTACK_FILE).write_text(json.dumps(record, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return record
