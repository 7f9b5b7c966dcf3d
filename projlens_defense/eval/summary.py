"""Tables and figures from bench records: checkpoint- and input-level detection (AUROC, TPR at 1%/5% FPR),
mitigations (ASR, clean accuracy).

Every number in `summary.md` / `summary.csv` is recomputed here from `results.jsonl`, nothing else.
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..metrics import auroc, tpr_at_fpr
from .input_detection import FPR_GRID


def _ms(values: list[float]) -> tuple[float, float]:
    v = [x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not v:
        return float("nan"), float("nan")
    return float(np.mean(v)), float(np.std(v))


def detector_scores(records: list[dict], name: str) -> tuple[list[float], list[float]]:
    """Scores of detector `name`: (backdoored cells, benign controls), cells without a score skipped."""
    pos = [r["detectors"][name] for r in records if not r["benign"] and r["detectors"].get(name) is not None]
    neg = [r["detectors"][name] for r in records if r["benign"] and r["detectors"].get(name) is not None]
    return pos, neg


def detector_rows(records: list[dict]) -> list[dict]:
    """Checkpoint-level detection per detector: backdoored cells are positives, benign controls negatives."""
    names = sorted({n for r in records for n, v in r["detectors"].items() if not isinstance(v, str)})  # not verdicts
    rows = []
    for n in names:
        pos, neg = detector_scores(records, n)
        rows.append({"detector": n, "n_backdoored": len(pos), "n_benign": len(neg), "auroc": auroc(pos, neg),
                     "tpr@1%fpr": tpr_at_fpr(pos, neg, 0.01), "tpr@5%fpr": tpr_at_fpr(pos, neg, 0.05)})
    return rows


INPUT_METRICS = ("auroc", "tpr@1%fpr", "tpr@5%fpr")


def input_rows(records: list[dict]) -> list[dict]:
    """Input-level detection (triggered vs clean test inputs of each backdoored cell): mean and std over the
    cells (seeds) of each detector x variant x poison rate, then over every backdoored cell of a detector
    (variant `all`, poison rate None)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        c = r["cell"]
        for det, e in (r.get("input_detectors") or {}).items():
            groups[(det, c["variant"], c["poison_rate"])].append(e)
            groups[(det, "all", None)].append(e)
    rows = []
    order = sorted(groups, key=lambda k: (k[0], k[1] == "all", k[1], k[2] or 0.0))
    for det, variant, rate in order:
        es = groups[(det, variant, rate)]
        row: dict = {"detector": det, "variant": variant, "poison_rate": rate, "n_cells": len(es)}
        for m in INPUT_METRICS:
            row[f"{m}_mean"], row[f"{m}_std"] = _ms([e.get(m) for e in es])
        rows.append(row)
    return rows


MITIGATION_EXTRAS = ("seconds", "params")
"""Keys of a cell's per-mitigation entry that are not a variant's metrics."""


def mitigation_rows(records: list[dict]) -> list[dict]:
    """Per mitigation (and `none`), variant and poison rate: ASR and clean accuracy over seeds, and the
    clean-accuracy change against the unmitigated benign control of the same seed."""
    benign_acc = {r["cell"]["seed"]: np.mean([m["clean_accuracy"] for m in r["metrics"].values()])
                  for r in records if r["benign"]}
    groups: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        c = r["cell"]
        variant = c["variant"] or "benign"
        results = {"none": r["metrics"], **{k: {kk: vv for kk, vv in v.items() if kk not in MITIGATION_EXTRAS}
                                             for k, v in r["mitigations"].items()}}
        for mit, per_variant in results.items():
            ms = list(per_variant.values())
            g = groups[(mit, variant, c["poison_rate"])]
            g["asr"].append(None if r["benign"] else ms[0]["asr"])
            acc = float(np.mean([m["clean_accuracy"] for m in ms]))
            g["clean"].append(acc)
            if c["seed"] in benign_acc:
                g["drop"].append(benign_acc[c["seed"]] - acc)
            g["seeds"].append(c["seed"])
    rows = []
    for (mit, variant, rate), g in sorted(groups.items(), key=lambda kv: (kv[0][0] != "none", kv[0])):
        asr_m, asr_s = _ms(g["asr"])
        acc_m, acc_s = _ms(g["clean"])
        drop_m, _ = _ms(g["drop"])
        rows.append({"mitigation": mit, "variant": variant, "poison_rate": rate, "n_seeds": len(g["seeds"]),
                     "asr_mean": asr_m, "asr_std": asr_s, "clean_acc_mean": acc_m, "clean_acc_std": acc_s,
                     "clean_drop_vs_benign": drop_m})
    return rows


def _f(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _rate(x: float | None) -> str:
    return "all" if x is None else f"{x:g}"


def write_summary(records: list[dict], out: Path, figures: bool = True) -> dict:
    """Write summary.md, summary.csv and figures; returns the tables."""
    det, inp, mit = detector_rows(records), input_rows(records), mitigation_rows(records)
    lines = [f"# Benchmark summary ({len(records)} cells)", "", "## Detectors (checkpoint level)", "",
             "| detector | n backdoored | n benign | AUROC | TPR@1%FPR | TPR@5%FPR |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['detector']} | {r['n_backdoored']} | {r['n_benign']} | {_f(r['auroc'])} | "
              f"{_f(r['tpr@1%fpr'])} | {_f(r['tpr@5%fpr'])} |" for r in det]
    if inp:
        lines += ["", "## Detectors (input level: triggered vs clean held-out test inputs of each backdoored model, "
                  "calibrated on clean probes only; mean ± std over cells)", "",
                  "| detector | variant | poison | cells | AUROC | TPR@1%FPR | TPR@5%FPR |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['detector']} | {r['variant']} | {_rate(r['poison_rate'])} | {r['n_cells']} | "
                  + " | ".join(f"{_f(r[m + '_mean'])} ± {_f(r[m + '_std'])}" for m in INPUT_METRICS) + " |"
                  for r in inp]
    lines += ["", "## Mitigations (mean ± std over seeds; drop = benign control's clean accuracy minus this)", "",
              "| mitigation | variant | poison | seeds | ASR | clean acc | clean drop vs benign |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['mitigation']} | {r['variant']} | {r['poison_rate']:g} | {r['n_seeds']} | "
              f"{_f(r['asr_mean'])} ± {_f(r['asr_std'])} | {_f(r['clean_acc_mean'])} ± {_f(r['clean_acc_std'])} | "
              f"{_f(r['clean_drop_vs_benign'])} |" for r in mit]
    params = sorted({f"{m}: {json.dumps(v['params'], sort_keys=True)}" for r in records
                     for m, v in (r.get("mitigations") or {}).items() if isinstance(v, dict) and v.get("params")})
    if params:
        lines += ["", "Mitigation parameters other than the defaults: " + "; ".join(params) + "."]
    timings = defaultdict(list)
    for r in records:
        for k, v in r.get("timings_s", {}).items():
            timings[k].append(v)
    lines += ["", "## Time per stage (s, summed over cells)", "",
              " ".join(f"{k}: {sum(v):.1f};" for k, v in timings.items())]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    with open(out / "summary.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["table", *det[0].keys()] if det else ["table"])
        for r in det:
            w.writerow(["detectors", *r.values()])
        if inp:
            w.writerow(["table", *inp[0].keys()])
        for r in inp:
            w.writerow(["input_detectors", *r.values()])
        if mit:
            w.writerow(["table", *mit[0].keys()])
        for r in mit:
            w.writerow(["mitigations", *r.values()])
    if figures:
        _figures(records, det, inp, mit, out)
    return {"detectors": det, "input_detectors": inp, "mitigations": mit}


def _save(plt, fig, ax, xlabel: str, ylabel: str, title: str, path: Path) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _figures(records: list[dict], det: list[dict], inp: list[dict], mit: list[dict], out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plotting is an extra
        return
    fig, ax = plt.subplots(figsize=(6, 4.5))
    by_mit = defaultdict(list)
    for r in mit:
        if r["variant"] != "benign":
            by_mit[r["mitigation"]].append((r["clean_acc_mean"], r["asr_mean"]))
    for name, pts in by_mit.items():
        x, y = zip(*pts, strict=True)
        ax.scatter(x, y, label=name, s=20)
    _save(plt, fig, ax, "clean accuracy", "ASR", "ASR vs clean accuracy per mitigation", out / "asr_vs_clean.png")

    fig, ax = plt.subplots(figsize=(5, 5))
    for d in det:
        n = d["detector"]
        pos, neg = (np.array(x) for x in detector_scores(records, n))
        if len(pos) and len(neg):
            thr = np.unique(np.r_[pos, neg, np.inf])[::-1]
            ax.plot([(neg >= t).mean() for t in thr], [(pos >= t).mean() for t in thr], label=f"{n} ({d['auroc']:.2f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    _save(plt, fig, ax, "false-positive rate", "true-positive rate", "Checkpoint-level ROC", out / "roc.png")

    if inp:  # input level: each cell's ROC on a fixed FPR grid, averaged over backdoored cells
        fig, ax = plt.subplots(figsize=(5, 5))
        for r in (r for r in inp if r["variant"] == "all"):
            curves = [e["roc_tpr"] for rec in records for n, e in (rec.get("input_detectors") or {}).items()
                      if n == r["detector"] and len(e.get("roc_tpr", [])) == len(FPR_GRID)]
            if curves:
                ax.plot(FPR_GRID, np.mean(curves, 0), marker=".", label=f"{r['detector']} ({r['auroc_mean']:.2f})")
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        _save(plt, fig, ax, "false-positive rate", "true-positive rate",
              "Input-level ROC (mean over backdoored cells)", out / "input_roc.png")

    rows = [r for r in mit if r["mitigation"] == "none" and r["variant"] != "benign"]
    if rows:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        labels = [f"{r['variant']}\np{r['poison_rate']:g}" for r in rows]
        ax.bar(range(len(rows)), [r["asr_mean"] for r in rows], yerr=[r["asr_std"] for r in rows])
        ax.set_xticks(range(len(rows)), labels, fontsize=6)
        ax.set_ylabel("ASR (no defense)")
        fig.tight_layout()
        fig.savefig(out / "variant_asr.png", dpi=110)
        plt.close(fig)
