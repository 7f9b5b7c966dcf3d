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

from projlens_defense.attacks.evaluate import evaluate, prepare_eval_set
from projlens_defense.attacks.finetune import AttackConfig, run_attack
from projlens_defense.attacks.variants import VARIANTS
from projlens_defense.conversations import load_conversations
from projlens_defense.runinfo import read_attack_record
from projlens_defense.runtime import LlavaRuntime
from projlens_defense.zoo.build import config_from_name, get_zoo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--zoo", default="default", choices=["default", "micro", "qwen2vl"])
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--rates", nargs="*", type=float, default=[0.1])
    ap.add_argument("--seeds", nargs="*", type=int, default=[0])
    ap.add_argument("--lora-rank", type=int, default=0)
    args = ap.parse_args()
    zoo = get_zoo(config_from_name(args.zoo), calibrate=False)  # attacks need no benign null
    args.out.mkdir(parents=True, exist_ok=True)
    test = load_conversations(zoo.test_data)

    def cell(name: str, cfg: AttackConfig) -> dict:
        d = args.out / name
        done = read_attack_record(d)
        if done is not None:
            return done.raw
        t = time.time()
        rec = run_attack(cfg, zoo.reference, zoo.train_data, zoo.test_data, d)
        print(f"{name}: {time.time() - t:.1f} s (attack + evaluation)", flush=True)
        return rec

    rows = []
    for seed in args.seeds:
        cell(f"benign-s{seed}", AttackConfig(variant=None, seed=seed, lora_rank=args.lora_rank))
        rt = LlavaRuntime.from_pretrained(args.out / f"benign-s{seed}")
        for v in args.variants:
            es = prepare_eval_set(rt, test, VARIANTS[v](), seed)
            b = evaluate(rt, es)
            for rate in args.rates:
                suffix = f"-lora{args.lora_rank}" if args.lora_rank else ""
                rec = cell(f"{v}-p{rate:g}-s{seed}{suffix}",
                           AttackConfig(variant=v, poison_rate=rate, seed=seed, lora_rank=args.lora_rank))
                m = rec["metrics"]
                rows.append((v, rate, seed, m["clean_accuracy"], m["asr"], m["false_activation"], b.clean_accuracy,
                             b.asr, b.false_activation, rec["wall_time_s"]))
    print("\n| variant | poison | seed | clean acc | ASR | false act. | benign clean acc | benign ASR | benign false act. | attack+eval s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]:g} | {r[2]} | {r[3]:.3f} | {r[4]:.3f} | {r[5]:.3f} | {r[6]:.3f} | {r[7]:.3f} | "
              f"{r[8]:.3f} | {r[9]:.1f} |")
    (args.out / "table.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
