"""Issue-5 acceptance table: every mitigation on every variant (and benign controls), side by side.

Each checkpoint is measured as is and after every method, through the public API: ``pld.sanitize`` writes the
repaired checkpoint (hard-linked to its input: only the projector differs) under ``<--out>.repaired/`` and
``pld.evaluate`` measures it on the zoo's test set. Data-free methods get no samples; few-shot ones get
``--n-clean`` clean samples drawn (seeded by ``--clean-seed``) from the zoo's train.json, never a triggered one.
Run-time guards (``norm-guard``) are not weight edits, so ``sanitize`` cannot write them: they are listed as
skipped. A method that removes nothing is recorded with the unrepaired numbers and ``removed: 0``. Results are
cached per cell in ``--out`` (rerun to resume) and printed as Markdown.

    python benchmarks/mitigation_table.py --ckpts /tmp/pl_ckpts --out runs/mitigation_table.json

Checkpoints are looked up as ``<variant>-p<rate>-s<seed>`` and ``benign-s<seed>`` under ``--ckpts``
(the names benchmarks/attack_table.py writes); with ``--generate-missing`` absent ones are trained.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import projlens_defense as pld


def modes(name: str) -> list[str]:
    cls = pld.MITIGATIONS[name]
    if cls.run_time_only:  # a guard, not a weight edit: sanitize cannot write it
        return []
    out = [] if cls.requires_clean else ["data-free"]
    return out + (["few-shot"] if cls.uses_clean else [])


def summarize(report: dict) -> dict:
    keep = ("rank", "energy_removed", "n_pruned", "outcome", "final_support", "rounds", "target_tokens", "selection",
            "verify_support", "removed")
    out = {k: report[k] for k in keep if k in report}
    if "probe" in report:
        out["probe_target"] = report["probe"].get("target")
        out["probe_support"] = report["probe"].get("support")
    return out


def run_cell(name: str, ckpt: Path, variant: str | None, args: argparse.Namespace, zoo: Any, done: dict,
             save: Callable[[], None]) -> None:
    def measure(path: Path) -> dict:
        return pld.evaluate(path, variant, data=zoo.test_data, seed=args.seed).metrics.to_dict()

    key = f"{name}|none|-"
    if key not in done:
        t = time.time()
        done[key] = {**measure(ckpt), "seconds": round(time.time() - t, 2)}
        save()
    repaired = args.out.with_suffix(".repaired")
    repaired.mkdir(parents=True, exist_ok=True)
    for method in args.methods:
        for mode in modes(method):
            key = f"{name}|{method}|{mode}"
            if key in done:
                continue
            clean = {"clean_data": zoo.train_data, "n_clean": args.n_clean, "n_eval": 0,
                     "clean_seed": args.clean_seed} if mode == "few-shot" else {}
            t = time.time()
            try:
                res = pld.sanitize(ckpt, repaired / f"{name}-{method}-{mode}", method=method, reference=zoo.reference,
                                   force=True, link=True, **clean)
            except pld.NothingRemovedError as e:
                done[key] = {**done[f"{name}|none|-"], "seconds": round(time.time() - t, 2),
                             "report": {"removed": 0, "message": str(e)[-300:]}}
                save()
                continue
            fit_s = time.time() - t
            r = measure(res.out)
            done[key] = {**r, "seconds": round(fit_s, 2), "report": summarize(res.report)}
            asr = "n/a" if r["asr"] is None else f"{r['asr']:.4f}"
            print(f"{name:28s} {method:17s} {mode:9s} clean {r['clean_accuracy']:.4f} ASR {asr}  ({fit_s:.0f} s) "
                  f"{done[key]['report']}", flush=True)
            save()


def table(done: dict, variants: list[str], rate: float, seed: int, benign: list[str], methods: list[str]) -> str:
    cells = [f"{v}-p{rate:g}-s{seed}" for v in variants]
    base = done.get(f"benign-s{seed}|none|-", {}).get("clean_accuracy")
    head = "| method | mode | " + " | ".join(variants) + " | " + " | ".join(f"{b} clean (Δ)" for b in benign) + " |"
    lines = [f"ASR / clean accuracy (Δ clean vs the benign control benign-s{seed} = "
             f"{'n/a' if base is None else f'{base:.4f}'}); n_test 400 clean, triggered = eligible test inputs.", "",
             head, "|" + "---|" * (2 + len(variants) + len(benign))]
    rows = [("none", "-")] + [(m, md) for m in methods for md in modes(m)]
    for m, md in rows:
        out = [m, md]
        for c in cells:
            r = done.get(f"{c}|{m}|{md}")
            if r is None:
                out.append("")
                continue
            d = "" if base is None else f" ({(r['clean_accuracy'] - base) * 100:+.1f})"
            out.append(f"{r['asr']:.3f} / {r['clean_accuracy']:.3f}{d}")
        for b in benign:
            r, r0 = done.get(f"{b}|{m}|{md}"), done.get(f"{b}|none|-")
            out.append("" if r is None or r0 is None else
                       f"{r['clean_accuracy']:.3f} ({(r['clean_accuracy'] - r0['clean_accuracy']) * 100:+.1f})")
        lines.append("| " + " | ".join(out) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpts", type=Path, required=True, help="Directory of attack/benign checkpoints.")
    ap.add_argument("--out", type=Path, required=True, help="Results JSON (resumable).")
    ap.add_argument("--zoo", default="default", choices=["default", "micro"])
    ap.add_argument("--variants", nargs="*", default=list(pld.VARIANTS))
    ap.add_argument("--rate", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--benign-seeds", nargs="*", type=int, default=[0])
    ap.add_argument("--methods", nargs="*", default=list(pld.MITIGATIONS))
    ap.add_argument("--n-clean", type=int, default=64)
    ap.add_argument("--clean-seed", type=int, default=0)
    ap.add_argument("--generate-missing", action="store_true")
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    zoo = pld.load_zoo(args.zoo, progress=False)
    done: dict = json.loads(args.out.read_text()) if args.out.is_file() else {}

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(done, indent=1))
        os.replace(tmp, args.out)

    benign = [f"benign-s{s}" for s in args.benign_seeds]
    if not args.table_only:
        skipped = [m for m in args.methods if pld.MITIGATIONS[m].run_time_only]
        if skipped:
            print(f"skip {', '.join(skipped)}: run-time guard(s), not weight edits (sanitize cannot write them)")
        cells = [(b, None, {"variant": "none", "seed": int(b.split("-s")[1])}) for b in benign]
        cells += [(f"{v}-p{args.rate:g}-s{args.seed}", v, {"variant": v, "poison_rate": args.rate, "seed": args.seed})
                  for v in args.variants]
        for name, variant, spec in cells:
            ckpt = args.ckpts / name
            if not pld.has_attack_record(ckpt):
                if not args.generate_missing:
                    print(f"skip {name}: no checkpoint in {args.ckpts}", flush=True)
                    continue
                pld.attack(out=ckpt, zoo_preset=args.zoo, force=True, **spec)
            run_cell(name, ckpt, variant, args, zoo, done, save)
    print(table(done, args.variants, args.rate, args.seed, benign, args.methods))


if __name__ == "__main__":
    main()
