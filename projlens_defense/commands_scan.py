"""`projlens-defense scan` and `projlens-defense calibrate`: weight-space backdoor detection from the CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click

from .errors import UsageError

SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
RULE_BACKDOOR = "PLD001"
RULE_ERROR = "PLD002"
INFO_URI = "https://arxiv.org/abs/2604.19083"


def _write(body: str, output: Path | None) -> None:
    if output is None:
        click.echo(body)
        return
    try:
        output.write_text(body + "\n")
    except OSError as e:
        raise UsageError(f"{output}: cannot write: {e.strerror or e}") from None


def _tool_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("projlens-defense")
    except PackageNotFoundError:  # pragma: no cover
        return "0+unknown"


def _uri(path: str) -> str:
    """A valid SARIF ``uri`` (RFC 3986 URI reference): file URI if absolute, else percent-encoded."""
    from urllib.parse import quote

    p = Path(path)
    return p.resolve().as_uri() if p.is_absolute() else quote(p.as_posix())


def sarif_report(results: list, tool_version: str | None = None) -> dict[str, Any]:
    """A SARIF 2.1.0 log: one result per checkpoint (suspicious = error, scan error = warning, clean = pass)."""
    from .detectors.base import _finite

    rules = [
        {
            "id": RULE_BACKDOOR,
            "name": "ProjectorBackdoor",
            "shortDescription": {"text": "Vision-language projector shows signs of a backdoor"},
            "fullDescription": {"text": "The projector's update (or its own weights) points at LLM tokens that benign "
                                        "fine-tunes of the same model never point at, beyond the calibrated threshold."},
            "helpUri": INFO_URI,
            "defaultConfiguration": {"level": "error"},
        },
        {
            "id": RULE_ERROR,
            "name": "ScanError",
            "shortDescription": {"text": "Checkpoint could not be scanned"},
            "fullDescription": {"text": "The checkpoint could not be read or judged (corrupt file, missing tensors...)."},
            "defaultConfiguration": {"level": "warning"},
        },
    ]
    out = []
    for r in results:
        loc = [{"physicalLocation": {"artifactLocation": {"uri": _uri(r.path)}}}]
        props = _finite({"verdict": r.verdict, "score": r.score, "threshold": r.threshold, "format": r.format,
                         "mode": r.mode, "suspected_target_tokens": r.suspected_target_tokens})  # NaN is not JSON
        if r.verdict == "error":
            out.append({"ruleId": RULE_ERROR, "level": "warning", "kind": "fail",
                        "message": {"text": f"could not scan: {'; '.join(r.errors)}"}, "locations": loc,
                        "properties": props})
        elif r.verdict == "inconclusive":
            out.append({"ruleId": RULE_BACKDOOR, "level": "none", "kind": "review",
                        "message": {"text": f"inconclusive: {r.reason}"}, "locations": loc, "properties": props})
        elif r.verdict == "suspicious":
            toks = ", ".join(r.suspected_target_tokens[:5]) or "none named"
            out.append({"ruleId": RULE_BACKDOOR, "level": "error", "kind": "fail",
                        "message": {"text": f"projector backdoor suspected: score {_num(r.score)} > threshold "
                                            f"{_num(r.threshold)} (p {_p(r.p_value)}, set for FPR {r.fpr}); "
                                            f"suspected target tokens: {toks}"},
                        "locations": loc, "properties": props})
        else:
            out.append({"ruleId": RULE_BACKDOOR, "level": "none", "kind": "pass",
                        "message": {"text": f"clean: score {_num(r.score)} <= threshold {_num(r.threshold)}"
                                            + "".join(f"; {w}" for w in r.warnings[:1])},
                        "locations": loc, "properties": props})
    return {
        "version": "2.1.0",
        "$schema": SARIF_SCHEMA,
        "runs": [{
            "tool": {"driver": {"name": "projlens-defense", "version": tool_version or _tool_version(),
                                "informationUri": INFO_URI, "rules": rules}},
            "results": out,
            "invocations": [{"executionSuccessful": True}],
        }],
    }


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _p(x: float | None) -> str:
    return "-" if x is None else f"{x:.2g}"


def _layer_lines(r) -> list[str]:
    lines = []
    for d in r.detectors:
        if d["name"] == "spectral":
            for layer, st in d["evidence"].get("layers", {}).items():
                lines.append(f"    {layer}: |dW| {st['fro_norm']:.3g}, top-1 energy {st['top1_energy']:.2f}, "
                             f"top-5 energy {st.get('top5_energy', float('nan')):.2f}, stable rank "
                             f"{st['stable_rank']:.1f}, effective rank {st['effective_rank']:.1f}")
        elif d["name"] in ("logit-lens", "reference-free"):
            ev = d["evidence"]
            top = ", ".join(f"{t['token']} (z {t['z']:.1f})" for t in ev.get("top_tokens", [])[:5])
            what = "update dW" if d["name"] == "logit-lens" else "weights (no reference)"
            if ev.get("task_rank_removed"):
                what += f" outside the benign task subspace (rank {ev['task_rank_removed']})"
            lines.append(f"    lens on {what} via {'/'.join(ev.get('readings', []))}: {top}")
            for key in ("most_novel_token", "most_influenced_token"):
                if key in ev:
                    lines.append(f"      {key.replace('_', ' ')}: {ev[key]['token']} "
                                 f"({ev[key]['novelty']:.1f} benign std)")
    return lines


def text_report(results: list, skipped: list[str]) -> str:
    """The human-readable table: verdict, score against threshold, suspected tokens, per-layer evidence."""
    width = min(60, max(len("CHECKPOINT"), *(len(r.path) for r in results)))
    head = f"{'CHECKPOINT':{width}s}  {'VERDICT':10s}  {'SCORE':>7s} / {'THRESH':<7s}  SUSPECTED TARGET TOKENS"
    lines = [head, "-" * len(head)]
    for r in results:
        toks = ", ".join(r.suspected_target_tokens[:5]) if r.verdict != "error" else "; ".join(r.errors)
        lines.append(f"{r.path:{width}s}  {r.verdict.upper():10s}  {_num(r.score):>7s} / {_num(r.threshold):<7s}  {toks}")
    lines.append("")
    for r in results:
        lines.append(f"{r.path}: {r.verdict}")
        if r.format:
            lines.append(f"  format {r.format}; mode {r.mode}"
                         + (f" (reference {r.reference})" if r.reference else "")
                         + f"; read {r.bytes_read / 1e6:.1f} MB in {r.seconds:.2f} s")
        if r.signals_used:
            used = ", ".join(f"{s} {r.signals[s]:.2f} (z {r.zscores.get(s, float('nan')):.1f})" for s in r.signals_used)
            lines.append(f"  decision on: {used}; p-value {_p(r.p_value)}, threshold set for a false-positive "
                         f"rate of {r.fpr}")
        if r.calibration:
            lines.append(f"  calibration: {r.calibration}")
        if r.reason:
            lines.append(f"  inconclusive: {r.reason}")
        lines += _layer_lines(r)
        lines += [f"  error: {e}" for e in r.errors]
        lines += [f"  warning: {w}" for w in r.warnings]
    if skipped:
        lines.append(f"skipped {len(skipped)} entr{'y' if len(skipped) == 1 else 'ies'} that hold no checkpoint")
    n = {v: sum(r.verdict == v for r in results) for v in ("suspicious", "clean", "inconclusive", "error")}
    lines.append(f"{len(results)} checkpoint(s): {n['suspicious']} suspicious, {n['clean']} clean, "
                 f"{n['inconclusive']} inconclusive, {n['error']} error(s)")
    return "\n".join(lines)


def _existing(paths: tuple[Path, ...], what: str = "path") -> None:
    """A path that is not there at all is a usage error (4); one that is there but unreadable
    (dangling link, symlink loop, permission) is left to the scan, which reports it as an error (2)."""
    for p in paths:
        if not os.path.lexists(p):
            raise UsageError(f"{p}: {what} does not exist")


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--reference", type=click.Path(exists=True, path_type=Path), default=None,
              help="The checkpoint the suspect was fine-tuned from (enables the stronger update-based mode).")
@click.option("--calibration", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Calibration JSON from `projlens-defense calibrate` (default: the cached self-generated "
                   "calibration of the checkpoint's model, found by its reference's digest).")
@click.option("--format", "fmt", type=click.Choice(["text", "json", "sarif"]), default="text", show_default=True)
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the report here instead of stdout.")
@click.option("--lens-layers", type=click.IntRange(0, 64), default=2, show_default=True,
              help="Leading LLM layers the attention lens reads (0: plain embedding lens).")
def scan(paths: tuple[Path, ...], reference: Path | None, calibration: Path | None, fmt: str,
         output: Path | None, lens_layers: int) -> int:
    """Scan checkpoints (or folders of checkpoints) for a backdoored projector.

    Reads only the projector, the LLM embeddings / lm_head and the first LLM layers' value/output
    maps; never executes anything from a file. The verdict is taken at a threshold set for a stated
    false-positive rate against benign fine-tunes of the same model (the calibration). Without a
    calibration for the model, or without --reference, a scan that finds nothing says INCONCLUSIVE,
    not clean. Exit codes: 0 all clean, 1 something suspicious, 2 an error, 3 nothing scannable,
    4 usage error, 5 inconclusive (nothing suspicious, but not everything could be declared clean).
    """
    from .detectors.calibration import load_calibration
    from .detectors.scan import Scanner, exit_code

    _existing(paths)
    cal = load_calibration(calibration) if calibration else None
    scanner = Scanner(cal, reference=reference, ov_layers=lens_layers)
    results, skipped = scanner.scan_paths(paths)
    if fmt == "json":
        body = json.dumps([r.to_dict() for r in results], indent=2)
    elif fmt == "sarif":
        body = json.dumps(sarif_report(results), indent=2)
    else:
        body = text_report(results, skipped)
    _write(body, output)
    return exit_code(results)


@click.command()
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
@click.option("--fpr", type=click.FloatRange(1e-6, 0.5), default=0.01, show_default=True,
              help="False-positive rate the threshold is set for (Student-t prediction bound on the benign null).")
@click.option("--rule", type=click.Choice(["max", "mean"]), default="max", show_default=True,
              help="How the z-scores of the combined signals merge into one score.")
@click.option("--lens-layers", type=click.IntRange(0, 64), default=2, show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing --out file.")
def calibrate(more: tuple[Path, ...], benign: tuple[Path, ...], reference: Path | None, generate: int,
              data: Path | None, lr: float | None, epochs: float | None, seed: int, jobs: int, out: Path | None,
              fpr: float, rule: str, lens_layers: int, force: bool) -> int:
    """Fit decision thresholds from benign fine-tunes (the null distribution of this model).

    Either give benign fine-tunes you have, or let the tool make them:

      projlens-defense calibrate --reference base/ --data clean.json --generate 8

    A generated calibration is stored in the user cache under the reference projector's digest, and
    `scan`, `sanitize` and `analyze` use it for checkpoints fine-tuned from that reference.
    """
    from .detectors import DETECTORS
    from .detectors.calibration import WEIGHT_SPACE_DETECTORS, Calibration, fit_calibration
    from .detectors.loading import load_checkpoint
    from .detectors.scan import Scanner, find_checkpoints
    from .errors import NothingScannableError

    paths = list(benign) + list(more)
    if out is not None and out.exists() and not force:
        raise UsageError(f"{out}: output exists (use --force to replace it)")
    if generate:
        from .self_calibration import DEFAULT_EPOCHS, DEFAULT_LR, self_calibrate

        if paths:
            raise UsageError("give either benign fine-tunes or --generate N, not both")
        if reference is None or data is None:
            raise UsageError("--generate needs --reference (the model to fine-tune) and --data (clean training data)")
        cal, stored = self_calibrate(reference, data, generate, lr=lr or DEFAULT_LR, epochs=epochs or DEFAULT_EPOCHS,
                                     seed=seed, jobs=jobs, fpr=fpr, lens_layers=lens_layers)
        n = generate
    else:
        if not paths:
            raise UsageError("give benign fine-tunes with --benign CKPT... (at least 3), or --generate N")
        if out is None:
            raise UsageError("--out is required unless --generate stores the calibration in the cache")
        helper = Scanner(Calibration(null={}), reference=reference, ov_layers=lens_layers)
        inputs = []
        for p in paths:
            for c in find_checkpoints(p)[0]:
                try:
                    ck = load_checkpoint(c, readout=True, ov_layers=lens_layers)
                except NothingScannableError:
                    continue
                inputs.append(helper.build_input(ck, []))
        cal = fit_calibration(inputs, {n: DETECTORS[n] for n in WEIGHT_SPACE_DETECTORS}, fpr=fpr, rule=rule,
                              note=f"{len(inputs)} benign fine-tunes" + (f" of {reference}" if reference else ""))
        stored, n = None, len(inputs)
    d = cal.to_dict()
    if out is not None:
        _write(json.dumps(d, indent=1), out)
    for mode, thr in d["thresholds"].items():
        click.echo(f"{mode}: threshold z {thr:.3f} on {', '.join(cal.combine[mode])} (set for FPR {cal.fpr}; "
                   f"{n} benign, {d['benign_flagged_loo'][mode]} of them above it leave-one-out)")
    if stored is not None:
        click.echo(f"stored {stored}")
    if out is not None:
        click.echo(f"wrote {out}")
    return 0
