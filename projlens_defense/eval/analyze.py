"""The `analyze` report: the two ProjLens findings measured on one checkpoint, as Markdown + PNG figures + JSON.

1. Low-rank structure: singular spectra of dW per layer (suspect vs benign fine-tunes) and, when
   the trigger is known, top-k **injection** (reference + top-k components of dW) and **ablation**
   (suspect - top-k) curves of ASR and clean accuracy. With benign fine-tunes, a second,
   *task-removed* decomposition first splits off the part of dW inside the benign updates'
   top subspace (the downstream task every fine-tune learns): injection = reference + task part +
   top-k of the rest, ablation = suspect - top-k of the rest.
2. Activation mechanism: the output shift on clean probes, its dominant direction, the logit-lens
   reading of that direction, the shift-vs-input-norm regression (per token and per image) and,
   when the trigger is known, where triggered inputs fall.

Everything is evaluated in-process on vision features computed once; test sets are subsampled to
``max_test`` samples (the report says so).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..attacks.evaluate import EvalSet, evaluate, prepare_eval_set
from ..attacks.variants import Variant, get_variant
from ..checkpoint import load_projector
from ..conversations import load_conversations
from ..detectors.activation import ActivationDetector, _align, fit_line, output_shift
from ..detectors.base import ScanInput
from ..detectors.input_level import ShiftInputDetector
from ..detectors.loading import load_checkpoint
from ..detectors.probes import EXTRA_PROBES
from ..errors import CheckpointError, UsageError
from ..jsonsafe import finite
from ..metrics import auroc
from ..projector import Projector
from ..runinfo import AttackRecord, environment, read_attack_record
from .lowrank import LowRankUpdate, ProjectorModule, resolve_layers

__all__ = ["AnalyzeOptions", "TaskRemovedUpdate", "analyze_checkpoint", "variant_from_record"]

FIGURES = {"spectra": "spectra.png", "curves": "topk_curves.png", "shift": "shift_vs_norm.png"}


@dataclass
class AnalyzeOptions:
    """Knobs of the analysis; the defaults finish in well under 2 minutes on the zoo with 2 cores."""

    k_values: tuple[int, ...] = (0, 1, 2, 3, 4, 6, 8)
    layers: str = "all"
    n_probes: int = 64
    max_test: int = 200
    task_rank: int = 8
    benign_rank: int = 4
    excite: bool = True
    input_k: int = 8
    spectrum_values: int = 32
    seed: int = 0


def variant_from_record(rec: AttackRecord | None) -> Variant | None:
    """The backdoor variant an ``attack.json`` record was trained with (its exact trigger parameters); for a
    benign control the variant it is measured with, if any."""
    if rec is None:
        return None
    name = rec.variant
    if name == "none":
        return get_variant(rec.eval_variant) if rec.eval_variant else None
    params = rec.variant_params
    trigger = params.get("trigger") if isinstance(params.get("trigger"), dict) else {}
    behaviour = params.get("behaviour") if isinstance(params.get("behaviour"), dict) else {}
    trig = {k: v for k, v in trigger.items() if k != "type"}
    target = behaviour.get("target") or rec.target
    try:
        return get_variant(name, target, {k: v for k, v in trig.items() if not isinstance(v, dict)})
    except UsageError:
        return get_variant(name, target)


class TaskRemovedUpdate(LowRankUpdate):
    """dW split into a task part (inside the benign updates' top-``task_rank`` output subspace, per layer)
    and the rest, whose top-k components are injected / ablated."""

    def __init__(self, suspect: Projector, reference: Projector, benign: Sequence[Projector], max_k: int = 8,
                 task_rank: int = 8, layers: str | Sequence[int] = "all", seed: int = 0) -> None:
        from ..detectors.base import top_singular

        self.suspect, self.reference, self.max_k = suspect, reference, max_k
        self.layers = resolve_layers(layers, suspect.num_layers)
        full = suspect.delta(reference)
        bdel = [b.delta(reference) for b in benign]
        self.task: list[torch.Tensor] = []
        self.deltas = []
        for i, dw in enumerate(full):
            stack = torch.cat([d[i] / d[i].norm().clamp_min(1e-12) for d in bdel], 1)
            u = torch.linalg.svd(stack, full_matrices=False)[0][:, :task_rank]
            t = u @ (u.T @ dw)
            self.task.append(t)
            self.deltas.append(dw - t)
        self.svd = {i: top_singular(self.deltas[i], max_k, seed=seed) for i in self.layers}

    def inject(self, k: int) -> Projector:
        ws = [layer.weight.float().clone() for layer in self.reference.layers]
        for i in self.layers:
            ws[i] = ws[i] + self.task[i] + self.top(i, k)
        return self.reference.with_weights(ws)


# ----------------------------------------------------------------------------- pieces
def _spectra(suspect: Projector, reference: Projector, benign: dict[str, Projector], n: int) -> dict[str, Any]:
    out: dict[str, Any] = {"layers": [suspect.layer_name(i) for i in range(suspect.num_layers)], "suspect": [],
                           "benign": {name: [] for name in benign}}
    for name, proj in [("suspect", suspect), *benign.items()]:
        for dw in proj.delta(reference):
            s = torch.linalg.svdvals(dw.float()) if min(dw.shape) <= 1024 else torch.svd_lowrank(dw.float(), q=n)[1]
            e = s.double() ** 2
            stats = {"values": [round(float(x), 6) for x in s[:n]], "fro": float(e.sum().sqrt()),
                     "top1_energy": float(e[0] / e.sum()) if float(e.sum()) > 0 else 0.0,
                     "top5_energy": float(e[:5].sum() / e.sum()) if float(e.sum()) > 0 else 0.0}
            (out["suspect"] if name == "suspect" else out["benign"][name]).append(stats)
    return out


def _curve(rt: Any, es: EvalSet, upd: LowRankUpdate, ks: Sequence[int]) -> dict[str, list[float | None]]:
    res: dict[str, list[float | None]] = {"k": list(ks), "inject_asr": [], "inject_clean": [], "ablate_asr": [],
                                          "ablate_clean": []}
    for k in ks:
        for kind, proj in (("inject", upd.inject(k)), ("ablate", upd.ablate(k))):
            r = evaluate(rt, es, projector=ProjectorModule(proj))
            res[f"{kind}_asr"].append(r.asr)
            res[f"{kind}_clean"].append(r.clean_accuracy)
    return res


def _first_k(curve: dict[str, list[Any]], full_asr: float | None, full_clean: float) -> dict[str, Any]:
    """Smallest k meeting each ProjLens criterion (injection >= 90% of ASR; ablation <= 5% ASR at <= 2 pt cost)."""
    out: dict[str, Any] = {"inject_k": None, "ablate_k": None, "both_k": None}
    if full_asr is None:
        return out
    for i, k in enumerate(curve["k"]):
        inj = curve["inject_asr"][i]
        abl, acc = curve["ablate_asr"][i], curve["ablate_clean"][i]
        ok_inj = k > 0 and inj is not None and inj >= 0.9 * full_asr
        ok_abl = k > 0 and abl is not None and abl <= 0.05 and acc >= full_clean - 0.02
        if ok_inj and out["inject_k"] is None:
            out["inject_k"] = k
        if ok_abl and out["ablate_k"] is None:
            out["ablate_k"] = k
        if ok_inj and ok_abl and out["both_k"] is None:
            out["both_k"] = k
    return out


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


# ----------------------------------------------------------------------------- figures
def _plots(out: Path, rep: dict[str, Any], scatter: dict[str, Any]) -> dict[str, str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("analyze needs matplotlib for its figures: pip install 'projlens-defense[plot]'") from None
    files = {}
    sp = rep["spectra"]
    n_layers = len(sp["layers"])
    fig, axes = plt.subplots(1, n_layers, figsize=(4.2 * n_layers, 3.4), squeeze=False)
    for i, name in enumerate(sp["layers"]):
        ax = axes[0][i]
        v = sp["suspect"][i]["values"]
        ax.semilogy(range(1, len(v) + 1), v, "o-", ms=3, color="C3", label="suspect")
        for j, layers in enumerate(sp["benign"].values()):
            bv = layers[i]["values"]
            ax.semilogy(range(1, len(bv) + 1), bv, ".--", ms=2, color="C0", alpha=0.6,
                        label="benign" if j == 0 else None)
        ax.set_title(f"dW singular values: {name}", fontsize=9)
        ax.set_xlabel("component")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / FIGURES["spectra"], dpi=110)
    plt.close(fig)
    files["spectra"] = FIGURES["spectra"]

    curves = rep.get("curves") or {}
    if curves:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        for (dname, c), color in zip(curves.items(), ("C3", "C2"), strict=False):
            if c["inject_asr"][0] is not None:
                axes[0].plot(c["k"], c["inject_asr"], "o-", color=color, label=f"inject ASR ({dname})")
                axes[1].plot(c["k"], c["ablate_asr"], "o-", color=color, label=f"ablate ASR ({dname})")
            axes[0].plot(c["k"], c["inject_clean"], "s:", color=color, alpha=0.6, label=f"inject clean acc ({dname})")
            axes[1].plot(c["k"], c["ablate_clean"], "s:", color=color, alpha=0.6, label=f"ablate clean acc ({dname})")
        axes[0].set_title("reference + top-k components of dW")
        axes[1].set_title("fine-tuned - top-k components of dW")
        for ax in axes:
            ax.set_xlabel("k")
            ax.set_ylim(-0.03, 1.03)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / FIGURES["curves"], dpi=110)
        plt.close(fig)
        files["curves"] = FIGURES["curves"]

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for key, color, label in (("probe", "C0", "clean probes"), ("clean", "C2", "clean test"),
                              ("triggered", "C3", "triggered test")):
        d = scatter.get(key)
        if d is None:
            continue
        axes[0].scatter(d["norm"].reshape(-1), d["proj"].reshape(-1), s=2, alpha=0.25, color=color, label=label)
        axes[1].scatter(d["norm"].mean(1), d["proj"].mean(1), s=8, alpha=0.6, color=color, label=label)
    for ax, fit, what in ((axes[0], rep["shift"]["per_token"], "token"), (axes[1], rep["shift"]["per_image"], "image")):
        xs = np.array(ax.get_xlim())
        ax.plot(xs, fit["slope"] * xs + fit["intercept"], "k-", lw=1,
                label=f"fit on probes: slope {fit['slope']:.3g}, R² {fit['r2']:.2f}")
        ax.set_xlabel(f"input feature norm (per {what})")
        ax.set_ylabel("shift along dominant direction")
        ax.legend(fontsize=7, markerscale=3)
    fig.tight_layout()
    fig.savefig(out / FIGURES["shift"], dpi=110)
    plt.close(fig)
    files["shift"] = FIGURES["shift"]
    return files


# ----------------------------------------------------------------------------- report text
def _markdown(rep: dict[str, Any]) -> str:
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
    return "\n".join(L) + "\n"


# ----------------------------------------------------------------------------- main entry
def _runtime_dir(ck: Any, checkpoint: Path, reference: Path) -> Path:
    """The HF LLaVA dir whose vision tower and LLM run the projectors: the checkpoint's own, else the reference.

    Only an ``hf-llava`` checkpoint is a model dir: an original-LLaVA ``mm_projector`` dir also has a
    ``config.json``, but no LLM.
    """
    if ck.info.format == "hf-llava" and ck.info.root is not None:
        return checkpoint
    if ck.info.format == "qwen2-vl-merger" and (checkpoint / "config.json").is_file():  # a whole Qwen2-VL model dir
        return checkpoint
    if (reference / "config.json").is_file():
        return reference
    raise UsageError(f"{checkpoint}: analyze runs the projector inside its model, but neither this "
                     f"{ck.info.format} checkpoint nor the reference {reference} is a Hugging Face LLaVA or "
                     "Qwen2-VL directory")


def analyze_checkpoint(checkpoint: Path, reference: Path, out: Path, test_data: Path, probe_data: Path,
                       benign: Sequence[Path] = (), variant: str | None = None,
                       options: AnalyzeOptions | None = None,
                       device: str | torch.device | None = "cpu", dtype: str | torch.dtype | None = "float32",
                       ) -> dict[str, Any]:
    """Run the analysis and write ``report.md``, ``report.json`` and the PNG figures into ``out``: ASR curves on
    ``test_data``, shifts on the clean images of ``probe_data`` (both LLaVA conversation JSON).

    ``device`` / ``dtype`` place the LLaVA model that runs the curves (see
    :meth:`~projlens_defense.runtime.LlavaRuntime.from_pretrained`); the weight-space analyses stay on the CPU."""
    from ..runtime import LlavaRuntime

    opt = options or AnalyzeOptions()
    t0 = time.perf_counter()
    checkpoint, reference, out = Path(checkpoint), Path(reference), Path(out)
    ck = load_checkpoint(checkpoint)
    ref = load_projector(reference)
    sus = ck.projector
    run_dir = _runtime_dir(ck, checkpoint, reference)
    bproj = {str(b): load_projector(b) for b in benign}
    for name, b in bproj.items():
        if [lay.weight.shape for lay in b.layers] != [lay.weight.shape for lay in sus.layers]:
            raise UsageError(f"{name}: benign projector shapes differ from the suspect's")
    # trigger knowledge
    try:
        rec = read_attack_record(checkpoint)
    except CheckpointError:
        rec = None
    if variant:
        var, source = get_variant(variant), "--variant"
    elif rec is not None:
        var = variant_from_record(rec)
        source = "attack.json" if var is not None else "none (attack.json says benign)"
    else:
        var, source = None, "none"
    rt = LlavaRuntime.from_pretrained(run_dir, device=device, dtype=dtype)
    probes_s = load_conversations(probe_data, limit=opt.n_probes)
    probes = rt.vision_features([s.image for s in probes_s])
    test_all = load_conversations(test_data)
    test = test_all[: opt.max_test]
    es = prepare_eval_set(rt, test, var, opt.seed)
    out.mkdir(parents=True, exist_ok=True)

    rep: dict[str, Any] = {
        "checkpoint": str(checkpoint), "reference": str(reference), "benign": list(bproj),
        "trigger": {"source": source, "variant": var.name if var else None,
                    "target": var.behaviour.target if var else None},
        "data": {"probe_data": str(probe_data), "n_probes": len(probes_s), "test_data": str(test_data),
                 "n_test": len(test), "n_test_total": len(test_all), "n_triggered": len(es.eligible) if var else 0,
                 "subsampled": len(test) < len(test_all)},
        "options": asdict(opt),
    }
    # 1. spectra and curves
    rep["spectra"] = _spectra(sus, ref, bproj, opt.spectrum_values)
    ft = evaluate(rt, es, projector=ProjectorModule(sus))
    rep["fine_tuned"] = ft.to_dict()
    rep["reference_metrics"] = evaluate(rt, es, projector=ProjectorModule(ref)).to_dict()
    ks = sorted({int(k) for k in opt.k_values if k >= 0})
    max_k = max(ks + [1])
    rep["curves"], rep["criteria"] = {}, {}
    decomps: list[tuple[str, LowRankUpdate]] = [("plain", LowRankUpdate(sus, ref, max_k, opt.layers, opt.seed))]
    if bproj:
        decomps.append(("task-removed", TaskRemovedUpdate(sus, ref, list(bproj.values()), max_k, opt.task_rank,
                                                          opt.layers, opt.seed)))
    for dname, upd in decomps:
        c = _curve(rt, es, upd, ks)
        rep["curves"][dname] = c
        rep["criteria"][dname] = _first_k(c, ft.asr, ft.clean_accuracy)

    # 2. activation analysis
    lens_src = ck
    if ck.readout is None:  # a bare projector file: read the lens through the reference's LLM
        lens_src = load_checkpoint(reference)
        rep["notes"] = ["no LLM weights in the checkpoint: the logit lens reads the reference's LLM"]

    def scan_input(p: Projector) -> ScanInput:
        return ScanInput(projector=p, reference=ref, readout=lens_src.readout, ov_layers=lens_src.ov_layers,
                         final_norm=lens_src.final_norm, vocab=ck.vocab or lens_src.vocab, path=str(checkpoint),
                         extras={EXTRA_PROBES: probes})

    det = ActivationDetector(benign_rank=opt.benign_rank, excite=opt.excite)
    binps = [scan_input(b) for b in bproj.values()]
    if len(binps) >= 3:
        det.fit(binps)
    elif binps:
        det.fit_basis(binps)
    inp = scan_input(sus)
    report = det.score(inp)
    signals, a, e, _reading, _nov = det.measure(inp)
    direction = e.direction if e is not None else a.direction
    act: dict[str, Any] = {"direction": report.evidence["direction"], "signals": report.signals,
                           "ranking": report.evidence.get("ranking"), "reading": report.evidence.get("reading"),
                           "top_tokens": report.evidence.get("top_tokens", []),
                           "per_direction": report.evidence.get("per_direction", {}),
                           "excitation": report.evidence.get("excitation")}
    if var is not None and report.evidence.get("top_tokens"):
        word = var.behaviour.target.split()[0].lower()
        ranked = [t["token"].lower() for t in report.evidence["top_tokens"]]
        act["target_rank"] = ranked.index(word) + 1 if word in ranked else None
    rep["activation"] = act
    if "verdict" in report.evidence:
        rep["model_score"] = {"score": report.signals["act.score"], "threshold": report.evidence["threshold"],
                              "verdict": report.evidence["verdict"], "n_benign": len(binps)}
    # shift along the dominant direction vs input norm
    shift_p, norm_p = _align(output_shift(sus, ref, probes), probes.float())  # a merger: 4 patches per token
    proj_p = shift_p @ direction
    shift_rep = a.summary()
    shift_rep["per_token"] = fit_line(norm_p, proj_p).to_dict()
    shift_rep["per_image"] = fit_line(norm_p.mean(1), proj_p.mean(1)).to_dict()
    rep["shift"] = shift_rep
    scatter: dict[str, Any] = {"probe": {"norm": norm_p.numpy(), "proj": proj_p.numpy()}}
    def token_norm_proj(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per LLM image token: input norm and shift along the direction, [N, T'] each (a merger joins 4 patches)."""
        sh, nrm = _align(output_shift(sus, ref, x), x.float())
        return nrm, sh @ direction

    cf = es.clean_features
    c_norm, c_proj = token_norm_proj(cf)
    scatter["clean"] = {"norm": c_norm.numpy(), "proj": c_proj.numpy()}
    if es.triggered_features is not None:
        tf = es.triggered_features
        t_norm, t_proj = token_norm_proj(tf)
        scatter["triggered"] = {"norm": t_norm.numpy(), "proj": t_proj.numpy()}
        cn, tn = c_norm[es.eligible], t_norm
        cp, tp = scatter["clean"]["proj"][es.eligible], scatter["triggered"]["proj"]
        rep["norms"] = {
            "clean_token_mean": float(cn.mean()), "triggered_token_mean": float(tn.mean()),
            "auroc_mean_norm": auroc(tn.mean(1).tolist(), cn.mean(1).tolist()),
            "auroc_max_norm": auroc(tn.amax(1).tolist(), cn.amax(1).tolist()),
            "clean_proj_mean": float(cp.mean()), "triggered_proj_mean": float(tp.mean()),
            "triggered_fit_per_image": fit_line(tn.mean(1), torch.from_numpy(tp).mean(1)).to_dict(),
        }
        # input-level detector calibrated on clean probes only
        idet = ShiftInputDetector(k=opt.input_k).setup(sus, ref).calibrate_features(probes)
        sc, st = idet.score_features(cf), idet.score_features(tf)
        rep["input_level"] = {"auroc": auroc(st.tolist(), sc.tolist()), "threshold": idet.threshold,
                              "tpr": float((st > idet.threshold).mean()), "fpr": float((sc > idet.threshold).mean())}
    rep["figures"] = _plots(out, rep, scatter)
    rep["wall_time_s"] = time.perf_counter() - t0
    rep["environment"] = environment()
    (out / "report.md").write_text(_markdown(rep))
    (out / "report.json").write_text(json.dumps(finite(rep), indent=1) + "\n")
    return rep
