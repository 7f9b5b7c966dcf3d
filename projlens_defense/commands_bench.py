"""`projlens-defense bench` and `bench merge`."""

from __future__ import annotations

import os
import time
from pathlib import Path

import click

from .errors import UsageError
from .eval.bench import PRESETS, BenchConfig, merge_results, parse_shard, run_bench
from .eval.summary import write_summary


def _names(registry: dict, chosen: tuple[str, ...], what: str) -> list[str]:
    if not chosen:
        return list(registry)
    unknown = [c for c in chosen if c not in registry]
    if unknown:
        raise UsageError(f"unknown {what} {unknown}; choose from: {', '.join(registry)}")
    return list(chosen)


def _mitigation_params(preset: dict, items: tuple[str, ...], methods: list[str]) -> dict[str, dict]:
    """The preset's per-method parameters, overridden by ``NAME.KEY=VALUE`` items; each set is checked."""
    from .commands_sanitize import _parse_params
    from .mitigations import MITIGATIONS

    out = {m: dict(v) for m, v in preset.items() if m in methods}
    for key, value in _parse_params(items).items():
        name, _, param = key.partition(".")
        if name not in methods or not param:
            raise UsageError(f"--mitigation-param expects NAME.KEY=VALUE with NAME one of {methods}, got {key!r}")
        out.setdefault(name, {})[param] = value
    for name, params in out.items():
        MITIGATIONS[name](**params)  # unknown parameters: a usage error now, not in the middle of the grid
    return out


@click.group(invoke_without_command=True)
@click.option("--preset", type=click.Choice(list(PRESETS)), default="tiny", show_default=True,
              help="tiny: micro zoo, rate 0.1, seeds 0 1. full: default zoo, rates 0.1 0.01, seeds 0 1 2.")
@click.option("--zoo", "zoo_name", type=click.Choice(["default", "instructed", "micro"]), default=None,
              help="Zoo to attack instead of the preset's (instructed: the paper's regime, see `zoo build --help`).")
@click.option("--variants", multiple=True, help="Variants (repeatable; default: all registered).")
@click.option("--poison-rates", multiple=True, type=float, help="Poison rates (repeatable).")
@click.option("--seeds", multiple=True, type=int, help="Seeds (repeatable).")
@click.option("--detectors", multiple=True, help="Detectors (repeatable; default: all registered).")
@click.option("--mitigations", multiple=True, help="Mitigations (repeatable; default: all registered; 'none' for none).")
@click.option("--model", type=click.Path(path_type=Path), default=None, help="HF LLaVA reference (default: the preset's zoo).")
@click.option("--data", type=click.Path(path_type=Path), default=None, help="Training data, LLaVA conversation JSON.")
@click.option("--test-data", type=click.Path(path_type=Path), default=None, help="Test data.")
@click.option("--epochs", type=float, default=None, help="Override the attack recipe's epochs.")
@click.option("--n-clean", type=int, default=64, show_default=True, help="Clean-sample budget of few-shot defenses.")
@click.option("--n-input-images", type=int, default=32, show_default=True,
              help="Clean and triggered test images per backdoored cell that image-level input detectors (STRIP) score.")
@click.option("--mitigation-param", "mitigation_params", multiple=True,
              help="Mitigation parameter NAME.KEY=VALUE (repeatable; JSON values), e.g. unlearn.rounds=12; "
                   "overrides the preset's (tiny: unlearn.rounds=4).")
@click.option("--jobs", type=int, default=1, show_default=True, help="Cells run in parallel processes.")
@click.option("--launcher", type=click.Choice(["local", "accelerate"]), default="local", show_default=True,
              help="How each cell's fine-tune runs: in the bench process, or as `accelerate launch ... -m "
                   "projlens_defense attack` (multi-GPU / DeepSpeed / FSDP from accelerate's config).")
@click.option("--launch-args", default="", help="Arguments for `accelerate launch`, e.g. '--config_file fsdp.yaml' "
                                                "or '--multi_gpu --num_processes 4' (with --launcher accelerate).")
@click.option("--shard", default=None, help="Run only shard I/N of the grid (join with `bench merge`).")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Output directory (resumable).")
@click.pass_context
def bench(ctx, preset, zoo_name, variants, poison_rates, seeds, detectors, mitigations, model, data, test_data, epochs, n_clean,
          n_input_images, mitigation_params, jobs, launcher, launch_args, shard, out) -> None:
    """Attacks x poison rates x seeds x defenses with benign controls; results.jsonl, summary.md/csv, figures.

    Resumable: cells whose results exist in OUT/results.jsonl are skipped. Run it as one process; to put
    the fine-tunes under `accelerate launch`, use --launcher accelerate.
    """
    if ctx.invoked_subcommand is not None:
        return
    if out is None:
        raise UsageError("bench needs --out DIR")
    if launch_args and launcher != "accelerate":
        raise UsageError("--launch-args needs --launcher accelerate")
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise UsageError("bench runs as one process (each would run the whole grid); use --launcher accelerate "
                         "to run every fine-tune under `accelerate launch`")
    from .attacks.variants import VARIANTS
    from .cli import resolve_model_and_data
    from .detectors import DETECTORS

    p = PRESETS[preset]
    shard_spec = parse_shard(shard)
    names = {"variants": _names(VARIANTS, variants, "variant(s)"),
             "detectors": _names(DETECTORS, detectors, "detector(s)")}
    if mitigations == ("none",):
        mit: list[str] = []
    else:
        try:
            from .mitigations import MITIGATIONS
        except ImportError:
            MITIGATIONS = {}
        mit = _names(MITIGATIONS, mitigations, "mitigation(s)")
    model, data, test_data = resolve_model_and_data(model, data, zoo_name or p["zoo"], 0, test_data)
    mparams = _mitigation_params(p.get("mitigation_params", {}), mitigation_params, mit)
    cfg = BenchConfig(
        variants=names["variants"], poison_rates=list(poison_rates) or p["poison_rates"],
        seeds=list(seeds) or p["seeds"], detectors=names["detectors"], mitigations=mit,
        model=str(model), train_data=str(data), test_data=str(test_data), out=out, n_clean=n_clean,
        n_input_images=n_input_images, epochs=epochs, jobs=jobs, shard=shard_spec, launcher=launcher,
        launch_args=launch_args, mitigation_params=mparams,
    )
    t = time.time()
    recs = run_bench(cfg)
    write_summary(recs, out)
    click.echo((out / "summary.md").read_text())
    click.echo(f"{len(recs)} cells in {out} ({time.time() - t:.1f} s this run)")


@bench.command("merge")
@click.argument("shards", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True)
def bench_merge(shards, out) -> None:
    """Join shard directories' results.jsonl into OUT and write the summary."""
    recs = merge_results(shards, out)
    write_summary(recs, out)
    click.echo(f"merged {len(recs)} cells into {out}")
