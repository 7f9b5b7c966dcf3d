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
    p = Path(path)
    return p.resolve().as_uri() if p.is_absolute() else p.as_posix()


def sarif_report(results: list, tool_version: str | None = None) -> dict[str, Any]:
    """A SARIF 2.1.0 log: one result per checkpoint (suspicious = error, scan error = warning, clean = pass)."""
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
        props = {"verdict": r.verdict, "score": r.score, "threshold": r.threshold, "format": r.format,
                 "mode": r.mode, "suspected_target_tokens": r.suspected_target_tokens}
        if r.verdict == "error":
            out.append({"ruleId": RULE_ERROR, "level": "warning", "kind": "fail",
                        "message": {"text": f"could not scan: {'; '.join(r.errors)}"}, "locations": loc,
                        "properties": props})
        elif r.verdict == "suspicious":
            toks = ", ".join(r.suspected_target_tokens[:5]) or "none named"
            out.append({"ruleId": RULE_BACKDOOR, "level": "error", "kind": "fail",
                        "message": {"text": f"projector backdoor suspected: score {_num(r.score)} > threshold "
                                            f"{_num(r.threshold)}; suspected target tokens: {toks}"},
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
            lines.append(f"  decision on: {used}")
        lines += _layer_lines(r)
        lines += [f"  error: {e}" for e in r.errors]
        lines += [f"  warning: {w}" for w in r.warnings]
    if skipped:
        lines.append(f"skipped {len(skipped)} entr{'y' if len(skipped) == 1 else 'ies'} that hold no checkpoint")
    n_s = sum(r.verdict == "suspicious" for r in results)
    n_e = sum(r.verdict == "error" for r in results)
    lines.append(f"{len(results)} checkpoint(s): {n_s} suspicious, {len(results) - n_s - n_e} clean, {n_e} error(s)")
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
              help="Calibration JSON from `projlens-defense calibrate` (default: the shipped zoo calibration).")
@click.option("--format", "fmt", type=click.Choice(["text", "json", "sarif"]), default="text", show_default=True)
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the report here instead of stdout.")
@click.option("--lens-layers", type=click.IntRange(0, 64), default=2, show_default=True,
              help="Leading LLM layers the attention lens reads (0: plain embedding lens).")
def scan(paths: tuple[Path, ...], reference: Path | None, calibration: Path | None, fmt: str,
         output: Path | None, lens_layers: int) -> int:
    """Scan checkpoints (or folders of checkpoints) for a backdoored projector.

    Reads only the projector, the LLM embeddings / lm_head and the first LLM layers' value/output
    maps; never executes anything from a file. Exit codes: 0 all clean, 1 something suspicious,
    2 an error, 3 nothing scannable, 4 usage error.
    """
    from .detectors.calibration import default_calibration, load_calibration
    from .detectors.scan import Scanner, exit_code

    _existing(paths)
    cal = load_calibration(calibration) if calibration else default_calibration()
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
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Calibration JSON to write.")
@click.option("--margin", type=float, default=1.0, show_default=True,
              help="Added to the largest benign score (in benign standard deviations) to form the threshold.")
@click.option("--rule", type=click.Choice(["max", "mean"]), default="max", show_default=True,
              help="How the z-scores of the combined signals merge into one score.")
@click.option("--lens-layers", type=click.IntRange(0, 64), default=2, show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing --out file.")
def calibrate(more: tuple[Path, ...], benign: tuple[Path, ...], reference: Path | None, out: Path, margin: float,
              rule: str, lens_layers: int, force: bool) -> int:
    """Fit decision thresholds from benign fine-tunes (the null distribution) and write them as JSON.

    Example: projlens-defense calibrate --benign runs/benign-* --reference base/ --out calibration.json
    """
    from .detectors import DETECTORS
    from .detectors.calibration import WEIGHT_SPACE_DETECTORS, Calibration, fit_calibration
    from .detectors.loading import load_checkpoint
    from .detectors.scan import Scanner, find_checkpoints
    from .errors import NothingScannableError

    paths = list(benign) + list(more)
    if not paths:
        raise UsageError("give benign fine-tunes with --benign CKPT... (at least 3)")
    if out.exists() and not force:
        raise UsageError(f"{out}: output exists (use --force to replace it)")
    helper = Scanner(Calibration(null={}), reference=reference, ov_layers=lens_layers)
    inputs = []
    for p in paths:
        for c in find_checkpoints(p)[0]:
            try:
                ck = load_checkpoint(c, readout=True, ov_layers=lens_layers)
            except NothingScannableError:
                continue
            inputs.append(helper.build_input(ck, []))
    cal = fit_calibration(inputs, {n: DETECTORS[n] for n in WEIGHT_SPACE_DETECTORS}, margin=margin, rule=rule,
                          note=f"{len(inputs)} benign fine-tunes" + (f" of {reference}" if reference else ""))
    _write(json.dumps(cal.to_dict(), indent=1), out)
    for mode, thr in cal.to_dict()["thresholds"].items():
        click.echo(f"{mode}: threshold {thr:.3f} on {', '.join(cal.combine[mode])} "
                   f"({len(inputs)} benign, rule {rule}, margin {margin})")
    click.echo(f"wrote {out}")
    return 0
