"""`projlens-defense bench` and `bench merge`: the benchmark grid."""

from __future__ import annotations

import time
from pathlib import Path

import click

from .. import api
from ..errors import UsageError
from ..eval.bench import PRESETS
from .exits import Group
from .options import ZOO_PRESETS, parse_kv


@click.group(cls=Group, invoke_without_command=True,
             param_aliases={"zoo_preset": "zoo_name", "mitigation_params": "mitigation_params"})
@click.option("--preset", type=click.Choice(list(PRESETS)), default="tiny", show_default=True,
              help="tiny: micro zoo, rate 0.1, seeds 0 1. full: default zoo, rates 0.1 0.01, seeds 0 1 2. "
                   "population: 210 fine-tunes (15 in-scope families x rates 0.1 0.01 x 5 seeds + 60 benign, each "
                   "with its own lr / epochs), detection only; writes population.md (per family, leave-one-family-"
                   "out, baselines).")
@click.option("--zoo", "zoo_name", type=click.Choice([z for z in ZOO_PRESETS if z != "foreign"]), default=None,
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
    t = time.time()
    recs = api.bench(out, preset=preset, zoo_preset=zoo_name, variants=variants, poison_rates=poison_rates,
                     seeds=seeds, detectors=detectors, mitigations=[] if mitigations == ("none",) else (mitigations or None),
                     model=model, data=data, test_data=test_data, epochs=epochs, n_clean=n_clean,
                     n_input_images=n_input_images,
                     mitigation_params=parse_kv(mitigation_params, "--mitigation-param"), jobs=jobs,
                     launcher=launcher, launch_args=launch_args, shard=shard)
    click.echo((out / "summary.md").read_text())
    click.echo(f"{len(recs)} cells in {out} ({time.time() - t:.1f} s this run)")


@bench.command("merge")
@click.argument("shards", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True)
def bench_merge(shards, out) -> None:
    """Join shard directories' results.jsonl into OUT and write the summary."""
    recs = api.bench_merge(shards, out)
    click.echo(f"merged {len(recs)} cells into {out}")
