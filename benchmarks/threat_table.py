"""The threat table: attacks beyond the zoo's first eight, scanned and sanitized with the defaults.

    OMP_NUM_THREADS=1 python benchmarks/threat_table.py --zoo default --out runs/threats

Rows (attack seed 2, or ``--seed N`` for a fresh set after a change to the defense): the new families (a text
trigger, a two-key image + text trigger,
a clean-label poison whose answers stay correct, malicious injection and perceptual hijack at a 0.5% poison rate, the projector poisoned together with LoRA on the
LLM), the adaptive attacks (spread, hide-target, mimic; see ``projlens_defense/attacks/adaptive.py``) and the
out-of-scope controls (the backdoor only in LLM LoRA / only in the vision tower; the projector untouched). Per row: ASR and clean accuracy reached (two-key: also each
key alone), the reference-mode and reference-free scan against the zoo's self-generated calibration (verdict,
score, threshold), and the data-free and few-shot (64 clean training samples) ``subspace`` sanitize and the PSR-style
``channel-restore`` baseline (64 clean samples), each evaluated on the zoo's test set. Only the public Python API is used; results are resumable (``results.jsonl``)
and summarised in ``summary.md`` / ``summary.json``. The benign false-positive side of the same threshold is the
transfer table's (``benchmarks/results/transfer/``): this table adds no benign rows.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

SPECS = [
    ("text-trigger", 0.1), ("two-key", 0.1), ("malicious-injection", 0.005), ("perceptual-hijack", 0.005),
    ("projector-and-llm-lora", 0.1), ("adaptive-spread", 0.1), ("adaptive-hide-target", 0.1),
    ("adaptive-mimic", 0.1), ("llm-lora-only", 0.1), ("vision-tower-only", 0.1), ("clean-label", 0.1),
]
SEED = 2


def name_of(variant: str, rate: float) -> str:
    return f"{variant}-p{rate * 100:g}"


def _m(ev) -> dict:
    m = ev.metrics
    return {"asr": m.asr, "clean": m.clean_accuracy, "one_key": m.one_key_activation}


def one(variant: str, rate: float, zoo: str, zoo_seed: int, out: str, seed: int = SEED) -> dict:
    """Attack, scan (with and without the reference), sanitize data-free and few-shot, evaluate; one row."""
    import projlens_defense as pld

    t0 = time.time()
    name = name_of(variant, rate)
    root = Path(out)
    z = pld.load_zoo(zoo, zoo_seed, progress=False)
    ck = root / "ckpt" / name
    if not (ck / "attack.json").is_file():
        pld.attack(variant, ck, zoo_preset=zoo, zoo_seed=zoo_seed, poison_rate=rate, seed=seed, force=True)
    rec = json.loads((ck / "attack.json").read_text())
    row: dict = {"name": name, "variant": variant, "rate": rate, "seed": seed, "metrics": rec["metrics"],
                 "adaptive": rec.get("adaptive"), "train_time_s": rec.get("train_time_s")}
    for mode, ref in (("reference", z.reference), ("reference-free", None)):
        [res] = pld.scan([ck], reference=ref)
        d = res.to_dict()
        row[f"scan_{mode}"] = {k: d.get(k) for k in ("verdict", "score", "threshold", "p_value", "reason",
                                                     "suspected_target_tokens", "zscores", "scope", "warnings")}
    for how, kw in (("data-free", {}), ("few-shot", {"clean_data": z.train_data, "n_clean": 64, "n_eval": 0})):
        san = root / "sanitized" / f"{name}-{how}"
        san.parent.mkdir(parents=True, exist_ok=True)
        try:
            r = pld.sanitize(ck, san, force=True, **kw)
        except pld.NothingRemovedError as e:
            row[how] = {"removed": 0, "message": str(e)[:300], "asr": rec["metrics"]["asr"],
                        "clean": rec["metrics"]["clean_accuracy"]}
            continue
        row[how] = {"removed": r.report.get("rank"), "warnings": r.warnings, **_m(pld.evaluate(san, variant))}
    row["seconds"] = round(time.time() - t0, 1)
    return row


def psr(row: dict, zoo: str, zoo_seed: int, out: str) -> dict:
    """The PSR-style baseline (`channel-restore`, 64 clean samples) on a row's checkpoint."""
    import projlens_defense as pld

    z = pld.load_zoo(zoo, zoo_seed, progress=False)
    ck, san = Path(out) / "ckpt" / row["name"], Path(out) / "sanitized" / f"{row['name']}-psr"
    san.parent.mkdir(parents=True, exist_ok=True)
    try:
        r = pld.sanitize(ck, san, method="channel-restore", clean_data=z.train_data, n_clean=64, n_eval=0, force=True)
    except pld.NothingRemovedError as e:
        return {**row, "psr": {"removed": 0, "message": str(e)[:300], "asr": row["metrics"]["asr"],
                               "clean": row["metrics"]["clean_accuracy"]}}
    return {**row, "psr": {"removed": r.report.get("n_restored"), **_m(pld.evaluate(san, row["variant"]))}}


def markdown(zoo: str, rows: list[dict]) -> str:
    seeds = ", ".join(str(x) for x in sorted({r.get("seed", SEED) for r in rows})) or str(SEED)
    lines = [f"## Threat table, {zoo} zoo (seed {seeds}; nothing in the defense was chosen on these checkpoints)", "",
             "| attack | rate | ASR | clean | one key alone (image / text) | scan ref: verdict (score / thr) "
             "| changed outside the projector | scan ref-free | data-free ASR / clean | few-shot ASR / clean "
             "| PSR-style channel-restore ASR / clean |", "|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(d: dict | None) -> str:
        if d is None:
            return "-"
        return f"{d['asr']:.3f} / {d['clean']:.3f}" + ("" if d["removed"] else " (nothing removed)")

    for r in rows:
        m, a, b = r["metrics"], r["scan_reference"], r["scan_reference-free"]
        ok = m.get("one_key_activation")
        keys = "-" if not ok else f"{ok['image']:.3f} / {ok['text']:.3f}"
        score = "-" if a["score"] is None else f"{a['score']:.2f} / {a['threshold']:.2f}"
        changed = (a.get("scope") or {}).get("changed") or {}
        outside = ", ".join(f"{c} {n}" for c, n in sorted(changed.items()) if n) or "none"
        lines.append(f"| {r['variant']} | {r['rate']:g} | {m['asr']:.3f} | {m['clean_accuracy']:.3f} | {keys} | "
                     f"{a['verdict']} ({score}) | {outside} | {b['verdict']} | {f(r.get('data-free'))} | "
                     f"{f(r.get('few-shot'))} | {f(r.get('psr'))} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", default="default", help="zoo preset")
    ap.add_argument("--zoo-seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=SEED, help="attack seed (another seed is a fresh set of checkpoints)")
    ap.add_argument("--only", nargs="*", help="names of the rows to run (default: all)")
    ap.add_argument("--no-psr", action="store_true", help="skip the PSR-style channel-restore baseline")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    import projlens_defense as pld

    pld.load_zoo(args.zoo, args.zoo_seed)  # built (and self-calibrated) once, before the workers start
    done_path = args.out / "results.jsonl"
    done = {}
    if done_path.is_file():
        done = {r["name"]: r for r in map(json.loads, done_path.read_text().splitlines())}
    todo = [(v, r) for v, r in SPECS if name_of(v, r) not in done and (not args.only or name_of(v, r) in args.only)]
    with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(one, v, r, args.zoo, args.zoo_seed, str(args.out), args.seed) for v, r in todo]
        for fut in futures:
            row = fut.result()
            done[row["name"]] = row
            with done_path.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(f"{row['name']}: ASR {row['metrics']['asr']}, ref {row['scan_reference']['verdict']}, "
                  f"data-free {row['data-free'].get('asr')}, few-shot {row['few-shot'].get('asr')} "
                  f"({row['seconds']} s)", flush=True)
    if not args.no_psr:
        todo_psr = [r for r in done.values() if "psr" not in r]
        with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
            n = len(todo_psr)
            for row in pool.map(psr, todo_psr, [args.zoo] * n, [args.zoo_seed] * n, [str(args.out)] * n):
                done[row["name"]] = row
                print(f"{row['name']}: channel-restore {row['psr']}", flush=True)
        done_path.write_text("".join(json.dumps(done[k]) + "\n" for k in done))
    rows = [done[name_of(v, r)] for v, r in SPECS if name_of(v, r) in done]
    (args.out / "summary.json").write_text(json.dumps({"rows": rows, "wall_time_s": round(time.time() - t0, 1)},
                                                      indent=2))
    (args.out / "summary.md").write_text(markdown(args.zoo, rows))
    print(markdown(args.zoo, rows))


if __name__ == "__main__":
    main()
