"""Data-free `sanitize` over a whole population benchmark: every backdoored and benign cell repaired and evaluated.

    OMP_NUM_THREADS=1 python benchmarks/population_sanitize.py runs/population --jobs 2

Reads a `bench --preset population` output folder (its `results.jsonl` and `checkpoints/`), runs the default
data-free repair (`subspace`, the zoo's self-generated calibration, no clean data; with `--clean-data`, the
few-shot repair with 64 of those samples) on each cell, evaluates the
repaired checkpoint on the zoo's test set (ASR with the cell's trigger; benign cells with the trigger they were
measured with) and writes `sanitize.jsonl` (resumable) and `sanitize.md`: per family the ASR before / after and the
clean-accuracy change against the cell itself and against the population's benign mean, and what the benign cells
lose. A cell the repair finds nothing in is recorded as such (exit 6 / NothingRemovedError: no output written).
Nothing was chosen on these checkpoints; the numbers are held out for the repair's defaults.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from multiprocessing import get_context
from pathlib import Path

import projlens_defense as pld

EFFECTIVE_ASR = pld.EFFECTIVE_ASR


def one(rec: dict, root: Path, zoo: str, params: dict | None = None, clean_data: Path | None = None) -> dict:
    """Repair one cell (data-free, or few-shot with ``clean_data``) and evaluate the result (the cell's own metrics
    are the 'before')."""
    t0 = time.time()
    ck = root / "checkpoints" / rec["key"]
    variant, before = next(iter(rec["metrics"].items()))
    row = {"key": rec["key"], "label": rec.get("label"), "variant": rec["cell"]["variant"], "benign": rec["benign"],
           "rate": rec["cell"]["poison_rate"], "eval_variant": variant,
           "before": {"asr": before.get("asr"), "clean": before.get("clean_accuracy")}}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "repaired"
        try:
            res = pld.sanitize(ck, out, params=params, clean_data=clean_data, n_clean=64, n_eval=0).to_dict()
        except pld.NothingRemovedError as e:
            row.update(removed=0, message=str(e).splitlines()[0][:300], after=dict(row["before"]))
        else:
            ev = pld.evaluate(out, None if variant == "none" else variant, zoo_preset=zoo).metrics
            row.update(removed=res["report"].get("rank"), after={"asr": ev.asr, "clean": ev.clean_accuracy})
        shutil.rmtree(out, ignore_errors=True)
    row["seconds"] = round(time.time() - t0, 1)
    return row


def summarise(rows: list[dict], mode: str = "Data-free") -> list[str]:
    """The markdown summary: overall, then per family."""
    benign = [r for r in rows if r["benign"]]
    bd = [r for r in rows if not r["benign"]]
    mean_benign = statistics.fmean(r["before"]["clean"] for r in benign) if benign else float("nan")
    eff = [r for r in bd if (r["before"]["asr"] or 0) >= EFFECTIVE_ASR]

    def pts(x: float) -> str:
        return f"{100 * x:+.1f}"

    L = [f"# {mode} sanitize over the population ({len(bd)} backdoored, {len(benign)} benign cells)", "",
         f"- benign mean clean accuracy (before): {mean_benign:.4f}"]
    if eff:
        after = sorted(r["after"]["asr"] for r in eff)
        L.append(f"- effective backdoors (ASR >= {EFFECTIVE_ASR}): {len(eff)}; ASR after: max {after[-1]:.3f}, "
                 f"median {statistics.median(after):.3f}, <= 0.05 on {sum(a <= 0.05 for a in after)} of {len(eff)}; "
                 f"nothing removed on {sum(r['removed'] == 0 for r in eff)}")
        own = [r["after"]["clean"] - r["before"]["clean"] for r in eff]
        vs = [r["after"]["clean"] - mean_benign for r in eff]
        L.append(f"- their clean accuracy after vs before the repair: mean {pts(statistics.fmean(own))} points, worst "
                 f"{pts(min(own))}; vs the benign mean: mean {pts(statistics.fmean(vs))}, worst {pts(min(vs))}, "
                 f"within 1 point on {sum(v >= -0.01 for v in vs)} of {len(eff)}")
    if benign:
        ch = [r["after"]["clean"] - r["before"]["clean"] for r in benign]
        L.append(f"- benign cells: something removed on {sum(r['removed'] != 0 for r in benign)} of {len(benign)}; "
                 f"clean change worst {pts(min(ch))} points")
    L += ["", "| family | cells | effective | ASR before (mean) | ASR after (mean / max) | nothing removed | "
              "clean change vs own (mean / worst) | clean after vs benign mean (worst) |", "|---|---|---|---|---|---|---|---|"]
    fams: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        fams["benign" if r["benign"] else r["variant"]].append(r)
    for fam, rs in sorted(fams.items()):
        own = [r["after"]["clean"] - r["before"]["clean"] for r in rs]
        a_after = [r["after"]["asr"] or 0.0 for r in rs]
        L.append(f"| {fam} | {len(rs)} | {sum((r['before']['asr'] or 0) >= EFFECTIVE_ASR for r in rs)} | "
                 f"{statistics.fmean(r['before']['asr'] or 0.0 for r in rs):.3f} | "
                 f"{statistics.fmean(a_after):.3f} / {max(a_after):.3f} | {sum(r['removed'] == 0 for r in rs)} | "
                 f"{pts(statistics.fmean(own))} / {pts(min(own))} | "
                 f"{pts(min(r['after']['clean'] for r in rs) - mean_benign)} |")
    return L


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("population", type=Path, help="a `bench --preset population` output folder")
    ap.add_argument("--zoo", default="default", help="the zoo preset the population was built on (for `evaluate`)")
    ap.add_argument("--jobs", type=int, default=1, help="cells repaired at once (processes; set OMP_NUM_THREADS=1)")
    ap.add_argument("--limit", type=int, default=0, help="only the first N cells (0: all)")
    ap.add_argument("--param", action="append", default=[], metavar="NAME=JSON",
                    help="a `subspace` parameter other than its default (repeatable), e.g. --param fpr=0.05")
    ap.add_argument("--out", type=Path, default=None, help="results file (default: POPULATION/sanitize.jsonl)")
    ap.add_argument("--clean-data", type=Path, default=None,
                    help="few-shot: 64 clean samples from this conversation JSON (e.g. the zoo's train.json)")
    ap.add_argument("--only", default="", help="comma-separated families to repair ('benign' for the benign cells)")
    ap.add_argument("--rate", type=float, default=None, help="only backdoored cells of this poison rate (and benign)")
    args = ap.parse_args()
    recs = [json.loads(line) for line in (args.population / "results.jsonl").read_text().splitlines() if line.strip()]
    if args.only:
        fams = set(args.only.split(","))
        recs = [r for r in recs if ("benign" if r["benign"] else r["cell"]["variant"]) in fams]
    if args.rate is not None:
        recs = [r for r in recs if r["benign"] or r["cell"]["poison_rate"] == args.rate]
    if args.limit:
        recs = recs[: args.limit]
    params = {k: json.loads(v) for k, v in (p.split("=", 1) for p in args.param)} or None
    out = args.out or args.population / "sanitize.jsonl"
    done = {json.loads(line)["key"] for line in out.read_text().splitlines() if line.strip()} if out.exists() else set()
    todo = [r for r in recs if r["key"] not in done]
    t0 = time.time()
    work = partial(one, root=args.population, zoo=args.zoo, params=params, clean_data=args.clean_data)
    with ProcessPoolExecutor(max(1, args.jobs), mp_context=get_context("spawn")) as pool, out.open("a") as f:
        for i, row in enumerate(pool.map(work, todo), 1):
            f.write(json.dumps(row) + "\n")
            f.flush()
            print(f"[{i}/{len(todo)}] {row['label']}: removed {row['removed']}, ASR {row['before']['asr']} -> "
                  f"{row['after']['asr']}, clean {row['before']['clean']} -> {row['after']['clean']} "
                  f"({row['seconds']} s)", flush=True)
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    keys = {r["key"] for r in recs}
    rows = [r for r in rows if r["key"] in keys]
    mode = "Few-shot (64 clean samples)" if args.clean_data else "Data-free"
    md = summarise(rows, mode) + ["", f"wall time this run: {time.time() - t0:.0f} s for {len(todo)} cells "
                                f"(`--jobs {args.jobs}`); per cell {statistics.fmean(r['seconds'] for r in rows):.1f} s"]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
