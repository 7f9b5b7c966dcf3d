"""Issue-2 acceptance table: every variant at the given poison rates and seeds, with benign controls.

Writes one checkpoint per cell under --out (reused by later runs: a cell whose attack.json exists is
read, not retrained) and prints a Markdown table of clean accuracy, ASR and false activation, with the
benign control's ASR/false activation measured with each variant's trigger.

    python benchmarks/attack_table.py --out runs/attack_table --rates 0.1 0.01 --seeds 0
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import projlens_defense as pld


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--zoo", default="default", choices=["default", "micro", "qwen2vl"])
    ap.add_argument("--variants", nargs="*", default=list(pld.VARIANTS))
    ap.add_argument("--rates", nargs="*", type=float, default=[0.1])
    ap.add_argument("--seeds", nargs="*", type=int, default=[0])
    ap.add_argument("--lora-rank", type=int, default=0)
    args = ap.parse_args()
    pld.load_zoo(args.zoo, progress=False)  # built (and self-calibrated) once, before the cells
    args.out.mkdir(parents=True, exist_ok=True)

    def cell(name: str, variant: str, **kw: object) -> pld.AttackRecord:
        d = args.out / name
        done = pld.read_attack_record(d)
        if done is not None:
            return done
        t = time.time()
        rec = pld.attack(variant, d, zoo_preset=args.zoo, lora_rank=args.lora_rank, force=True, **kw).record
        print(f"{name}: {time.time() - t:.1f} s (attack + evaluation)", flush=True)
        return rec

    rows = []
    for seed in args.seeds:
        cell(f"benign-s{seed}", "none", seed=seed)
        for v in args.variants:
            b = pld.evaluate(args.out / f"benign-s{seed}", v, zoo_preset=args.zoo, seed=seed).metrics
            for rate in args.rates:
                suffix = f"-lora{args.lora_rank}" if args.lora_rank else ""
                rec = cell(f"{v}-p{rate:g}-s{seed}{suffix}", v, poison_rate=rate, seed=seed)
                m = rec.metrics or {}
                rows.append((v, rate, seed, m["clean_accuracy"], m["asr"], m["false_activation"], b.clean_accuracy,
                             b.asr, b.false_activation, rec.raw["wall_time_s"]))
    print("\n| variant | poison | seed | clean acc | ASR | false act. | benign clean acc | benign ASR | benign false act. | attack+eval s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]:g} | {r[2]} | {r[3]:.3f} | {r[4]:.3f} | {r[5]:.3f} | {r[6]:.3f} | {r[7]:.3f} | "
              f"{r[8]:.3f} | {r[9]:.1f} |")
    (args.out / "table.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
