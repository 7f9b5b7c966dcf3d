"""The `analyze` report written out: Markdown text, JSON data and the figures, from an :class:`Analysis`."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from ..jsonsafe import finite
from ..runinfo import environment
from .analyze import Analysis
from .analyze_figures import FIGURES, plot_figures

__all__ = ["render_markdown", "write_report"]


def write_report(analysis: Analysis, out: Path) -> dict[str, Any]:
    """Write ``report.md``, ``report.json`` and the PNG figures of ``analysis`` into ``out``; returns the report
    data as written (with the figures' file names, the wall time and the environment)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = analysis.to_dict()
    figures = plot_figures(out, data, analysis.scatter)
    rep = {**data, "figures": figures, "wall_time_s": analysis.seconds + time.perf_counter() - t0,
           "environment": environment()}
    (out / "report.md").write_text(render_markdown(rep))
    (out / "report.json").write_text(json.dumps(finite(rep), indent=1) + "\n")
    return rep


def _task_note(dname: str, ref_clean: float | None, ft_clean: float | None, has_task_removed: bool) -> list[str]:
    """Why a plain ablation costs clean accuracy when the reference itself cannot do the test task."""
    if dname != "plain" or ref_clean is None or ft_clean is None or ft_clean - ref_clean <= 0.02:
        return []
    hint = ("compare the task-removed curves below" if has_task_removed
            else "pass benign fine-tunes (--benign) to split the task part off (task-removed curves)")
    return [f"The reference scores {ref_clean:.3f} clean accuracy against {ft_clean:.3f} for the fine-tune: the "
            "fine-tune taught the task, and the top components of dW carry that adaptation as well as any "
            f"backdoor, so removing them costs clean accuracy; {hint}.\n"]


def _fmt(x: Any, nd: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def render_markdown(rep: dict[str, Any]) -> str:
    """The report as Markdown (``rep``: the report data with its figures and wall time)."""
    L: list[str] = []
    L.append(f"# ProjLens analysis of `{rep['checkpoint']}`\n")
    L.append(f"- reference: `{rep['reference']}`")
    L.append(f"- benign fine-tunes for comparison: {len(rep['benign'])}" + (
        "".join(f"\n  - `{b}`" for b in rep["benign"])))
    trig = rep["trigger"]
    L.append(f"- trigger knowledge: {trig['source']}" + (f" (variant `{trig['variant']}`, target "
                                                         f"\"{trig['target']}\")" if trig["variant"] else ""))
    d = rep["data"]
    L.append(f"- clean probes: {d['n_probes']} images from `{d['probe_data']}`")
    if d["test_data"]:
        L.append(f"- test set: {d['n_test']} of {d['n_test_total']} samples from `{d['test_data']}`"
                 + (f" (**subsampled** to {d['n_test']} to stay under 2 minutes)" if d["n_test"] < d["n_test_total"] else "")
                 + f"; {d['n_triggered']} triggered")
    L.extend(f"- note: {n}" for n in rep.get("notes", []))
    L.append(f"- wall time: {rep['wall_time_s']:.1f} s\n")
    fm = rep.get("fine_tuned")
    if fm:
        L.append(f"Fine-tuned checkpoint on this test set: clean accuracy {_fmt(fm['clean_accuracy'])}, "
                 f"ASR {_fmt(fm['asr'])}, false activation {_fmt(fm['false_activation'])}; reference projector: "
                 f"clean accuracy {_fmt(rep['reference_metrics']['clean_accuracy'])}, ASR {_fmt(rep['reference_metrics']['asr'])}.\n")

    L.append("## 1. Low-rank structure of dW\n")
    L.append(f"![singular spectra]({FIGURES['spectra']})\n")
    L.append("| model | layer | ‖dW‖_F | σ1 | σ2 | σ3 | top-1 energy | top-5 energy |")
    L.append("|---|---|---|---|---|---|---|---|")
    sp = rep["spectra"]
    rows = [("suspect", sp["suspect"])] + list(sp["benign"].items())
    for name, layers in rows:
        for i, st in enumerate(layers):
            v = st["values"] + [float("nan")] * 3
            L.append(f"| {Path(name).name if name != 'suspect' else 'suspect'} | {sp['layers'][i]} | {st['fro']:.3g} | "
                     f"{v[0]:.3g} | {v[1]:.3g} | {v[2]:.3g} | {st['top1_energy']:.3f} | {st['top5_energy']:.3f} |")
    L.append("")
    curves = rep.get("curves") or {}
    if curves:
        L.append(f"![top-k injection and ablation]({FIGURES['curves']})\n")
        L.append(f"Layers: {rep['options']['layers']}. *plain*: top-k singular components of dW = W_ft - W_ref. "
                 "*task-removed* (with benign fine-tunes): dW minus its projection on the benign updates' top "
                 f"{rep['options']['task_rank']} output directions per layer; injection adds that task part back.\n")
        for dname, c in curves.items():
            L.append(f"**{dname}**\n")
            L.append("| k | inject ASR | inject clean acc | ablate ASR | ablate clean acc |")
            L.append("|---|---|---|---|---|")
            for i, k in enumerate(c["k"]):
                L.append(f"| {k} | {_fmt(c['inject_asr'][i])} | {_fmt(c['inject_clean'][i])} | "
                         f"{_fmt(c['ablate_asr'][i])} | {_fmt(c['ablate_clean'][i])} |")
            crit = rep["criteria"].get(dname, {})
            if trig["variant"]:
                L.append(f"\nSmallest k with injection >= 90% of the fine-tuned ASR: {_fmt(crit.get('inject_k'))}; "
                         f"with ablation ASR <= 5% at <= 2 points of clean accuracy: {_fmt(crit.get('ablate_k'))}; "
                         f"both: {_fmt(crit.get('both_k'))}.\n")
            else:
                L.append("")
            L.extend(_task_note(dname, rep["reference_metrics"].get("clean_accuracy"),
                                rep["fine_tuned"].get("clean_accuracy"), "task-removed" in curves))
    else:
        L.append("No test data: injection / ablation curves not measured.\n")

    L.append("## 2. Activation mechanism\n")
    sh = rep["shift"]
    act = rep["activation"]
    L.append(f"Output shift P_ft(x) - P_ref(x) on {d['n_probes']} clean probes ({sh['n_tokens']} image tokens); "
             f"benign task subspace removed: rank {sh['benign_subspace_rank']}; share of shift energy outside it: "
             f"{sh['residual_energy']:.3f}. Dominant direction: **{act['direction']}**"
             + (f" (trigger-free excitation: bounded feature perturbation, gain {act['excitation']['gain']:.2f})"
                if act.get("excitation") else " (mean shift of the clean probes)") + ".\n")
    if not sh["benign_subspace_rank"]:
        L.append("No benign fine-tune given (--benign): the dominant direction still contains the downstream-task "
                 "adaptation every fine-tune of this task makes, so the lens below mostly names task answer words.\n")
    L.append(f"![shift vs norm]({FIGURES['shift']})\n")
    L.append("| regression of shift on input norm | slope | intercept | R² | n |")
    L.append("|---|---|---|---|---|")
    for key in ("per_token", "per_image"):
        f = sh[key]
        L.append(f"| {key.replace('_', ' ')} (clean probes) | {f['slope']:.4g} | {f['intercept']:.4g} | {f['r2']:.3f} | {f['n']} |")
    nm = rep.get("norms")
    if nm:
        L.append("")
        L.append(f"Input feature norms: clean test mean token norm {nm['clean_token_mean']:.3f}, triggered "
                 f"{nm['triggered_token_mean']:.3f} (AUROC of the image's mean token norm, triggered vs clean: "
                 f"{nm['auroc_mean_norm']:.3f}; of its largest token norm: {nm['auroc_max_norm']:.3f}). "
                 f"Shift along the dominant direction: clean {nm['clean_proj_mean']:.3f}, triggered "
                 f"{nm['triggered_proj_mean']:.3f}. "
                 + ("Triggered inputs sit at **larger** norms, as the paper describes."
                    if nm["triggered_token_mean"] > nm["clean_token_mean"] and nm["auroc_mean_norm"] > 0.6 else
                    "Triggered inputs do **not** sit clearly at larger norms here (the paper reports they do).")
                 + (" But the shift does not grow linearly with the norm (per-image R² "
                    f"{sh['per_image']['r2']:.2f} on clean probes): the trigger acts through the direction of its "
                    "features, not their size." if sh["per_image"]["r2"] < 0.3 else ""))
    L.append("\n### Logit lens of the dominant direction\n")
    lens = act.get("top_tokens") or []
    if lens:
        cols = [c for c in ("relative", "novelty") if c in lens[0]]
        names = {"relative": "z - benign mean", "novelty": "novelty vs benign"}
        L.append("| rank | token | z |" + "".join(f" {names[c]} |" for c in cols))
        L.append("|---|---|---|" + "---|" * len(cols))
        for i, t in enumerate(lens):
            L.append(f"| {i + 1} | `{t['token']}` | {t['z']:.2f} |" + "".join(f" {t[c]:.2f} |" for c in cols))
        L.append(f"\nRanked by {act.get('ranking') or 'z'}; lens reading: {act.get('reading')} "
                 "(attention = the first LLM layers' value-output maps read by lm_head).")
        if trig["target"]:
            L.append(f"\nTarget's first word `{trig['target'].split()[0]}`: rank {_fmt(act.get('target_rank'))} "
                     "in this reading.")
        other = act.get("per_direction") or {}
        if other:
            L.append("\nOther directions (top 5 tokens): " + "; ".join(
                f"{k.split(':')[-1].rstrip('+')}: {', '.join(v)}" for k, v in other.items()))
    else:
        L.append("No LLM read-out in the checkpoint: no logit lens.")
    L.append("")
    ms = rep.get("model_score")
    if ms:
        L.append(f"Model-level activation score: {ms['score']:.2f} (threshold {ms['threshold']:.2f} from "
                 f"{ms['n_benign']} benign fine-tunes, leave-one-out): **{ms['verdict']}**. Signals: "
                 + ", ".join(f"{k} {v:.3f}" for k, v in rep['activation']['signals'].items()) + "\n")
    else:
        L.append("Signals: " + ", ".join(f"{k} {v:.3f}" for k, v in act["signals"].items())
                 + " (no calibrated verdict: needs >= 3 benign fine-tunes via --benign).\n")
    il = rep.get("input_level")
    if il:
        L.append(f"Input-level detector (input-shift, calibrated on the {d['n_probes']} clean probes only): "
                 f"AUROC triggered vs clean {il['auroc']:.3f}, flagged {il['tpr']:.3f} of triggered and "
                 f"{il['fpr']:.3f} of clean test inputs at threshold {il['threshold']:.3f}.\n")
        for name, e in (il.get("detectors") or {}).items():
            L.append(f"- {name}: AUROC triggered vs clean {e['auroc']:.3f}"
                     + (f" (flagged {e['threshold_tpr']:.3f} / {e['threshold_fpr']:.3f} at its threshold)"
                        if e.get("threshold_tpr") is not None and e.get("threshold_fpr") is not None else "") + "\n")
    return "\n".join(L) + "\n"
