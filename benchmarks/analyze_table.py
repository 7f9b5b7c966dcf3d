"""Issue-4 numbers: the ProjLens mechanism on the zoo, as the activation-space detector and guard use it.

Sections (each cached as JSON under --out; --force recomputes):

* ``curves``: top-k injection / ablation curves (ASR, clean accuracy) for the four ProjLens
  variants at 10% poison and for benign controls (ASR with each ProjLens trigger), with the
  *plain* decomposition (top-k of dW) and the *task-removed* one (benign task subspace split off).
* ``activation``: per checkpoint (backdoored and benign; benign ones leave-one-out) the dominant
  shift direction's logit-lens top tokens (top-3 hit of the target's first word), the
  shift-vs-norm slope / R^2 per token and per image, and the model-level activation signals;
  model-level AUROC backdoored vs benign with <= 64 clean probes and no trigger knowledge.
* ``norms``: do triggered inputs have larger vision-feature norms (the paper's gating claim)?
* ``input``: input-level AUROC triggered vs clean per variant: input-shift (with and without the
  reference) beside STRIP, Spectral Signatures and Activation Clustering.

Checkpoints (globs, see --backdoored / --benign): the backdoored cells and benign controls of
``benchmarks/attack_table.py --out /tmp/pl_ckpts --rates 0.1 0.01`` plus benign controls with
varied recipes, e.g. ``projlens-defense attack --variant none --seed 2 --lr 2.5e-3 --epochs 20
--out /tmp/pl_benign_extra/benign-s2-lr0.0025-ep20`` (seeds 2-7, lr 2.5e-3 / 5e-3 / 1e-2, 10-30 epochs).

    OMP_NUM_THREADS=1 python benchmarks/analyze_table.py --out /tmp/analyze_table

With ``--zoo instructed`` the reference is the instructed zoo's (the paper's regime: the reference
already does every downstream question type), for checkpoints made with ``attack --zoo instructed``.
"""

from __future__ import annotations

import argparse
import glob
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from projlens_defense.attacks.variants import CLASSIC_VARIANTS, PROJLENS_VARIANTS, get_variant
from projlens_defense.checkpoint import load_projector
from projlens_defense.conversations import load_conversations
from projlens_defense.detectors.activation import ActivationDetector, fit_line, output_shift
from projlens_defense.detectors.baselines import ActivationClusteringDetector, SpectralSignatureDetector
from projlens_defense.detectors.loading import load_checkpoint
from projlens_defense.eval.analyze import variant_from_record
from projlens_defense.eval.input_detection import run_input_detectors
from projlens_defense.eval.lowrank import LowRankUpdate, TaskRemovedUpdate
from projlens_defense.metrics import attack_success_rate, auroc, clean_accuracy, tpr_at_fpr
from projlens_defense.projector import ProjectorModule
from projlens_defense.runinfo import AttackRecord, has_attack_record, read_attack_record
from projlens_defense.runtime import LlavaRuntime
from projlens_defense.scan_input import ProbeData, ScanInput
from projlens_defense.zoo.build import config_from_name, get_zoo

ALL_VARIANTS = PROJLENS_VARIANTS + CLASSIC_VARIANTS
FIRST_WORDS = sorted({get_variant(v).behaviour.target.split()[0] for v in ALL_VARIANTS})
KS = [0, 1, 2, 3, 4, 6, 8]


def _record(path: Path) -> AttackRecord:
    rec = read_attack_record(path)
    if rec is None:
        raise SystemExit(f"{path}: no attack.json")
    return rec


def find_checkpoints(args: argparse.Namespace) -> tuple[dict[str, Path], list[Path]]:
    """Backdoored checkpoints by name (variant-p<rate>-s<seed>) and benign controls."""
    bd: dict[str, Path] = {}
    for pattern in args.backdoored:
        for p in sorted(glob.glob(pattern)):
            path = Path(p)
            if not has_attack_record(path):
                continue
            rec = _record(path)
            if rec.benign:
                continue
            c = rec.config
            name = f"{rec.variant}-p{c['poison_rate']:g}-s{c['seed']}"
            bd.setdefault(name, path)
    benign = []
    for pattern in args.benign:
        benign += [Path(p) for p in sorted(glob.glob(pattern)) if has_attack_record(Path(p))
                   and _record(Path(p)).benign]
    return bd, benign


class World:
    """The zoo runtime, reference, data and cached vision features shared by all sections."""

    def __init__(self, args: argparse.Namespace) -> None:
        zoo = get_zoo(config_from_name(args.zoo))
        self.reference_dir = zoo.reference
        self.rt = LlavaRuntime.from_pretrained(zoo.reference)
        self.ref = load_projector(zoo.reference)
        self.ref_ck = load_checkpoint(zoo.reference)
        self.probe_samples = load_conversations(zoo.train_data, limit=args.n_probes)
        self.probes = self.rt.vision_features([s.image for s in self.probe_samples])
        self.test = load_conversations(zoo.test_data)[: args.max_test]
        self.clean = self.rt.vision_features([s.image for s in self.test])
        self._trig: dict[str, tuple[list[int], torch.Tensor, list[np.ndarray]]] = {}

    def triggered(self, variant) -> tuple[list[int], torch.Tensor, list[np.ndarray]]:
        """(eligible test indices, triggered features, triggered images) for a variant (test-time seed 10000)."""
        key = json.dumps(variant.params(), sort_keys=True, default=str)
        if key not in self._trig:
            idx = [i for i, s in enumerate(self.test) if variant.behaviour.eligible(s)]
            imgs = [variant.triggered_image(self.test[i], 10_000, i) for i in idx]
            self._trig[key] = (idx, self.rt.vision_features(imgs), imgs)
        return self._trig[key]

    def scan_input(self, path: Path) -> ScanInput:
        ck = load_checkpoint(path)
        return ScanInput(projector=ck.projector, reference=self.ref, readout=ck.readout, ov_layers=ck.ov_layers,
                         final_norm=ck.final_norm, vocab=ck.vocab, path=str(path),
                         probe_data=ProbeData(probes=self.probes))


# ----------------------------------------------------------------------------- curves
def _eval(w: World, proj, variants: list) -> dict[str, Any]:
    m = ProjectorModule(proj)
    qs = [s.question for s in w.test]
    out = w.rt.answer(w.clean, qs, projector=m)
    res: dict[str, Any] = {"clean": clean_accuracy(out, [s.answer for s in w.test]), "asr": {}}
    for v in variants:
        idx, feats, _ = w.triggered(v)
        res["asr"][v.name] = attack_success_rate(w.rt.answer(feats, [qs[i] for i in idx], projector=m),
                                                 v.behaviour.target)
    return res


def section_curves(w: World, bd: dict[str, Path], benign: list[Path], args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    bprojs = {str(b): load_projector(b) for b in benign}
    jobs = [(n, p) for n, p in bd.items() if n.split("-p")[0] in PROJLENS_VARIANTS and "-p0.1-" in n]
    jobs = sorted(jobs, key=lambda x: (PROJLENS_VARIANTS.index(x[0].split("-p")[0]), x[0]))
    seen = set()
    jobs = [j for j in jobs if not (j[0].split("-p")[0] in seen or seen.add(j[0].split("-p")[0]))]  # one per variant
    jobs += [(f"benign:{b.name}", b) for b in benign[: args.n_benign_curves]]
    for name, path in jobs:
        t0 = time.time()
        sus = load_projector(path)
        var = variant_from_record(_record(path))
        variants = [var] if var is not None else [get_variant(v) for v in PROJLENS_VARIANTS]
        others = [p for b, p in bprojs.items() if Path(b) != path]
        full = _eval(w, sus, variants)
        entry: dict[str, Any] = {"path": str(path), "full": full, "decomps": {}}
        for dname, upd in (("plain", LowRankUpdate(sus, w.ref, max(KS), "all")),
                           ("task-removed", TaskRemovedUpdate(sus, w.ref, others, max(KS), 8, "all"))):
            rows = []
            for k in KS:
                rows.append({"k": k, "inject": _eval(w, upd.inject(k), variants), "ablate": _eval(w, upd.ablate(k), variants)})
            entry["decomps"][dname] = rows
        out[name] = entry
        print(f"curves {name}: {time.time() - t0:.0f} s", flush=True)
    return out


def print_curves(res: dict[str, Any]) -> None:
    print("\n## Top-k injection / ablation (layers: all; test subset; ASR per trigger)\n")
    for name, e in res.items():
        full = e["full"]
        for dname, rows in e["decomps"].items():
            for vname, fasr in full["asr"].items():
                inj = " ".join(f"{r['inject']['asr'][vname]:.2f}" for r in rows)
                abl = " ".join(f"{r['ablate']['asr'][vname]:.2f}" for r in rows)
                print(f"{name} [{dname}] trigger={vname} full ASR {fasr:.3f}, clean {full['clean']:.3f}")
                print("   k:            " + " ".join(f"{r['k']:>4d}" for r in rows))
                print(f"   inject ASR:   {inj}")
                print(f"   ablate ASR:   {abl}")
            print("   inject clean: " + " ".join(f"{r['inject']['clean']:.2f}" for r in rows))
            print("   ablate clean: " + " ".join(f"{r['ablate']['clean']:.2f}" for r in rows))
            if "benign" not in name:
                vname = next(iter(full["asr"]))
                fasr, fcl = full["asr"][vname], full["clean"]
                ok_i = [r["k"] for r in rows if r["k"] > 0 and r["inject"]["asr"][vname] >= 0.9 * fasr]
                ok_a = [r["k"] for r in rows if r["k"] > 0 and r["ablate"]["asr"][vname] <= 0.05
                        and r["ablate"]["clean"] >= fcl - 0.02]
                both = sorted(set(ok_i) & set(ok_a))
                print(f"   -> injection >= 90% at k={ok_i[:1] or 'none'}; ablation <= 5% within 2 pt at "
                      f"k={ok_a[:1] or 'none'}; same k for both: {both[:1] or 'none'}")


# ----------------------------------------------------------------------------- activation
def section_activation(w: World, bd: dict[str, Path], benign: list[Path], args: argparse.Namespace) -> dict[str, Any]:
    binps = [w.scan_input(b) for b in benign]
    t0 = time.time()
    det = ActivationDetector().fit(binps)
    print(f"activation fit on {len(binps)} benign: {time.time() - t0:.0f} s", flush=True)
    loo_scores = det.benign_scores()
    rows: list[dict[str, Any]] = []

    def row(name: str, inp: ScanInput, d: ActivationDetector, variant: str | None, signals: dict | None = None):
        sig, a, e, reading, _ = d.measure(inp)
        direction = e.direction if e is not None else a.direction
        proj = output_shift(inp.projector, w.ref, w.probes) @ direction
        norm = w.probes.norm(dim=-1)
        top = []
        if reading is not None:
            sc = reading.z[:, 0]
            rel = d.relative(sc)
            key = sc if rel is None else rel.masked_fill(torch.isinf(sc), float("-inf"))
            top = [inp.vocab[t].replace("\u2581", "") for t in torch.topk(key, 3).indices.tolist()]
        target = get_variant(variant).behaviour.target.split()[0] if variant else None
        hit = (target in top) if target else bool(set(FIRST_WORDS) & set(top))
        return {"name": name, "variant": variant, "top3": top, "hit": hit, "signals": signals or sig,
                "per_token": fit_line(norm, proj).to_dict(), "per_image": fit_line(norm.mean(1), proj.mean(1)).to_dict(),
                "clean_mean_dir_per_token": a.per_token.to_dict()}

    for i, b in enumerate(binps):
        d = ActivationDetector()
        d.basis, d.baseline = det._fit_parts([x for j, x in enumerate(binps) if j != i])
        sig = {k: v[i] for k, v in det.null.items() if v[i] is not None}
        sig["act.score"] = loo_scores[i] if i < len(loo_scores) else float("nan")
        r = row(f"benign:{Path(b.path).name}", b, d, None, sig)
        rows.append(r)
        print(f"  {r['name']:36s} top3={r['top3']} false-hit={r['hit']} score={sig['act.score']:.2f}", flush=True)
    for name, path in sorted(bd.items()):
        inp = w.scan_input(path)
        rep = det.score(inp)
        r = row(name, inp, det, _record(path)["variant"], rep.signals)
        rows.append(r)
        print(f"  {name:36s} top3={r['top3']} hit={r['hit']} score={rep.signals['act.score']:.2f}", flush=True)
    bd_rows = [r for r in rows if r["variant"]]
    bn_rows = [r for r in rows if not r["variant"]]
    summary: dict[str, Any] = {"n_backdoored": len(bd_rows), "n_benign": len(bn_rows), "auroc": {}, "tpr_at_5fpr": {}}
    for sig in ["act.score", "act.gain", "act.novelty", "act.residual", "act.peak", "act.shared"]:
        pos = [r["signals"].get(sig) for r in bd_rows]
        neg = [r["signals"].get(sig) for r in bn_rows]
        pos, neg = [x for x in pos if x is not None], [x for x in neg if x is not None]
        summary["auroc"][sig] = auroc(pos, neg)
        summary["tpr_at_5fpr"][sig] = tpr_at_fpr(pos, neg, 0.05)
    summary["threshold"] = det.calibrated({"act.gain": 0.0})[1] if det.null else None
    summary["flagged_backdoored"] = sum(r["signals"]["act.score"] > summary["threshold"] for r in bd_rows)
    summary["flagged_benign"] = sum(r["signals"]["act.score"] > summary["threshold"] for r in bn_rows)
    summary["hit_rate_backdoored"] = float(np.mean([r["hit"] for r in bd_rows])) if bd_rows else None
    summary["false_hit_rate_benign"] = float(np.mean([r["hit"] for r in bn_rows])) if bn_rows else None
    for grp, rs in (("backdoored", bd_rows), ("benign", bn_rows)):
        for key in ("per_token", "per_image"):
            summary[f"{grp}_{key}_slope"] = [float(np.mean([r[key]["slope"] for r in rs])),
                                             float(np.std([r[key]["slope"] for r in rs]))]
            summary[f"{grp}_{key}_r2"] = [float(np.mean([r[key]["r2"] for r in rs])), float(np.std([r[key]["r2"] for r in rs]))]
    return {"rows": rows, "summary": summary}


def print_activation(res: dict[str, Any]) -> None:
    s = res["summary"]
    print("\n## Activation analysis (64 clean probes, no trigger knowledge; benign rows leave-one-out)\n")
    print("| checkpoint | top-3 tokens of dominant shift | target hit | slope/token | R²/token | slope/image | R²/image "
          "| act.gain | act.score |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in res["rows"]:
        hit = ("yes" if r["hit"] else "no") if r["variant"] else ("FALSE HIT" if r["hit"] else "-")
        print(f"| {r['name']} | {', '.join(r['top3'])} | {hit} | {r['per_token']['slope']:.4f} | {r['per_token']['r2']:.3f} "
              f"| {r['per_image']['slope']:.4f} | {r['per_image']['r2']:.3f} | {r['signals'].get('act.gain', float('nan')):.3f} "
              f"| {r['signals'].get('act.score', float('nan')):.2f} |")
    print(f"\nlens top-3 hit rate: backdoored {s['hit_rate_backdoored']:.3f} (n={s['n_backdoored']}), benign false-hit "
          f"rate {s['false_hit_rate_benign']:.3f} (n={s['n_benign']}; any of {FIRST_WORDS})")
    for g in ("backdoored", "benign"):
        print(f"{g}: slope per token {s[f'{g}_per_token_slope'][0]:.4f} ± {s[f'{g}_per_token_slope'][1]:.4f}, "
              f"R² {s[f'{g}_per_token_r2'][0]:.3f} ± {s[f'{g}_per_token_r2'][1]:.3f}; per image slope "
              f"{s[f'{g}_per_image_slope'][0]:.4f} ± {s[f'{g}_per_image_slope'][1]:.4f}, R² "
              f"{s[f'{g}_per_image_r2'][0]:.3f} ± {s[f'{g}_per_image_r2'][1]:.3f}")
    print("model-level AUROC backdoored vs benign: " + ", ".join(f"{k} {v:.3f}" for k, v in s["auroc"].items()))
    print("TPR at 5% FPR: " + ", ".join(f"{k} {v:.3f}" for k, v in s["tpr_at_5fpr"].items()))
    print(f"calibrated threshold {s['threshold']:.2f}: flags {s['flagged_backdoored']}/{s['n_backdoored']} backdoored, "
          f"{s['flagged_benign']}/{s['n_benign']} benign (leave-one-out)")


# ----------------------------------------------------------------------------- norms + input level
def _input_ckpts(bd: dict[str, Path]) -> dict[str, Path]:
    out = {}
    for v in ALL_VARIANTS:
        cands = sorted(n for n in bd if n.startswith(f"{v}-p0.1-"))
        if cands:
            out[v] = bd[cands[0]]
    return out


def section_norms(w: World, bd: dict[str, Path], args: argparse.Namespace) -> dict[str, Any]:
    out = {}
    for v, path in _input_ckpts(bd).items():
        var = variant_from_record(read_attack_record(path))
        idx, tf, _ = w.triggered(var)
        cf = w.clean[idx]
        sus = load_projector(path)
        cn, tn = cf.norm(dim=-1), tf.norm(dim=-1)
        csh, tsh = output_shift(sus, w.ref, cf), output_shift(sus, w.ref, tf)
        out[v] = {"clean_token_norm": float(cn.mean()), "triggered_token_norm": float(tn.mean()),
                  "auroc_mean_norm": auroc(tn.mean(1).tolist(), cn.mean(1).tolist()),
                  "auroc_max_norm": auroc(tn.amax(1).tolist(), cn.amax(1).tolist()),
                  "clean_shift_norm": float(csh.norm(dim=-1).mean()), "triggered_shift_norm": float(tsh.norm(dim=-1).mean())}
    return out


def print_norms(res: dict[str, Any]) -> None:
    print("\n## Do triggered inputs have larger vision-feature norms? (test set, eligible inputs)\n")
    print("| variant | mean token norm clean | triggered | AUROC(mean norm) | AUROC(max token norm) | shift norm clean | triggered |")
    print("|---|---|---|---|---|---|---|")
    for v, r in res.items():
        print(f"| {v} | {r['clean_token_norm']:.2f} | {r['triggered_token_norm']:.2f} | {r['auroc_mean_norm']:.3f} | "
              f"{r['auroc_max_norm']:.3f} | {r['clean_shift_norm']:.2f} | {r['triggered_shift_norm']:.2f} |")


# the bench's detector names -> this table's column names
INPUT_COLUMNS = {"input-shift": "input-shift", "input-shift[reference-free]": "input-shift (no reference)",
                 "strip": "strip", "spectral-signatures": "spectral-signatures (mean)",
                 "activation-clustering": "activation-clustering (mean)"}


def section_input(w: World, bd: dict[str, Path], args: argparse.Namespace) -> dict[str, Any]:
    """The bench's input-level scoring (:func:`run_input_detectors`, STRIP on ``--strip-n`` images of each kind),
    plus Spectral Signatures and Activation Clustering on flattened outputs (the registry pools by mean)."""
    out: dict[str, Any] = {}
    for v, path in _input_ckpts(bd).items():
        t0 = time.time()
        var = variant_from_record(read_attack_record(path))
        idx, tf, _ = w.triggered(var)
        sus = load_projector(path)
        entries = run_input_detectors(
            LlavaRuntime.from_pretrained(path), sus, w.ref, list(INPUT_COLUMNS), samples=w.test, clean_features=w.clean,
            eligible=idx, triggered_features=tf, variant=var, seed=0, probe_features=w.probes,
            probe_images=[s.image for s in w.probe_samples], probe_questions=[s.question for s in w.probe_samples],
            image_subset=args.strip_n)
        res: dict[str, Any] = {"n_clean": len(w.test), "n_triggered": len(idx)}
        for name, col in INPUT_COLUMNS.items():
            e = entries[name]
            res[col] = {"auroc": e["auroc"], "tpr": e.get("threshold_tpr"), "fpr": e.get("threshold_fpr"),
                        "n": [e["n_clean"], e["n_triggered"]]}
        inp = ScanInput(projector=sus, reference=w.ref, probe_data=ProbeData(inputs=torch.cat([w.clean, tf])))
        n = len(w.test)
        for det in (SpectralSignatureDetector("flat"), ActivationClusteringDetector("flat")):
            s = det.score_inputs(inp, inp.probe_data.inputs)
            res[f"{det.name} ({det.pool})"] = {"auroc": auroc(s[n:].tolist(), s[:n].tolist())}
        out[v] = res
        print(f"input {v}: {time.time() - t0:.0f} s " + ", ".join(f"{k} {r['auroc']:.3f}" for k, r in res.items()
                                                                  if isinstance(r, dict)), flush=True)
    return out


def print_input(res: dict[str, Any]) -> None:
    print("\n## Input-level AUROC, triggered vs clean test inputs (thresholds from 64 clean probes)\n")
    cols = ["input-shift", "input-shift (no reference)", "strip", "spectral-signatures (mean)",
            "spectral-signatures (flat)", "activation-clustering (mean)", "activation-clustering (flat)"]
    print("| variant | " + " | ".join(cols) + " | input-shift TPR / FPR at threshold |")
    print("|---|" + "---|" * (len(cols) + 1))
    for v, r in res.items():
        print(f"| {v} | " + " | ".join(f"{r[c]['auroc']:.3f}" for c in cols)
              + f" | {r['input-shift']['tpr']:.3f} / {r['input-shift']['fpr']:.3f} |")


SECTIONS = {"activation": section_activation, "curves": section_curves, "norms": section_norms, "input": section_input}
PRINTERS = {"activation": print_activation, "curves": print_curves, "norms": print_norms, "input": print_input}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--backdoored", nargs="*", default=["/tmp/pl_ckpts/*-p0.1-s*", "/tmp/pl_ckpts/*-p0.01-s*",
                                                        "/tmp/atk_zoo_v3_*"])
    ap.add_argument("--benign", nargs="*", default=["/tmp/pl_ckpts/benign-*", "/tmp/pl_benign_extra/*"])
    ap.add_argument("--zoo", default="default", choices=["default", "instructed"],
                    help="the zoo the checkpoints were fine-tuned from (its reference and test data are used)")
    ap.add_argument("--sections", nargs="*", default=list(SECTIONS), choices=list(SECTIONS))
    ap.add_argument("--n-probes", type=int, default=64)
    ap.add_argument("--max-test", type=int, default=400)
    ap.add_argument("--strip-n", type=int, default=100, help="clean and triggered inputs STRIP scores per variant")
    ap.add_argument("--n-benign-curves", type=int, default=2)
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    bd, benign = find_checkpoints(args)
    print(f"{len(bd)} backdoored: {', '.join(sorted(bd))}\n{len(benign)} benign: {', '.join(b.name for b in benign)}",
          flush=True)
    w = World(args)
    for sec in args.sections:
        f = args.out / f"{sec}.json"
        if f.is_file() and not args.force:
            res = json.loads(f.read_text())
        else:
            t0 = time.time()
            fn = SECTIONS[sec]
            res = fn(w, bd, args) if sec in ("norms", "input") else fn(w, bd, benign, args)
            res = {"_meta": {"seconds": time.time() - t0, "args": {k: str(v) for k, v in vars(args).items()}}, **res}
            f.write_text(json.dumps(res, indent=1, default=float) + "\n")
        PRINTERS[sec]({k: v for k, v in res.items() if k != "_meta"})


if __name__ == "__main__":
    main()
