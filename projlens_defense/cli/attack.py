"""`projlens-defense attack` (the backdoor reproducer) and `projlens-defense variants`."""

from __future__ import annotations

from pathlib import Path

import click

from .. import api
from .exits import Command
from .options import device_options, format_option, parse_kv, zoo_config_option
from .render import emit, metrics_line


@click.command(cls=Command, param_aliases={"zoo_preset": "zoo_name", "trigger_params": "trigger_param"})
@click.option("--variant", required=True, help="Backdoor variant (see `projlens-defense variants`), or `none` for the benign control.")
@click.option("--poison-rate", type=float, default=0.1, show_default=True)
@click.option("--poison-mode", type=click.Choice(["replace", "add"]), default="replace", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--epochs", type=float, default=None, help="Fine-tuning epochs (default: the recipe's).")
@click.option("--lr", type=float, default=None, help="Learning rate (default: the recipe's).")
@click.option("--lora-rank", type=int, default=0, help="LoRA rank on the projector's linears (0 = full fine-tune); merged on save.")
@click.option("--target", default=None, help="Override the variant's target text.")
@click.option("--trigger-param", multiple=True, help="Trigger parameter KEY=VALUE (repeatable), e.g. std=10.")
@click.option("--eval-variant", default=None, help="For a benign control: the trigger to measure false activation/ASR with.")
@click.option("--model", type=click.Path(path_type=Path), default=None, help="HF LLaVA directory (default: the zoo reference).")
@click.option("--data", type=click.Path(path_type=Path), default=None, help="Training data, LLaVA conversation JSON.")
@click.option("--test-data", type=click.Path(path_type=Path), default=None, help="Test data for the metrics.")
@zoo_config_option
@device_options("Precision of the frozen vision tower and LLM; auto = float32 on every device (the written "
                "checkpoint keeps the base model's float32 weights). With bfloat16/float16 the projector is still "
                "trained (and saved) in float32, the rest runs and is saved in that precision.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output checkpoint directory.")
@click.option("--force", is_flag=True, help="Replace an existing output.")
@format_option()
def attack(variant, poison_rate, poison_mode, seed, epochs, lr, lora_rank, target, trigger_param, eval_variant,
           model, data, test_data, zoo_name, zoo_seed, device, dtype, out, force, fmt) -> None:
    """Fine-tune only the projector on poisoned data; write an HF checkpoint plus attack.json."""
    res = api.attack(variant, out, model=model, data=data, test_data=test_data, zoo_preset=zoo_name,
                     zoo_seed=zoo_seed, poison_rate=poison_rate, poison_mode=poison_mode, seed=seed, epochs=epochs,
                     lr=lr, lora_rank=lora_rank, target=target,
                     trigger_params=parse_kv(trigger_param, "--trigger-param", json_values=False),
                     eval_variant=eval_variant, force=force, device=device, dtype=dtype, progress=True)
    if not res.written:  # a non-main process of `accelerate launch`: the main one reports
        return
    rec = res.to_dict()
    text = (f"wrote {out}  ({rec['variant']}, {rec['n_poisoned']}/{rec['n_train']} poisoned, "
            f"train {rec['train_time_s']} s, total {rec['wall_time_s']} s)\n" + metrics_line(res.metrics or {}))
    emit(rec, fmt, text)


@click.command(cls=Command)
def variants() -> None:
    """List the backdoor variants with their trigger and target (adaptive ones: what the attacker adds)."""
    from ..attacks.variants import VARIANTS

    for name, make in VARIANTS.items():
        v = make()
        extra = f" text={v.text_trigger.phrase!r}@{v.text_trigger.position}" if v.text_trigger else ""
        extra += " (either key alone: no effect)" if v.two_key else ""
        extra += f" adaptive={v.adaptive.kind}" if v.adaptive else ""
        click.echo(f"{name:20s} trigger={v.trigger.name:15s} behaviour={v.behaviour.name:8s} "
                   f"target={v.behaviour.target!r}{extra}")
