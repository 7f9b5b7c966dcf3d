"""Suspected target tokens over a population benchmark: is the target's first word among the scan's top-5?

    OMP_NUM_THREADS=1 python benchmarks/population_tokens.py runs/population --reference REF

Scans every cell of a `bench --preset population` output folder in reference mode (the tokens `scan` prints) and
reports, per family, how often the first word of the cell's target is in the top-5 (effective backdoors only,
ASR >= 0.5), and how many benign cells' top-5 hold one of the population's target first words. Writes
`tokens.jsonl` and prints the summary.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import projlens_defense as pld

EFFECTIVE_ASR = pld.EFFECTIVE_ASR


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("population", type=Path, help="a `bench --preset population` output folder")
    ap.add_argument("--reference", required=True, type=Path, help="the reference model the cells were tuned from")
    ap.add_argument("--top", type=int, default=5, help="how many suspected tokens count (default 5)")
    args = ap.parse_args()
    recs = [json.loads(line) for line in (args.population / "results.jsonl").read_text().splitlines() if line.strip()]
    paths = [args.population / "checkpoints" / r["key"] for r in recs]
    rows = []
    for r, p, res in zip(recs, paths, pld.scan(paths, reference=args.reference), strict=True):
        rec = pld.read_attack_record(p)
        rows.append({"key": r["key"], "family": "benign" if r["benign"] else r["cell"]["variant"],
                     "asr": next(iter(r["metrics"].values())).get("asr"),
                     "first_word": None if r["benign"] or rec is None or not rec.behaviour_target
                     else rec.behaviour_target.split()[0].lower(),
                     "tokens": res.suspected_target_tokens, "verdict": res.verdict})
    (args.population / "tokens.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    words = {x["first_word"] for x in rows if x["first_word"]}
    hits: dict[str, list[bool]] = defaultdict(list)
    for x in rows:
        if x["first_word"] and (x["asr"] or 0) >= EFFECTIVE_ASR:
            hits[x["family"]].append(x["first_word"] in x["tokens"][: args.top])
    every = [h for v in hits.values() for h in v]
    print(f"target first word in the top-{args.top}: {sum(every) / max(1, len(every)):.3f} of {len(every)} effective")
    for fam, v in sorted(hits.items()):
        print(f"  {fam:24s} {sum(v) / len(v):.2f} ({len(v)})")
    benign = [x for x in rows if x["family"] == "benign"]
    print(f"benign top-{args.top} holding one of the first words {sorted(words)}: "
          f"{sum(bool(words & set(x['tokens'][: args.top])) for x in benign)} of {len(benign)}")


if __name__ == "__main__":
    main()
