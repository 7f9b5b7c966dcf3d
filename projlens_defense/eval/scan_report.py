"""Rendering scan results: the human-readable table and SARIF 2.1.0 (computation stays in detectors.scan)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..checkpoint.scope import Scope
from ..detectors.scan import ScanResult
from ..jsonsafe import finite

SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
RULE_BACKDOOR = "PLD001"
RULE_ERROR = "PLD002"
INFO_URI = "https://arxiv.org/abs/2604.19083"


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


def sarif_report(results: Sequence[ScanResult], tool_version: str | None = None) -> dict[str, Any]:
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
        props = finite({"verdict": r.verdict, "score": r.score, "threshold": r.threshold, "format": r.format,
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


def _layer_lines(r: ScanResult) -> list[str]:
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


def text_report(results: Sequence[ScanResult], skipped: Sequence[str] = ()) -> str:
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
        if r.scope:
            lines.append(f"  scope: {Scope(**r.scope).summary()}")
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
