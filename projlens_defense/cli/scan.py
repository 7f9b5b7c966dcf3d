"""`projlens-defense scan` and `projlens-defense calibrate`: weight-space backdoor detection."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .. import api
from .exits import Command, scan_code
from .options import device_options, format_option
from .render import write


@click.command(cls=Command)
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--reference", type=click.Path(exists=True, path_type=Path), default=None,
              help="The checkpoint the suspect was fine-tuned from (enables the stronger update-based mode).")
@click.option("--calibration", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Calibration JSON from `projlens-defense calibrate` (default: the cached self-generated "
                   "calibration of the checkpoint's model, found by its reference's digest).")
@format_option("text", "json", "sarif", show_default=True)
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the report here instead of stdout.")
@click.option("--lens-layers", type=click.IntRange(0, 64), default=2, show_default=True,
              help="Leading LLM layers the attention lens reads (0: plain embedding lens).")
@click.option("--fpr", type=click.FloatRange(1e-6, 0.5), default=0.05, show_default=True,
              help="False-positive rate the threshold is set for: the share of benign fine-tunes of this model "
                   "expected to be flagged (Student-t prediction bound on the calibration's benign null). Lower it "
                   "for fewer false alarms at the cost of missed backdoors.")
def scan(paths: tuple[Path, ...], reference: Path | None, calibration: Path | None, fmt: str,
         output: Path | None, lens_layers: int, fpr: float) -> int:
    """Scan checkpoints (or folders of checkpoints) for a backdoored projector.

    Reads only the projector, the LLM embeddings / lm_head and the first LLM layers' value/output
    maps; never executes anything from a file. The verdict is taken at a threshold set for a stated
    false-positive rate against benign fine-tunes of the same model (the calibration). Without a
    calibration for the model, or without --reference, a scan that finds nothing says INCONCLUSIVE,
    not clean. Exit codes: 0 all clean, 1 something suspicious, 2 an error, 3 nothing scannable,
    4 usage error, 5 inconclusive (nothing suspicious, but not everything could be declared clean).
    """
    from ..eval.scan_report import sarif_report, text_report

    results, skipped = api.scan_report(paths, reference, calibration, lens_layers, fpr)
    if fmt == "json":
        body = json.dumps([r.to_dict() for r in results], indent=2)
    elif fmt == "sarif":
        body = json.dumps(sarif_report(results), indent=2)
    else:
        body = text_report(results, skipped)
    write(body, output)
    return scan_code([r.verdict for r in results])


@click.command(cls=Command, param_aliases={"benign": "benign", "generate": "generate"})
@click.argument("more", nargs=-1, type=click.Path(exists=True, path_type=Path))
@click.option("--benign", multiple=True, type=click.Path(exists=True, path_type=Path),
              help="Benign fine-tune(s) of the model (checkpoints or folders of them); more may follow as arguments.")
@click.option("--reference", type=click.Path(exists=True, path_type=Path), default=None,
              help="The reference checkpoint the benign fine-tunes started from (without it only the "
                   "reference-free mode is calibrated).")
@click.option("--generate", type=click.IntRange(0, 256), default=0, show_default=True,
              help="Make this many benign projector fine-tunes of --reference on --data yourself (cached and "
                   "resumable; recipes: lr x1/0.5/2, epochs x1/0.5/2, 80%% subsamples) and calibrate on them.")
@click.option("--data", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Clean training data (LLaVA conversation JSON) for --generate.")
@click.option("--lr", type=float, default=None, help="Base learning rate of the generated fine-tunes (default 5e-3).")
@click.option("--epochs", type=float, default=None, help="Base epochs of the generated fine-tunes (default 20).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the generated recipes.")
@click.option("--jobs", type=click.IntRange(1, 64), default=2, show_default=True,
              help="Fine-tunes run in parallel (each on cores / jobs threads).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Calibration JSON to write (with --generate it is also stored in the cache, where scan, "
                   "sanitize and analyze find it).")
@click.option("--fpr", type=click.FloatRange(1e-6, 0.5), default=None,
              help="False-positive rate the printed thresholds are for (default 0.05; `scan --fpr` picks the rate "
                   "each scan decides at, the calibration itself is the same).")
@click.option("--rule", type=click.Choice(["max", "mean"]), default="max", show_default=True,
              help="How the z-scores of the combined signals merge into one score.")
@click.option("--lens-layers", type=click.IntRange(0, 64), default=2, show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing --out file.")
@device_options("Precision of the generated fine-tunes' frozen vision tower and LLM; auto = float32 on every "
                "device (the projector always trains in float32).")
def calibrate(more: tuple[Path, ...], benign: tuple[Path, ...], reference: Path | None, generate: int,
              data: Path | None, lr: float | None, epochs: float | None, seed: int, jobs: int, out: Path | None,
              fpr: float, rule: str, lens_layers: int, force: bool, device: str, dtype: str) -> int:
    """Fit decision thresholds from benign fine-tunes (the null distribution of this model).

    Either give benign fine-tunes you have, or let the tool make them:

      projlens-defense calibrate --reference base/ --data clean.json --generate 8

    A generated calibration is stored in the user cache under the reference projector's digest, and
    `scan`, `sanitize` and `analyze` use it for checkpoints fine-tuned from that reference.
    """
    cal = api.calibrate(reference, data, benign=list(benign) + list(more), generate=generate, lr=lr, epochs=epochs,
                        fpr=fpr, rule=rule, lens_layers=lens_layers, jobs=jobs, seed=seed, out=out, force=force,
                        progress=True, device=device, dtype=dtype)
    d = cal.to_dict()
    for mode, thr in d["thresholds"].items():
        click.echo(f"{mode}: threshold z {thr:.3f} on {', '.join(cal.combine[mode])} (set for FPR {cal.fpr}; "
                   f"{len(cal.benign)} benign, {d['benign_flagged_loo'][mode]} of them above it leave-one-out)")
    if generate:
        click.echo(f"stored {cal.source}")
    if out is not None:
        click.echo(f"wrote {out}")
    return 0
