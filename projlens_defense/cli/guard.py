"""`projlens-defense guard`: score a folder of images with the projector guard."""

from __future__ import annotations

from pathlib import Path

import click

from .. import api
from .exits import Command, guard_code
from .options import device_options, format_option
from .render import emit


@click.command(cls=Command, param_aliases={"probes": "probe_data"})
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--images", type=click.Path(path_type=Path), required=True, help="Folder of images to score.")
@click.option("--reference", type=click.Path(path_type=Path), default=None,
              help="Projector the checkpoint was fine-tuned from (without it the guard whitens raw projector outputs).")
@click.option("--probes", "probe_data", type=click.Path(path_type=Path), default=None,
              help="Clean probe images (folder or LLaVA conversation JSON; default: the training data attack.json "
                   "names, else the zoo's).")
@click.option("--n-probes", type=click.IntRange(4, 1024), default=64, show_default=True)
@click.option("--fpr", type=click.FloatRange(0.0, 0.5), default=0.01, show_default=True,
              help="Target false-positive rate on clean inputs (sets the threshold from the probes).")
@click.option("--threshold", type=float, default=None, help="Use this score threshold instead of calibrating one.")
@click.option("--k", "k", type=click.IntRange(1, 256), default=8, show_default=True, help="Rank of the suspected subspace.")
@device_options()
@format_option()
def guard(checkpoint: Path, images: Path, reference: Path | None, probe_data: Path | None, n_probes: int, fpr: float,
          threshold: float | None, k: int, device: str, dtype: str, fmt: str) -> None:
    """Score every image in a folder with the projector guard; exit 1 if any is flagged.

    The threshold is calibrated on clean probe images only. Exit codes: 0 nothing flagged,
    1 some image flagged, 2 error (unreadable model or images), 3 no images, 4 usage error.
    """
    rec = api.guard(checkpoint, images, reference=reference, probes=probe_data, n_probes=n_probes, fpr=fpr,
                    threshold=threshold, k=k, device=device, dtype=dtype)
    rows = rec.images
    text = [f"{'IMAGE':40s} {'SCORE':>9s}  VERDICT"]
    text += [f"{Path(r['image']).name[:40]:40s} {r['score']:9.3f}  {'FLAGGED' if r['flagged'] else 'ok'}" for r in rows]
    text += [f"error: {e}" for e in rec.errors]
    text.append(f"{rec.flagged} of {len(rows)} image(s) flagged; threshold {rec.threshold:.3f} ({rec.mode}, "
                f"calibrated on {rec.n_probes} clean probes at FPR {fpr:g})")
    emit({k: v for k, v in rec.to_dict().items() if k != "fpr"}, fmt, "\n".join(text))
    return guard_code(rec.flagged, rec.errors)
