"""Run every hostile-corpus case through every available command, each in its own child process,
and print a Markdown table: case x command -> exit code, wall time, peak RSS, traceback?, marker?

    OMP_NUM_THREADS=1 python tests/hostile_matrix.py --out matrix.md [--commands reader,scan] [--only hf-]

Each child costs an interpreter start with torch (~2-3 s): the full matrix takes minutes per command.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import hostile_corpus as hc


def _cell(res: hc.RunResult, case: hc.Case, bad: list[str]) -> str:
    flags = []
    if "Traceback" in res.output:
        flags.append("TRACEBACK")
    if any("marker" in b for b in bad):
        flags.append("MARKER")
    if res.timed_out:
        flags.append("TIMEOUT")
    mark = "ok" if not bad else "**FAIL**"
    return f"{res.returncode} · {res.wall_s:.1f} s · {res.peak_rss_mb:.0f} MB · {mark}" + (
        f" {' '.join(flags)}" if flags else ""
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="Also write the Markdown here.")
    ap.add_argument("--commands", default=None, help="Comma-separated subset of: " + ", ".join(hc.COMMANDS))
    ap.add_argument("--only", default=None, help="Only cases whose name contains this.")
    ap.add_argument("--root", type=Path, default=None, help="Build the corpus here (default: a temp dir).")
    args = ap.parse_args()

    avail = hc.available_commands()
    wanted = args.commands.split(",") if args.commands else list(hc.COMMANDS)
    commands = [c for c in wanted if avail.get(c)]
    skipped = [c for c in wanted if not avail.get(c)]
    tmp = None if args.root else tempfile.mkdtemp(prefix="hostile-")
    root = args.root or Path(tmp) / "corpus"
    t0 = time.monotonic()
    cases = hc.build_corpus(root)
    if args.only:
        cases = [c for c in cases if args.only in c.name]
    build_s = time.monotonic() - t0
    unusable = {c: why for c in commands if (why := hc.probe(c, root))}
    commands = [c for c in commands if c not in unusable]
    markers = hc.marker_dir(root)

    rows, problems = [], []
    stats = {c: {"n": 0, "ok": 0, "code": 0, "tb": 0, "marker": 0, "hang": 0, "wall": 0.0, "rss": 0.0}
             for c in commands}  # fmt: skip
    for case in cases:
        cells = []
        for cmd in commands:
            res = hc.run_case(cmd, case, root.parent / "work")
            bad = hc.problems(res, case, markers)
            s = stats[cmd]
            s["n"] += 1
            s["ok"] += not bad
            s["code"] += res.returncode == case.expected
            s["tb"] += "Traceback" in res.output
            s["marker"] += any("marker" in b for b in bad)
            s["hang"] += res.timed_out or res.wall_s > hc.TIMEOUT_S
            s["wall"] = max(s["wall"], res.wall_s)
            s["rss"] = max(s["rss"], res.peak_rss_mb)
            cells.append(_cell(res, case, bad))
            if bad:
                problems.append(f"- `{cmd}` on `{case.name}`: {'; '.join(bad)}")
            for leaked in markers.iterdir():  # keep one leak from blaming later cases
                leaked.unlink()
        rows.append(f"| `{case.name}` | {case.expected} | " + " | ".join(cells) + " |")
        print(f"[{len(rows)}/{len(cases)}] {case.name}: {' | '.join(cells)}", file=sys.stderr, flush=True)

    lines = [
        f"Hostile corpus: {len(cases)} cases (built in {build_s:.1f} s), each command in its own child process "
        f"(timeout {hc.TIMEOUT_S:g} s, OMP_NUM_THREADS=1). Cell: exit code · wall time · peak RSS · verdict.",
        "",
        "| command | cases | handled | exit code as expected | tracebacks | marker files | hangs (>10 s) | max time | max peak RSS |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for cmd in commands:
        s = stats[cmd]
        lines.append(f"| {cmd} | {s['n']} | {s['ok']} | {s['code']} | {s['tb']} | {s['marker']} | {s['hang']} | "
                     f"{s['wall']:.1f} s | {s['rss']:.0f} MB |")  # fmt: skip
    if skipped:
        lines += ["", f"Not in the CLI yet (skipped): {', '.join(skipped)}."]
    lines += [f"Skipped: {why}" for why in unusable.values()]
    lines += ["", "| case | expected | " + " | ".join(commands) + " |", "|---|---|" + "---|" * len(commands), *rows]
    lines += ["", f"Problems ({len(problems)}):", *(problems or ["- none"])]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
