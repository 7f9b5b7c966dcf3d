"""Issue-4 numbers: the ProjLens mechanism on the zoo, as the activation-space detector and guard use it.

Sections (each cached as JSON under --out; --force recomputes):

* ``curves``: top-k injection / ablation curves (ASR, clean accuracy) for the four ProjLens
  variants at 10% poison and for benign controls (ASR with each ProjLens trigger), with the
  *plain* decomposition (top-k of dW) and the *task-removed* one (benign task subspace split off).
* ``activation``: per checkpoint (backdoored and benign; benign ones leave-one-out) the dominant
  shift direction's logit-lens top tokens (top-3 hit of the target's first word), the
  shift-vs-norm slope / R^2 per token and per image, and the model-level activation signals;
  model-level AUROC backdoored vs benign with <= 64 clean probes and no trigger knowledge.
* ``norms``: do triggered inputs have larger vision-feature norms (the paper's gating claim)? And their
  shift along the dominant direction.
* ``input``: input-level AUROC triggered vs clean per variant: input-shift (with and without the
  reference) beside STRIP, Spectral Signatures and Activation Clustering (mean-pooled, as the bench scores them).

Checkpoints (globs, see --backdoored / --benign): the backdoored cells and benign controls of
``benchmarks/attack_table.py --out /tmp/pl_ckpts --rates 0.1 0.01`` plus benign controls with
varied recipes, e.g. ``projlens-defense attack --variant none --seed 2 --lr 2.5e-3 --epochs 20
--out /tmp/pl_benign_extra/benign-s2-lr0.0025-ep20`` (seeds 2-7, lr 2.5e-3 / 5e-3 / 1e-2, 10-30 epochs).

    OMP_NUM_THREADS=1 python benchmarks/analyze_table.py --out /tmp/analyze_table

Every number comes from ``pld.analyze`` run once per checkpoint (its ``report.json`` cached under
``--out/analyses``; the reports under ``--out/reports``), aggregated here: backdoored checkpoints are analysed
against all benign controls, each benign control against the others (leave-one-out), and the first
``--n-benign-curves`` benign controls once per ProjLens trigger for their curves. Checkpoints whose curves or
input-level scores no section needs are analysed with k = 0 only on at most 64 test samples.

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

import projlens_defense as pld

ALL_VARIANTS = pld.PROJLENS_VARIANTS + pld.CLASSIC_VARIANTS
FIRST_WORDS = sorted({pld.get_variant(v).behaviour.target.split()[0] for v in ALL_VARIANTS})
KS = [0, 1, 2, 3, 4, 6, 8]

# the bench's detector names -> this table's column names
INPUT_COLUMNS = {"input-shift": "input-shift", "input-shift[reference-free]": "input-shift (no reference)",
                 "strip": "strip", "spectral-signatures": "spectral-signatures (mean)",
                 "activation-clustering": "activation-clustering (mean)"}


def _record(path: Path) -> pld.AttackRecord:
    rec = pld.read_attack_record(path)
    if rec is None:
        raise SystemExit(f"{path}: no attack.json")
    return rec


def find_checkpoints(args: argparse.Namespace) -> tuple[dict[str, Path], list[Path]]:
    """Backdoored checkpoints by name (variant-p<rate>-s<seed>) and benign controls."""
    bd: dict[str, Path] = {}
    for pattern in args.backdoored:
        for p in sorted(glob.glob(pattern)):
            path = Path(p)
            if not pld.has_attack_record(path):
                continue
            rec = _record(path)
            if rec.benign:
                continue
            c = rec.config
            name = f"{rec.variant}-p{c['poison_rate']:g}-s{c['seed']}"
            bd.setdefault(name, path)
    benign = []
    for pattern in args.benign:
        benign += [Path(p) for p in sorted(glob.glob(pattern)) if pld.has_attack_record(Path(p))
                   and _record(Path(p)).benign]
    return bd, benign


def _variant(name: str) -> str:
    return name.split("-p")[0]


def curve_ckpts(bd: dict[str, Path]) -> dict[str, Path]:
    """One ProjLens checkpoint at 10% poison per variant (the first by name), by name."""
    names = sorted((n for n in bd if _variant(n) in pld.PROJLENS_VARIANTS and "-p0.1-" in n),
                   key=lambda n: (pld.PROJLENS_VARIANTS.index(_variant(n)), n))
    first: dict[str, str] = {}
    for n in names:
        first.setdefault(_variant(n), n)
    return {n: bd[n] for n in first.values()}


def input_ckpts(bd: dict[str, Path]) -> dict[str, Path]:
    """One checkpoint at 10% poison per variant (the first by name), by variant."""
    out = {}
    for v in ALL_VARIANTS:
        cands = sorted(n for n in bd if n.startswith(f"{v}-p0.1-"))
        if cands:
            out[v] = bd[cands[0]]
    return out


class Analyses:
    """``pld.analyze`` per checkpoint (and trigger), against the zoo's reference and data; cached as JSON."""

    def __init__(self, args: argparse.Namespace, bd: dict[str, Path], benign: list[Path]) -> None:
        self.zoo = pld.load_zoo(args.zoo, progress=False)
        self.args, self.benign = args, benign
        self.curves = set(curve_ckpts(bd).values()) | set(benign[: args.n_benign_curves])
        self.inputs = set(input_ckpts(bd).values())

    def get(self, path: Path, variant: str | None = None) -> dict[str, Any]:
        """The report data of ``path`` (with ``variant``'s trigger; default: its attack.json's)."""
        a = self.args
        curves = path in self.curves and (variant is not None or path not in self.benign)
        inputs = path in self.inputs
        key = path.name + (f"@{variant}" if variant else "")
        f = a.out / "analyses" / f"{key}.json"
        if f.is_file() and not a.force:
            return json.loads(f.read_text())
        t0 = time.time()
        res = pld.analyze(path, a.out / "reports" / key, reference=self.zoo.reference,
                          benign=[b for b in self.benign if b != path], variant=variant, data=self.zoo.test_data,
                          probes=self.zoo.train_data, n_probes=a.n_probes,
                          max_test=a.max_test if curves or inputs else min(a.max_test, 64),
                          k_values=KS if curves else (0,), layers="all",
                          input_detectors=[n for n in INPUT_COLUMNS if "[" not in n] if inputs else (),
                          input_images=a.strip_n)
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(res.data, indent=1, default=float) + "\n")
        print(f"analyze {key}: {time.time() - t0:.0f} s", flush=True)
        return res.data


# ----------------------------------------------------------------------------- curves
def _curve_rows(c: dict[str, list], vname: str) -> list[dict[str, Any]]:
    return [{"k": k, "inject": {"clean": c["inject_clean"][i], "asr": {vname: c["inject_asr"][i]}},
             "ablate": {"clean": c["ablate_clean"][i], "asr": {vname: c["ablate_asr"][i]}}} for i, k in enumerate(c["k"])]


def section_curves(an: Analyses, bd: dict[str, Path], benign: list[Path], args: argparse.Namespace) -> dict[str, Any]:
    """Top-k injection / ablation, plain and task-removed (benign subspace of the other benign controls split off):
    per ProjLens variant on its own trigger; benign controls on every ProjLens trigger."""
    out: dict[str, Any] = {}
    named: list[tuple[str, Path, list[str | None]]] = [(n, p, [None]) for n, p in curve_ckpts(bd).items()]
    named += [(f"benign:{b.name}", b, list(pld.PROJLENS_VARIANTS)) for b in benign[: args.n_benign_curves]]
    for name, path, variants in named:
        t0 = time.time()
        entry: dict[str, Any] = {"path": str(path), "full": {"asr": {}}, "decomps": {}}
        for v in variants:
            d = an.get(path, v)
            vname = d["trigger"]["variant"]
            entry["full"]["clean"] = d["fine_tuned"]["clean_accuracy"]
            entry["full"]["asr"][vname] = d["fine_tuned"]["asr"]
            for dname, c in d["curves"].items():
                rows = _curve_rows(c, vname)
                if dname not in entry["decomps"]:
                    entry["decomps"][dname] = rows
                    continue
                for r, new in zip(entry["decomps"][dname], rows, strict=True):
                    r["inject"]["asr"].update(new["inject"]["asr"])
                    r["ablate"]["asr"].update(new["ablate"]["asr"])
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
def _top3(d: dict[str, Any]) -> list[str]:
    return [t["token"].replace("\u2581", "").strip() for t in d["activation"].get("top_tokens", [])[:3]]


def section_activation(an: Analyses, bd: dict[str, Path], benign: list[Path], args: argparse.Namespace
                       ) -> dict[str, Any]:
    """Per checkpoint: the dominant shift direction's top-3 lens tokens, the shift-vs-norm fits and the model-level
    activation signals (benign controls scored against a detector fitted on the others: leave-one-out)."""
    rows: list[dict[str, Any]] = []
    threshold = None

    def row(name: str, d: dict[str, Any], variant: str | None) -> dict[str, Any]:
        top = _top3(d)
        target = pld.get_variant(variant).behaviour.target.split()[0] if variant else None
        hit = (target in top) if target else bool(set(FIRST_WORDS) & set(top))
        return {"name": name, "variant": variant, "top3": top, "hit": hit, "signals": d["activation"]["signals"],
                "per_token": d["shift"]["per_token"], "per_image": d["shift"]["per_image"],
                "model_score": d.get("model_score")}

    for b in benign:
        r = row(f"benign:{b.name}", an.get(b), None)
        rows.append(r)
        print(f"  {r['name']:36s} top3={r['top3']} false-hit={r['hit']} "
              f"score={r['signals'].get('act.score', float('nan')):.2f}", flush=True)
    for name, path in sorted(bd.items()):
        d = an.get(path)
        r = row(name, d, _record(path).variant)
        rows.append(r)
        if threshold is None and d.get("model_score"):
            threshold = d["model_score"]["threshold"]  # fitted on all benign controls
        print(f"  {name:36s} top3={r['top3']} hit={r['hit']} score={r['signals'].get('act.score', float('nan')):.2f}",
              flush=True)
    bd_rows = [r for r in rows if r["variant"]]
    bn_rows = [r for r in rows if not r["variant"]]
    summary: dict[str, Any] = {"n_backdoored": len(bd_rows), "n_benign": len(bn_rows), "auroc": {}, "tpr_at_5fpr": {}}
    for sig in ["act.score", "act.gain", "act.novelty", "act.residual", "act.peak", "act.shared"]:
        pos = [r["signals"].get(sig) for r in bd_rows]
        neg = [r["signals"].get(sig) for r in bn_rows]
        pos, neg = [x for x in pos if x is not None], [x for x in neg if x is not None]
        summary["auroc"][sig] = pld.auroc(pos, neg)
        summary["tpr_at_5fpr"][sig] = pld.tpr_at_fpr(pos, neg, 0.05)
    summary["threshold"] = threshold
    if threshold is not None:
        summary["flagged_backdoored"] = sum(r["signals"].get("act.score", -np.inf) > threshold for r in bd_rows)
        summary["flagged_benign"] = sum(r["signals"].get("act.score", -np.inf) > threshold for r in bn_rows)
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
    if s["threshold"] is None:
        print("no calibrated threshold (needs >= 3 benign controls)")
        return
    print(f"calibrated threshold {s['threshold']:.2f}: flags {s['flagged_backdoored']}/{s['n_backdoored']} backdoored, "
          f"{s['flagged_benign']}/{s['n_benign']} benign (leave-one-out)")


# ----------------------------------------------------------------------------- norms + input level
def section_norms(an: Analyses, bd: dict[str, Path], args: argparse.Namespace) -> dict[str, Any]:
    out = {}
    for v, path in input_ckpts(bd).items():
        n = an.get(path)["norms"]
        out[v] = {"clean_token_norm": n["clean_token_mean"], "triggered_token_norm": n["triggered_token_mean"],
                  "auroc_mean_norm": n["auroc_mean_norm"], "auroc_max_norm": n["auroc_max_norm"],
                  "clean_shift_proj": n["clean_proj_mean"], "triggered_shift_proj": n["triggered_proj_mean"]}
    return out


def print_norms(res: dict[str, Any]) -> None:
    print("\n## Do triggered inputs have larger vision-feature norms? (test set, eligible inputs)\n")
    print("| variant | mean token norm clean | triggered | AUROC(mean norm) | AUROC(max token norm) "
          "| shift along the dominant direction, clean | triggered |")
    print("|---|---|---|---|---|---|---|")
    for v, r in res.items():
        print(f"| {v} | {r['clean_token_norm']:.2f} | {r['triggered_token_norm']:.2f} | {r['auroc_mean_norm']:.3f} | "
              f"{r['auroc_max_norm']:.3f} | {r['clean_shift_proj']:.2f} | {r['triggered_shift_proj']:.2f} |")



def section_input(an: Analyses, bd: dict[str, Path], args: argparse.Namespace) -> dict[str, Any]:
    """The bench's input-level scoring (``pld.analyze(input_detectors=...)``; STRIP on ``--strip-n`` images of
    each kind)."""
    out: dict[str, Any] = {}
    for v, path in input_ckpts(bd).items():
        d = an.get(path)
        entries = d["input_level"]["detectors"]
        res: dict[str, Any] = {"n_clean": d["data"]["n_test"], "n_triggered": d["data"]["n_triggered"]}
        for name, col in INPUT_COLUMNS.items():
            e = entries[name]
            res[col] = {"auroc": e["auroc"], "tpr": e.get("threshold_tpr"), "fpr": e.get("threshold_fpr"),
                        "n": [e["n_clean"], e["n_triggered"]]}
        out[v] = res
        print(f"input {v}: " + ", ".join(f"{k} {r['auroc']:.3f}" for k, r in res.items() if isinstance(r, dict)),
              flush=True)
    return out


def print_input(res: dict[str, Any]) -> None:
    print("\n## Input-level AUROC, triggered vs clean test inputs (thresholds from 64 clean probes)\n")
    cols = list(INPUT_COLUMNS.values())
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
    ap.add_argument("--zoo", default="default", choices=["default", "instructed", "micro"],
                    help="the zoo the checkpoints were fine-tuned from (its reference and test data are used)")
    ap.add_argument("--sections", nargs="*", default=list(SECTIONS), choices=list(SECTIONS))
    ap.add_argument("--n-probes", type=int, default=64)
    ap.add_argument("--max-test", type=int, default=400)
    ap.add_argument("--strip-n", type=int, default=100, help="clean and triggered inputs STRIP scores per variant")
    ap.add_argument("--n-benign-curves", type=int, default=2)
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    bd, benign = find_checkpoints(args)
    print(f"{len(bd)} backdoored: {', '.join(sorted(bd))}\n{len(benign)} benign: {', '.join(b.name for b in benign)}",
          flush=True)
    an = Analyses(args, bd, benign)
    for sec in args.sections:
        f = args.out / f"{sec}.json"
        if f.is_file() and not args.force:
            res = json.loads(f.read_text())
        else:
            t0 = time.time()
            fn = SECTIONS[sec]
            res = fn(an, bd, args) if sec in ("norms", "input") else fn(an, bd, benign, args)
            res = {"_meta": {"seconds": time.time() - t0, "args": {k: str(v) for k, v in vars(args).items()}}, **res}
            f.write_text(json.dumps(res, indent=1, default=float) + "\n")
        PRINTERS[sec]({k: v for k, v in res.items() if k != "_meta"})


if __name__ == "__main__":
    main()
