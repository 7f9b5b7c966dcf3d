"""The `projlens-defense` command line. User mistakes end in one line on stderr and an exit code, never a traceback.

Exit codes (modelscan's, plus two of ours): 0 clean / success, 1 something suspicious, 2 an error,
3 nothing scannable, 4 usage error, 5 inconclusive (scan: nothing suspicious, but a checkpoint could not be
declared clean: no calibration for its model, or no reference), 6 nothing removed (sanitize: no output written).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .cli_options import device_options
from .errors import EXIT_ERROR, EXIT_USAGE, ProjlensError, UsageError


class _Group(click.Group):
    """A click group that maps our errors and click's usage errors to the documented exit codes."""

    def main(self, *args, **kwargs):  # noqa: D401
        kwargs["standalone_mode"] = False
        try:
            rv = super().main(*args, **kwargs)
            sys.exit(rv if isinstance(rv, int) else 0)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.ClickException as e:
            e.show()
            sys.exit(EXIT_USAGE if isinstance(e, click.UsageError) else EXIT_ERROR)
        except click.exceptions.Abort:
            click.echo("aborted", err=True)
            sys.exit(130)
        except ProjlensError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="projlens-defense")
def main() -> None:
    """Find and remove backdoors in the vision-language projector of LLaVA-style models.

    Everything runs on CPU; the default model is a tiny real LLaVA (the zoo) built locally on first use.
    """
    from .runtime import quiet_transformers

    quiet_transformers()  # before any command imports transformers classes (their advisories drown our output)


def emit(obj: dict | list, fmt: str, text: str, output: Path | None = None) -> None:
    """Print (or write) a result as JSON or as the given human-readable text."""
    body = json.dumps(obj, indent=2, default=str) if fmt == "json" else text
    if output is None:
        click.echo(body)
    else:
        output.write_text(body + "\n")


def zoo_config_option(f):
    f = click.option("--zoo-seed", type=int, default=0, show_default=True, help="Seed of the zoo to use or build.")(f)
    return click.option("--zoo", "zoo_name", type=click.Choice(["default", "instructed", "micro", "foreign", "qwen2vl"]),
                        default="default", show_default=True,
                        help="Which zoo preset: default (the downstream task teaches new question types), instructed "
                             "(the reference already does every downstream question type, the paper's regime), "
                             "micro (the seconds-scale test zoo) or foreign (shapes, other words, widths and "
                             "targets: nothing was tuned on it).")(f)


def resolve_model_and_data(model: Path | None, data: Path | None, zoo_name: str, zoo_seed: int,
                           test_data: Path | None = None) -> tuple[Path, Path, Path | None]:
    """Explicit --model/--data, or the zoo's reference model and downstream data (built on demand)."""
    if (model is None) != (data is None) and model is not None and test_data is None and data is None:
        raise UsageError("--model needs --data (LLaVA conversation JSON) unless you use the zoo")
    if model is not None and data is not None:
        return model, data, test_data
    from .zoo.build import config_from_name, get_zoo

    zoo = get_zoo(config_from_name(zoo_name, zoo_seed))
    return model or zoo.reference, data or zoo.train_data, test_data or zoo.test_data


# ---- zoo -------------------------------------------------------------------------------------
@main.group()
def zoo() -> None:
    """Build or locate the tiny LLaVA zoo (reference model + downstream data)."""


@zoo.command("build")
@zoo_config_option
@click.option("--rebuild", is_flag=True, help="Rebuild even if a cached zoo exists.")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
def zoo_build(zoo_name: str, zoo_seed: int, rebuild: bool, fmt: str) -> None:
    """Train the zoo (vision tower, LLM, projector alignment) and cache it; prints its manifest."""
    from .zoo.build import config_from_name, get_zoo

    z = get_zoo(config_from_name(zoo_name, zoo_seed), rebuild=rebuild)
    m = z.manifest
    text = "\n".join([
        f"zoo:        {z.root}",
        f"reference:  {z.reference}",
        f"data:       {z.train_data} / {z.test_data}",
        f"alignment accuracy: {m['stages']['alignment']['accuracy']:.3f}",
        f"downstream zero-shot accuracy: {m['stages']['downstream_zero_shot_accuracy']:.3f}",
        f"build wall time: {m['wall_time_s']} s  (stages: {m['timings_s']})",
    ])
    emit({"root": str(z.root), "reference": str(z.reference), **m}, fmt, text)


@zoo.command("path")
@zoo_config_option
def zoo_path(zoo_name: str, zoo_seed: int) -> None:
    """Print the reference model directory (last line), building the zoo if needed."""
    from .zoo.build import config_from_name, get_zoo

    z = get_zoo(config_from_name(zoo_name, zoo_seed))
    click.echo(f"data: {z.train_data}")
    click.echo(str(z.reference))


# ---- attack ----------------------------------------------------------------------------------
def _parse_kv(items: tuple[str, ...]) -> dict:
    out = {}
    for it in items:
        if "=" not in it:
            raise UsageError(f"--trigger-param expects KEY=VALUE, got {it!r}")
        k, v = it.split("=", 1)
        out[k] = v
    return out


@main.command()
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
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
def attack(variant, poison_rate, poison_mode, seed, epochs, lr, lora_rank, target, trigger_param, eval_variant,
           model, data, test_data, zoo_name, zoo_seed, device, dtype, out, force, fmt) -> None:
    """Fine-tune only the projector on poisoned data; write an HF checkpoint plus attack.json."""
    from .attacks.finetune import AttackConfig, run_attack
    from .attacks.variants import VARIANTS

    if variant != "none" and variant not in VARIANTS:
        raise UsageError(f"unknown variant {variant!r}; choose from: none, {', '.join(VARIANTS)}")
    if out.exists() and not force:
        raise UsageError(f"{out}: output exists (use --force to replace it)")
    model, data, test_data = resolve_model_and_data(model, data, zoo_name, zoo_seed, test_data)
    cfg = AttackConfig(variant=None if variant == "none" else variant, poison_rate=poison_rate, seed=seed,
                       poison_mode=poison_mode, lora_rank=lora_rank, target=target,
                       trigger_params=_parse_kv(trigger_param), eval_variant=eval_variant)
    if epochs is not None:
        cfg.epochs = epochs
    if lr is not None:
        cfg.lr = lr
    rec = run_attack(cfg, model, data, test_data, out, force=force, device=device, dtype=dtype)
    if rec.get("written") is False:  # a non-main process of `accelerate launch`: the main one reports
        return
    m = rec["metrics"] or {}
    text = (f"wrote {out}  ({rec['variant']}, {rec['n_poisoned']}/{rec['n_train']} poisoned, "
            f"train {rec['train_time_s']} s, total {rec['wall_time_s']} s)\n" + _metrics_line(m))
    emit(rec, fmt, text)


def _metrics_line(m: dict) -> str:
    if not m:
        return ""
    fmt = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
    return (f"clean accuracy {fmt(m.get('clean_accuracy'))}  ASR {fmt(m.get('asr'))}  "
            f"false activation {fmt(m.get('false_activation'))}  (n_clean {m.get('n_clean')}, "
            f"n_triggered {m.get('n_triggered')})")


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--variant", default=None, help="Trigger/target to measure ASR with (default: from attack.json).")
@click.option("--data", "test_data", type=click.Path(path_type=Path), default=None, help="Test data (default: the zoo's).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch-size", type=click.IntRange(1, None), default=None,
              help="Images per vision-tower batch and prompts per generation batch (default: 256 and 128).")
@device_options()
@zoo_config_option
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
def evaluate(checkpoint, variant, test_data, seed, batch_size, device, dtype, zoo_name, zoo_seed, fmt) -> None:
    """Clean accuracy, ASR and false activation of a checkpoint (greedy decoding, batched)."""
    from .attacks.targets import Targets
    from .attacks.variants import get_variant
    from .conversations import load_conversations
    from .eval.evaluate import evaluate as run_eval
    from .eval.evaluate import prepare_eval_set
    from .runtime import LlavaRuntime

    if variant is None and (checkpoint / "attack.json").is_file():
        rec = json.loads((checkpoint / "attack.json").read_text())
        variant = rec["variant"] if rec["variant"] != "none" else rec["config"].get("eval_variant")
    rt = LlavaRuntime.from_pretrained(checkpoint, device=device, dtype=dtype)  # a bad checkpoint fails before any zoo build
    if test_data is None:
        _, _, test_data = resolve_model_and_data(None, None, zoo_name, zoo_seed)
    targets = Targets.beside(test_data)  # the data's own target texts (targets.json), else the defaults
    es = prepare_eval_set(rt, load_conversations(test_data), get_variant(variant, targets=targets) if variant else None,
                          seed, batch_size=batch_size)
    res = run_eval(rt, es, progress=True, batch_size=batch_size).to_dict()
    res.update({"checkpoint": str(checkpoint), "variant": variant, "test_data": str(test_data),
                "device": str(rt.device), "dtype": str(rt.dtype).removeprefix("torch.")})
    emit(res, fmt, _metrics_line(res))


@main.command()
def variants() -> None:
    """List the backdoor variants with their trigger and target."""
    from .attacks.variants import VARIANTS

    for name, make in VARIANTS.items():
        v = make()
        click.echo(f"{name:20s} trigger={v.trigger.name:15s} behaviour={v.behaviour.name:8s} target={v.behaviour.target!r}")


from .commands_scan import calibrate, scan  # noqa: E402

main.add_command(scan)
main.add_command(calibrate)

from .commands_bench import bench  # noqa: E402

main.add_command(bench)

from .commands_analyze import analyze, guard  # noqa: E402

main.add_command(analyze)
main.add_command(guard)

from .commands_sanitize import sanitize  # noqa: E402

main.add_command(sanitize)
