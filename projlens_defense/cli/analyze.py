"""`projlens-defense analyze`: the ProjLens report (Markdown + figures) on a checkpoint."""

from __future__ import annotations

from pathlib import Path

import click

from .. import api
from ..errors import UsageError
from .exits import Command
from .options import device_options, format_option
from .render import emit


@click.command(cls=Command, param_aliases={"data": "test_data", "probes": "probe_data", "k_values": "k_text"})
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--reference", type=click.Path(path_type=Path), default=None,
              help="The checkpoint it was fine-tuned from (default: the base model attack.json names, else the zoo "
                   "reference).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output directory for report.md, report.json and figures.")
@click.option("--benign", type=click.Path(path_type=Path), multiple=True,
              help="A benign fine-tune of the same model and task (repeatable; >= 3 also gives a calibrated score).")
@click.option("--variant", default=None, help="Trigger/target to measure ASR with (default: from attack.json; none: no curves' ASR).")
@click.option("--data", "test_data", type=click.Path(path_type=Path), default=None, help="Test data, LLaVA conversation JSON (default: test.json beside the training data attack.json names, else "
                   "the zoo's).")
@click.option("--probes", "probe_data", type=click.Path(path_type=Path), default=None,
              help="Clean probe images, LLaVA conversation JSON (default: the training data attack.json names, else the "
                   "zoo's).")
@click.option("--n-probes", type=click.IntRange(2, 64), default=64, show_default=True, help="Clean probe images used (<= 64).")
@click.option("--max-test", type=click.IntRange(1, None), default=200, show_default=True, help="Test samples evaluated (subsampled).")
@click.option("--k", "k_text", default="0,1,2,3,4,6,8", show_default=True, help="k values of the top-k curves.")
@click.option("--layers", type=click.Choice(["all", "first", "last"]), default="all", show_default=True,
              help="Projector layers whose dW is decomposed.")
@click.option("--no-excite", is_flag=True, help="Read the clean probes' mean shift instead of the trigger-free excitation.")
@device_options()
@format_option()
def analyze(checkpoint: Path, reference: Path | None, out: Path, benign: tuple[Path, ...], variant: str | None,
            test_data: Path | None, probe_data: Path | None, n_probes: int, max_test: int, k_text: str, layers: str,
            no_excite: bool, device: str, dtype: str, fmt: str) -> None:
    """Write a ProjLens report (Markdown + PNG figures) on CHECKPOINT: spectra, top-k curves, shift vs norm, logit lens."""
    rep = api.analyze(checkpoint, out, reference=reference, benign=benign, variant=variant, data=test_data,
                      probes=probe_data, n_probes=n_probes, max_test=max_test, k_values=parse_ks(k_text),
                      layers=layers, excite=not no_excite, device=device, dtype=dtype)
    act = rep.data["activation"]
    toks = ", ".join(t["token"] for t in act.get("top_tokens", [])[:5]) or "n/a"
    lines = [f"wrote {rep.report} ({', '.join(rep.data['figures'].values())}) in {rep.data['wall_time_s']:.1f} s"]
    for dname, crit in rep.data["criteria"].items():
        if rep.data["trigger"]["variant"]:
            lines.append(f"  {dname}: injection restores >= 90% ASR at k={crit['inject_k']}, ablation <= 5% ASR "
                         f"within 2 points at k={crit['ablate_k']}")
    lines.append(f"  dominant shift direction reads: {toks}")
    source = rep.benign_source and rep.benign_source.replace("`benign`", "--benign")
    lines.append(f"  benign fine-tunes compared: {len(rep.data['benign'])}" + (f" (from {source})" if source else
                 " (none: no --benign and no calibration for this reference; `calibrate --generate 8` makes one)"))
    if rep.data.get("model_score"):
        ms = rep.data["model_score"]
        lines.append(f"  activation score {ms['score']:.2f} vs threshold {ms['threshold']:.2f}: {ms['verdict']}")
    rec = rep.to_dict()
    emit({k: rec[k] for k in ("checkpoint", "trigger", "data", "criteria", "shift", "activation", "figures",
                              "wall_time_s", "report") if k in rec}, fmt, "\n".join(lines))


def parse_ks(text: str) -> tuple[int, ...]:
    """``--k``: comma-separated integers."""
    try:
        return tuple(sorted({int(x) for x in text.replace(" ", "").split(",") if x}))
    except ValueError:
        raise UsageError(f"--k expects comma-separated integers, got {text!r}") from None
