"""Issue-5 acceptance table: every mitigation on every variant (and benign controls), side by side.

For each checkpoint the runtime is loaded once, the test set's clean and triggered vision features are
computed once, and every method's repaired projector (or guard) is swapped in and evaluated in-process
(no checkpoints written). Data-free methods get no samples; few-shot ones get ``--n-clean`` clean samples
drawn (seeded) from the zoo's train.json, never a triggered one. Results are cached per cell in
``--out`` (rerun to resume) and printed as Markdown.

    python benchmarks/mitigation_table.py --ckpts /tmp/pl_ckpts --out runs/mitigation_table.json

Checkpoints are looked up as ``<variant>-p<rate>-s<seed>`` and ``benign-s<seed>`` under ``--ckpts``
(the names benchmarks/attack_table.py writes); with ``--generate-missing`` absent ones are trained.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from projlens_defense.attacks.evaluate import evaluate, prepare_eval_set
from projlens_defense.attacks.finetune import AttackConfig, run_attack
from projlens_defense.attacks.variants import VARIANTS, get_variant
from projlens_defense.checkpoint import load_projector
from projlens_defense.conversations import load_conversations
from projlens_defense.detectors.lens_context import lens_context
from projlens_defense.mitigations import MITIGATIONS, CleanData
from projlens_defense.runinfo import has_attack_record
from projlens_defense.runtime import LlavaRuntime
from projlens_defense.zoo.build import config_from_name, get_zoo


def modes(name: str) -> list[str]:
    cls = MITIGATIONS[name]
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


def run_cell(name: str, ckpt: Path, variant: str | None, args: argparse.Namespace, zoo: Any, test: list, train: list,
             reference: Any, done: dict, save: Any) -> None:
    rt = LlavaRuntime.from_pretrained(ckpt)
    suspect = load_projector(ckpt)
    es = prepare_eval_set(rt, test, get_variant(variant) if variant else None, args.seed)
    clean = CleanData.from_samples(rt, train, args.n_clean, args.clean_seed)
    lens, calibration = lens_context(ckpt, reference)
    key = f"{name}|none|-"
    if key not in done:
        t = time.time()
        r = evaluate(rt, es, projector=rt.projector)
        done[key] = {**r.to_dict(), "seconds": round(time.time() - t, 2)}
        save()
    for method in args.methods:
        for mode in modes(method):
            key = f"{name}|{method}|{mode}"
            if key in done:
                continue
            cls = MITIGATIONS[method]
            kw = {"lens": lens, "calibration": calibration} if MITIGATIONS[method].uses_lens else {}
            torch.manual_seed(0)
            t = time.time()
            res = cls(**kw).apply(suspect, reference, clean if mode == "few-shot" else None)
            fit_s = time.time() - t
            r = evaluate(rt, es, projector=res.as_module())
            done[key] = {**r.to_dict(), "seconds": round(fit_s, 2), "report": summarize(res.report)}
            print(f"{name:28s} {method:17s} {mode:9s} clean {r.clean_accuracy:.4f} ASR "
                  f"{'n/a' if r.asr is None else f'{r.asr:.4f}'}  ({fit_s:.0f} s) {done[key]['report']}", flush=True)
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
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--rate", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--benign-seeds", nargs="*", type=int, default=[0])
    ap.add_argument("--methods", nargs="*", default=list(MITIGATIONS))
    ap.add_argument("--n-clean", type=int, default=64)
    ap.add_argument("--clean-seed", type=int, default=0)
    ap.add_argument("--generate-missing", action="store_true")
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    zoo = get_zoo(config_from_name(args.zoo))
    done: dict = json.loads(args.out.read_text()) if args.out.is_file() else {}

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(done, indent=1))
        os.replace(tmp, args.out)

    benign = [f"benign-s{s}" for s in args.benign_seeds]
    if not args.table_only:
        test, train = load_conversations(zoo.test_data), load_conversations(zoo.train_data)
        reference = load_projector(zoo.reference)
        cells = [(b, None, AttackConfig(variant=None, seed=int(b.split("-s")[1]))) for b in benign]
        cells += [(f"{v}-p{args.rate:g}-s{args.seed}", v, AttackConfig(variant=v, poison_rate=args.rate, seed=args.seed))
                  for v in args.variants]
        for name, variant, cfg in cells:
            ckpt = args.ckpts / name
            if not has_attack_record(ckpt):
                if not args.generate_missing:
                    print(f"skip {name}: no checkpoint in {args.ckpts}", flush=True)
                    continue
                run_attack(cfg, zoo.reference, zoo.train_data, zoo.test_data, ckpt, progress=False)
            run_cell(name, ckpt, variant, args, zoo, test, train, reference, done, save)
    print(table(done, args.variants, args.rate, args.seed, benign, args.methods))


if __name__ == "__main__":
    main()
