"""`projlens-defense analyze` (the ProjLens report) and `projlens-defense guard` (score a folder of images)."""

from __future__ import annotations

import os
from pathlib import Path

import click

from .cli_options import device_options
from .errors import (
    EXIT_CLEAN,
    EXIT_ERROR,
    EXIT_SUSPICIOUS,
    CheckpointError,
    NothingScannableError,
    UsageError,
)
from .runinfo import attack_provenance

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _parse_ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(sorted({int(x) for x in text.replace(" ", "").split(",") if x}))
    except ValueError:
        raise UsageError(f"--k expects comma-separated integers, got {text!r}") from None
    if not ks or min(ks) < 0 or max(ks) > 64:
        raise UsageError("--k values must be between 0 and 64")
    return ks


def _need_dir(path: Path, what: str) -> None:
    if not os.path.lexists(path):  # a symlink loop or dangling link exists: the reader says why it cannot read it
        raise UsageError(f"{path}: no such {what}")


def _calibration_benign(reference: Path) -> tuple[tuple[Path, ...], str | None]:
    """The benign fine-tunes of the cached self-generated calibration of ``reference`` (none if there is none)."""
    from .detectors.calibration import cached_calibration, projector_digest
    from .errors import CheckpointError

    try:
        from .checkpoint import load_projector

        cal = cached_calibration(projector_digest(load_projector(reference)))
    except CheckpointError:
        return (), None
    if cal is None:
        return (), None
    files = tuple(Path(b) for b in cal.benign if Path(b).is_file())
    return (files, f"the self-generated calibration {cal.source}") if len(files) >= 3 else ((), None)


@click.command()
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
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
def analyze(checkpoint: Path, reference: Path | None, out: Path, benign: tuple[Path, ...], variant: str | None,
            test_data: Path | None, probe_data: Path | None, n_probes: int, max_test: int, k_text: str, layers: str,
            no_excite: bool, device: str, dtype: str, fmt: str) -> None:
    """Write a ProjLens report (Markdown + PNG figures) on CHECKPOINT: spectra, top-k curves, shift vs norm, logit lens."""
    from .attacks.variants import VARIANTS
    from .eval.analyze import AnalyzeOptions, analyze_checkpoint

    if variant is not None and variant not in VARIANTS:
        raise UsageError(f"unknown variant {variant!r}; choose from: {', '.join(VARIANTS)}")
    ks = _parse_ks(k_text)
    _need_dir(checkpoint, "checkpoint")
    for b in benign:
        _need_dir(b, "benign checkpoint")
    recorded = attack_provenance(checkpoint)
    test_data = test_data or recorded.get("test_data")
    probe_data = probe_data or recorded.get("probe_data")
    reference = reference or recorded.get("reference")
    if reference is None:
        from .zoo.build import get_zoo

        reference = get_zoo().reference
    _need_dir(reference, "reference checkpoint")
    benign_source = "--benign" if benign else None
    if not benign:
        benign, benign_source = _calibration_benign(reference)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: exists and is not a directory")
    opts = AnalyzeOptions(k_values=ks, layers=layers, n_probes=n_probes, max_test=max_test,
                          excite=not no_excite)
    rep = analyze_checkpoint(checkpoint, reference, out, benign=benign, variant=variant, test_data=test_data,
                             probe_data=probe_data, options=opts, device=device, dtype=dtype)
    act = rep["activation"]
    toks = ", ".join(t["token"] for t in act.get("top_tokens", [])[:5]) or "n/a"
    lines = [f"wrote {out / 'report.md'} ({', '.join(rep['figures'].values())}) in {rep['wall_time_s']:.1f} s"]
    for dname, crit in rep["criteria"].items():
        if rep["trigger"]["variant"]:
            lines.append(f"  {dname}: injection restores >= 90% ASR at k={crit['inject_k']}, ablation <= 5% ASR "
                         f"within 2 points at k={crit['ablate_k']}")
    lines.append(f"  dominant shift direction reads: {toks}")
    lines.append(f"  benign fine-tunes compared: {len(benign)}" + (f" (from {benign_source})" if benign_source else
                 " (none: no --benign and no calibration for this reference; `calibrate --generate 8` makes one)"))
    if rep.get("model_score"):
        ms = rep["model_score"]
        lines.append(f"  activation score {ms['score']:.2f} vs threshold {ms['threshold']:.2f}: {ms['verdict']}")
    from .cli import emit

    emit({k: rep[k] for k in ("checkpoint", "trigger", "data", "criteria", "shift", "activation", "figures",
                              "wall_time_s") if k in rep} | {"report": str(out / "report.md")}, fmt, "\n".join(lines))


def _load_images(folder: Path) -> tuple[list[Path], list, list[str]]:
    """Images in ``folder`` (sorted, non-recursive), as RGB uint8 arrays; unreadable files become errors."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    if not folder.is_dir():
        raise UsageError(f"{folder}: not a directory of images")
    paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    ok, arrays, errors = [], [], []
    for p in paths:
        try:
            with Image.open(p) as im:
                arrays.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
            ok.append(p)
        except (OSError, UnidentifiedImageError, ValueError) as e:
            errors.append(f"{p.name}: cannot read image ({type(e).__name__})")
    return ok, arrays, errors


def _probe_images(probe_data: Path | None, n: int) -> list:
    if probe_data is None:
        from .zoo.build import get_zoo

        probe_data = get_zoo().train_data
    if probe_data.is_dir():
        _, arrays, _ = _load_images(probe_data)
        return arrays[:n]
    from .conversations import load_conversations

    return [s.image for s in load_conversations(probe_data, limit=n)]


@click.command()
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
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
def guard(checkpoint: Path, images: Path, reference: Path | None, probe_data: Path | None, n_probes: int, fpr: float,
          threshold: float | None, k: int, device: str, dtype: str, fmt: str) -> None:
    """Score every image in a folder with the projector guard; exit 1 if any is flagged.

    The threshold is calibrated on clean probe images only. Exit codes: 0 nothing flagged,
    1 some image flagged, 2 error (unreadable model or images), 3 no images, 4 usage error.
    """
    from .checkpoint import load_projector
    from .guard import ProjectorGuard
    from .runtime import LlavaRuntime

    _need_dir(checkpoint, "checkpoint")
    if not images.exists():
        raise UsageError(f"{images}: no such directory")
    paths, arrays, errors = _load_images(images)
    if not paths and not errors:
        raise NothingScannableError(f"{images}: no images ({', '.join(IMAGE_SUFFIXES)})")
    ref = None
    if reference is not None:
        _need_dir(reference, "reference checkpoint")
        ref = load_projector(reference)
    rt = LlavaRuntime.from_pretrained(checkpoint, device=device, dtype=dtype)
    probes = _probe_images(probe_data or attack_provenance(checkpoint).get("probe_data"), n_probes)
    if len(probes) < 4:
        raise UsageError(f"need at least 4 clean probe images, got {len(probes)}")
    try:
        pf = rt.vision_features(probes)
        g = ProjectorGuard.calibrate(rt.model, pf, reference=ref, k=k, fpr=fpr)
        if threshold is not None:
            g.detector.threshold = threshold
        scores = g.score(rt.vision_features(arrays)) if arrays else []
    except (ValueError, RuntimeError) as e:
        raise CheckpointError(f"{checkpoint}: cannot run the guard ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    rows = [{"image": str(p), "score": round(float(s), 4), "flagged": bool(s > g.threshold)}
            for p, s in zip(paths, scores, strict=True)]
    n_flag = sum(r["flagged"] for r in rows)
    mode = ("shift in dW top-k subspace + excitation direction" if ref is not None
            else "projector output (no reference)")
    text = [f"{'IMAGE':40s} {'SCORE':>9s}  VERDICT"]
    text += [f"{Path(r['image']).name[:40]:40s} {r['score']:9.3f}  {'FLAGGED' if r['flagged'] else 'ok'}" for r in rows]
    text += [f"error: {e}" for e in errors]
    text.append(f"{n_flag} of {len(rows)} image(s) flagged; threshold {g.threshold:.3f} ({mode}, calibrated on "
                f"{len(probes)} clean probes at FPR {fpr:g})")
    from .cli import emit

    emit({"checkpoint": str(checkpoint), "threshold": g.threshold, "mode": mode, "n_probes": len(probes),
          "images": rows, "errors": errors, "flagged": n_flag}, fmt, "\n".join(text))
    if n_flag:
        raise click.exceptions.Exit(EXIT_SUSPICIOUS)
    if errors:
        raise click.exceptions.Exit(EXIT_ERROR)
    raise click.exceptions.Exit(EXIT_CLEAN)

