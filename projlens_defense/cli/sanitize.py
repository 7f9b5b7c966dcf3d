"""`projlens-defense sanitize`: repair a projector and write it back in the checkpoint's own format."""

from __future__ import annotations

from pathlib import Path

import click

from .. import api
from ..results import SanitizeResult
from .exits import Command
from .options import device_options, format_option, parse_kv
from .render import emit

SHOWN_COMPONENTS = 8
"""Removed components listed one per line in the text report (a whole-subspace removal has hundreds)."""


def _text(rec: SanitizeResult) -> str:
    r = rec.report
    lines = [f"wrote {rec.out}  (method {rec.method}, {rec.mode}, format {rec.format})"]
    if rec.reference:
        lines.append(f"reference: {rec.reference}")
    if "probe" in r:
        pr = r["probe"]
        lines.append(f"probe: target {pr.get('target')!r} on {pr.get('support', 0):.0%} of the clean samples "
                     f"(modal answer under the synthesized trigger: {pr.get('modal_probe_answer')!r})")
    if "selection" in r:
        lines.append(f"selection: {r['selection']}")
    if "rank" in r:
        lines.append(f"removed: rank {r['rank']}, energy of the update removed {r.get('energy_removed')}")
    removed = r.get("removed", []) if isinstance(r.get("removed"), list) else []
    for c in removed[:SHOWN_COMPONENTS]:
        lines.append(f"  {c.get('layer')} component {c.get('component')}: sigma {c.get('sigma')}, "
                     f"energy share {c.get('energy')}")
    if len(removed) > SHOWN_COMPONENTS:
        lines.append(f"  ... {len(removed) - SHOWN_COMPONENTS} more components (all in --format json)")
    if isinstance(r.get("refit"), dict):
        f = r["refit"]
        lines.append(f"refit on the clean samples: {f.get('epochs')} epochs, {f.get('steps')} steps (lr {f.get('lr')}), "
                     f"loss {f.get('loss_first')} -> {f.get('loss_last')}; clean-sample loss {f.get('clean_loss_after')} "
                     f"vs the suspect's {f.get('suspect_clean_loss')} ({f.get('stopped')})")
    if "outcome" in r:
        lines.append(f"outcome: {r['outcome']}")
    for w in r.get("weight_change", []):
        extra = f", update energy removed {w['update_energy_removed']:.4f}" if "update_energy_removed" in w else ""
        lines.append(f"  {w['layer']}: relative weight change {w['relative_change']:.4f}, "
                     f"change rank {w['change_rank']}{extra}")
    ca = rec.clean_accuracy
    if ca:
        lines.append(f"clean accuracy on {ca['n']} held-out clean samples: {ca['before']:.4f} -> {ca['after']:.4f} "
                     f"({(ca['after'] - ca['before']) * 100:+.2f} points)")
    lines += [f"warning: {w}" for w in rec.warnings]
    return "\n".join(lines)


@click.command(cls=Command)
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--reference", type=click.Path(path_type=Path), default=None,
              help="The checkpoint the suspect was fine-tuned from (default: base_model of its attack.json).")
@click.option("--method", default="subspace", show_default=True, help="Mitigation (see --list-methods).")
@click.option("--clean-data", type=click.Path(path_type=Path), default=None,
              help="Clean samples (LLaVA conversation JSON) for few-shot methods and the clean-accuracy check.")
@click.option("--n-clean", type=int, default=64, show_default=True, help="Clean samples the method may use.")
@click.option("--n-eval", type=int, default=256, show_default=True,
              help="Held-out clean samples (the rest of --clean-data) for the clean-accuracy change.")
@click.option("--clean-seed", type=int, default=0, show_default=True)
@click.option("--model", type=click.Path(path_type=Path), default=None,
              help="HF LLaVA directory whose vision tower and LLM run the clean samples (default: CHECKPOINT).")
@click.option("--param", "params", multiple=True, help="Method parameter KEY=VALUE (repeatable; JSON values).")
@click.option("--calibration", type=click.Path(path_type=Path), default=None,
              help="Scan calibration fitted on benign fine-tunes of this model (`projlens-defense calibrate`); "
                   "data-free subspace/target-direction use its task subspace and benign null "
                   "(default: the cached self-generated calibration of the reference).")
@device_options("Precision of the model that runs the clean samples (few-shot methods, the clean-accuracy check); "
                "auto = bfloat16 on a GPU, float32 on the CPU. The repaired weights keep the checkpoint's dtypes.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output checkpoint (same format).")
@click.option("--link", is_flag=True,
              help="Hard-link the files that need no change (everything but the projector's file) into --out instead "
                   "of copying them: near-instant and no extra disk, but the output then SHARES those files with the "
                   "input, so editing one in place edits the other. Falls back to a copy, with a warning, where a "
                   "link is impossible (another filesystem). Checkpoint directories only.")
@click.option("--force", is_flag=True, help="Replace an existing output.")
@format_option()
def sanitize(checkpoint: Path, reference: Path | None, method: str, clean_data: Path | None, n_clean: int,
             n_eval: int, clean_seed: int, model: Path | None, params: tuple[str, ...], calibration: Path | None,
             device: str, dtype: str, out: Path, link: bool, force: bool, fmt: str) -> None:
    """Remove a backdoor from CHECKPOINT's projector and write the repaired checkpoint to --out.

    The output keeps the input's format (an HF directory stays an HF directory with only the projector
    tensors changed; mm_projector.bin stays a torch pickle); it is written atomically, an existing
    output is refused without --force, and the input is never modified. Only the files holding projector
    tensors are rewritten; the others are copied (reflink / in-kernel copy where the filesystem allows) or,
    with --link, hard-linked. When the method removes nothing
    it says why and exits 6 without writing (never an unchanged copy). Methods: subspace (default),
    target-direction, unlearn, restore, finetune, fine-prune, clp, orthogonal; norm-guard is a run-time
    wrapper (Python API only).
    """
    res = api.sanitize(checkpoint, out, method=method, reference=reference, clean_data=clean_data, n_clean=n_clean,
                       n_eval=n_eval, clean_seed=clean_seed, model=model, params=parse_kv(params, "--param"),
                       calibration=calibration, force=force, link=link, device=device, dtype=dtype)
    emit(res.to_dict(), fmt, _text(res))


