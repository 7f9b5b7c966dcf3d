"""The `analyze` computation: the two ProjLens findings measured on one checkpoint (an :class:`Analysis`;
:mod:`~projlens_defense.eval.analyze_report` writes it as Markdown + PNG figures + JSON).

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

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from ..attacks.evaluate import EvalSet, evaluate, prepare_eval_set
from ..attacks.variants import Variant, get_variant
from ..checkpoint import load_projector
from ..conversations import load_conversations
from ..detectors.activation import ActivationDetector, _align, fit_line, output_shift
from ..detectors.input_level import ShiftInputDetector
from ..detectors.loading import load_checkpoint
from ..errors import CheckpointError, UsageError
from ..linalg import singular_values
from ..metrics import auroc
from ..projector import Projector, ProjectorModule
from ..runinfo import AttackRecord, read_attack_record
from ..scan_input import ProbeData, ScanInput
from .input_detection import run_input_detectors
from .lowrank import LowRankUpdate, TaskRemovedUpdate

__all__ = ["Analysis", "AnalyzeOptions", "analyze_checkpoint", "variant_from_record"]


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
    input_detectors: tuple[str, ...] = ()  # registered input-level detectors also scored, triggered vs clean test inputs
    input_images: int = 32  # clean and triggered test images each image-level one (STRIP) scores


@dataclass
class Analysis:
    """What :func:`analyze_checkpoint` measured (each section JSON-able; :meth:`to_dict` is ``report.json``
    without the figures, wall time and environment the writer adds).

    ``trigger``: where the trigger knowledge came from; ``data``: probe and test data used; ``spectra``: dW
    singular values per layer, suspect and benign; ``fine_tuned`` / ``reference_metrics``: metrics of the two
    projectors on the test set; ``curves`` / ``criteria``: top-k injection / ablation curves and the smallest k
    meeting each ProjLens criterion, per decomposition (``plain``, ``task-removed``); ``notes``; ``activation``:
    the dominant shift direction and its lens reading; ``model_score``: the calibrated activation verdict (with
    >= 3 benign fine-tunes); ``shift``: shift-vs-norm regressions; ``norms`` / ``input_level``: triggered vs clean
    inputs (with a known trigger). ``scatter``: the per-token input norms and shifts the figure plots (arrays by
    ``probe`` / ``clean`` / ``triggered``); ``seconds``: the time it took.
    """

    checkpoint: str
    reference: str
    benign: list[str]
    trigger: dict[str, Any]
    data: dict[str, Any]
    options: dict[str, Any]
    spectra: dict[str, Any] = field(default_factory=dict)
    fine_tuned: dict[str, Any] = field(default_factory=dict)
    reference_metrics: dict[str, Any] = field(default_factory=dict)
    curves: dict[str, Any] = field(default_factory=dict)
    criteria: dict[str, Any] = field(default_factory=dict)
    notes: list[str] | None = None
    activation: dict[str, Any] = field(default_factory=dict)
    model_score: dict[str, Any] | None = None
    shift: dict[str, Any] = field(default_factory=dict)
    norms: dict[str, Any] | None = None
    input_level: dict[str, Any] | None = None
    scatter: dict[str, Any] = field(default_factory=dict, repr=False)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """The report data, in report.json's order (sections that were not measured left out)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in ("scatter", "seconds") and getattr(self, f.name) is not None}


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


# ----------------------------------------------------------------------------- pieces
def _spectra(suspect: Projector, reference: Projector, benign: dict[str, Projector], n: int) -> dict[str, Any]:
    out: dict[str, Any] = {"layers": [suspect.layer_name(i) for i in range(suspect.num_layers)], "suspect": [],
                           "benign": {name: [] for name in benign}}
    for name, proj in [("suspect", suspect), *benign.items()]:
        for dw in proj.delta(reference):
            s = singular_values(dw, n, min_dim=1024)
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


def analyze_checkpoint(checkpoint: Path, reference: Path, test_data: Path, probe_data: Path,
                       benign: Sequence[Path] = (), variant: str | None = None,
                       options: AnalyzeOptions | None = None,
                       device: str | torch.device | None = "cpu", dtype: str | torch.dtype | None = "float32",
                       ) -> Analysis:
    """Run the analysis: ASR curves on ``test_data``, shifts on the clean images of ``probe_data`` (both LLaVA
    conversation JSON).

    ``device`` / ``dtype`` place the LLaVA model that runs the curves (see
    :meth:`~projlens_defense.runtime.LlavaRuntime.from_pretrained`); the weight-space analyses stay on the CPU."""
    from ..runtime import LlavaRuntime

    opt = options or AnalyzeOptions()
    t0 = time.perf_counter()
    checkpoint, reference = Path(checkpoint), Path(reference)
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
                         probe_data=ProbeData(probes=probes))

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
        if opt.input_detectors:  # the bench's input-level scoring of the same inputs (STRIP, baselines, ...)
            rep["input_level"]["detectors"] = run_input_detectors(
                rt, sus, ref, opt.input_detectors, samples=test, clean_features=cf, eligible=es.eligible,
                triggered_features=tf, variant=var, seed=opt.seed, probe_features=probes,
                probe_images=[s.image for s in probes_s], probe_questions=[s.question for s in probes_s],
                image_subset=opt.input_images)
    return Analysis(**rep, scatter=scatter, seconds=time.perf_counter() - t0)
