"""Run every hostile-corpus case (and the pristine bases) through every command, each in its own
child process, and write a Markdown report: case x command -> exit code, wall time, peak RSS,
verdict (traceback? marker file? output checks), plus per-command and per-family summaries.

    OMP_NUM_THREADS=1 python tests/hostile_matrix.py --out matrix.md [--condensed short.md]
        [--commands reader,scan] [--only hf-]

Each child costs an interpreter start with torch (~2-3 s): the full matrix takes about half an hour
on one core. Exit status 1 if any run had a problem (see ``hostile_corpus.problems``).
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import hostile_corpus as hc


def _cell(res: hc.RunResult, bad: list[str]) -> str:
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


def _codes(counter: collections.Counter) -> str:
    return ", ".join(f"{code}: {n}" for code, n in sorted(counter.items()))


def _remove(path: Path | None) -> None:
    if path is not None and path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path is not None and os.path.lexists(path):
        path.unlink()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="Also write the full Markdown report here.")
    ap.add_argument("--condensed", type=Path, default=None,
                    help="Write a short report here (summaries, exceptions to exit 2, problems).")  # fmt: skip
    ap.add_argument("--commands", default=None, help="Comma-separated subset of: " + ", ".join(hc.COMMANDS))
    ap.add_argument("--only", default=None, help="Only cases whose name contains this.")
    ap.add_argument("--root", type=Path, default=None, help="Build the corpus here (default: a temp dir).")
    args = ap.parse_args()

    commands = args.commands.split(",") if args.commands else list(hc.COMMANDS)
    unknown = [c for c in commands if c not in hc.COMMANDS]
    if unknown:
        ap.error(f"unknown command(s) {unknown}; choose from {list(hc.COMMANDS)}")
    tmp = None if args.root else tempfile.mkdtemp(prefix="hostile-")
    root = args.root or Path(tmp) / "corpus"
    t0 = time.monotonic()
    hostile = hc.build_corpus(root)
    build_s = time.monotonic() - t0
    before = hc.snapshot(root)
    cases = hc.pristine_cases(root) + hostile
    if args.only:
        cases = [c for c in cases if args.only in c.name]
    markers = hc.marker_dir(root)
    work = root.parent / "work"

    rows, problems = [], []
    stats = {(kind, c): {"n": 0, "ok": 0, "code": 0, "tb": 0, "marker": 0, "hang": 0, "wall": 0.0, "rss": 0.0,
                         "codes": collections.Counter()} for kind in ("hostile", "pristine") for c in commands}  # fmt: skip
    fam: dict[tuple[str, str], collections.Counter] = collections.defaultdict(collections.Counter)
    fam_ok: dict[tuple[str, str], list[int]] = collections.defaultdict(lambda: [0, 0])
    t_run = time.monotonic()
    for case in cases:
        cells = []
        group = "pristine" if case.name.startswith("pristine-") else case.family
        for cmd in commands:
            res = hc.run_case(cmd, case, work)
            bad = hc.problems(res, case, markers)
            s = stats["pristine" if group == "pristine" else "hostile", cmd]
            s["n"] += 1
            s["ok"] += not bad
            s["code"] += res.returncode in hc.allowed_codes(case, cmd)
            s["tb"] += "Traceback" in res.output
            s["marker"] += any("marker" in b for b in bad)
            s["hang"] += res.timed_out or res.wall_s > case.time_limit
            s["wall"] = max(s["wall"], res.wall_s)
            s["rss"] = max(s["rss"], res.peak_rss_mb)
            s["codes"][res.returncode] += 1
            fam[group, cmd][res.returncode] += 1
            fam_ok[group, cmd][0] += not bad
            fam_ok[group, cmd][1] += 1
            cells.append(_cell(res, bad))
            if bad:
                problems.append(f"- `{cmd}` on `{case.name}`: {'; '.join(bad)}")
            for leaked in markers.iterdir():  # keep one leak from blaming later cases
                leaked.unlink()
            _remove(res.out)
        expected = "/".join("|".join(map(str, sorted(hc.allowed_codes(case, c)))) for c in commands)
        rows.append(f"| `{case.name}` | {expected} | " + " | ".join(cells) + " |")
        print(f"[{len(rows)}/{len(cases)}] {case.name}: {' | '.join(cells)}", file=sys.stderr, flush=True)
    run_s = time.monotonic() - t_run
    after = hc.snapshot(root)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    if changed:
        problems.append(f"- corpus inputs changed: {changed[:10]}")

    n_pristine = sum(c.name.startswith("pristine-") for c in cases)
    head = [
        f"Hostile corpus: {len(cases) - n_pristine} hostile cases + {n_pristine} pristine bases (built in "
        f"{build_s:.1f} s), each case x command in its own child process (timeout {hc.TIMEOUT_S:g} s; pristine "
        f"bases {hc.PRISTINE_TIMEOUT_S:g} s, "
        f"OMP_NUM_THREADS=1; {len(cases) * len(commands)} runs in {run_s / 60:.1f} min on {platform.machine()} "
        f"with {os.cpu_count()} CPUs, shared). Inputs unchanged afterwards: {'yes' if not changed else 'NO'}.",
        "",
        "Commands (`{ckpt}` the case, `{ref}` a pristine reference of the same family, `{data}` 8 LLaVA samples):",
        "",
        *[f"- `{c}`: " + ("detect_format + load_projector + load_lm_readout + load_tokenizer_vocab, exceptions "
                          "mapped as the CLI does" if c == "reader" else f"`projlens-defense {' '.join(hc.COMMANDS[c])}`")
          for c in commands],  # fmt: skip
        "",
        "A run is ok when its exit code is the case's expectation for that command, an error is one stderr line "
        "naming the file with the expected reason, a success has a warning naming the damage and an empty "
        "stderr, there is no traceback and no marker file, it ends within 10 s (pristine bases: 60 s) under 2 GB peak "
        "RSS, a failure "
        "leaves no output or temporary file, and a successful sanitize writes a complete copy whose projector "
        "loads (every file without projector tensors byte-identical).",
        "",
        "| command | cases | runs | ok | exit code as expected | exit codes | tracebacks | marker files "
        "| hangs (over limit) | max time | max peak RSS |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kind in ("hostile", "pristine"):
        for cmd in commands:
            s = stats[kind, cmd]
            if s["n"]:
                head.append(f"| {cmd} | {kind} | {s['n']} | {s['ok']} | {s['code']} | {_codes(s['codes'])} | "
                            f"{s['tb']} | {s['marker']} | {s['hang']} | {s['wall']:.1f} s | {s['rss']:.0f} MB |")
    groups = list(dict.fromkeys("pristine" if c.name.startswith("pristine-") else c.family for c in cases))
    head += ["", "Exit codes by case family (code: runs; ok/runs):", "",
             "| family | cases | " + " | ".join(commands) + " |", "|---|---|" + "---|" * len(commands)]  # fmt: skip
    for g in groups:
        n = sum(("pristine" if c.name.startswith("pristine-") else c.family) == g for c in cases)
        head.append(f"| {g} | {n} | " + " | ".join(
            f"{_codes(fam[g, cmd])} ({fam_ok[g, cmd][0]}/{fam_ok[g, cmd][1]} ok)" for cmd in commands) + " |")
    exceptions = [
        f"- `{c.name}`: " + ", ".join(f"{cmd} {'|'.join(map(str, sorted(hc.allowed_codes(c, cmd))))}"
                                      for cmd in commands) + f" ({c.description})"
        for c in cases if any(c.expected_for(cmd) not in (2, 3) for cmd in commands) or c.exits
    ]  # fmt: skip
    head += ["", "Cases where some command does not end in the case's error code (pristine bases: documented "
             "limits; hostile: the command succeeds because the damage is in a part it does not need):", "",
             *exceptions]  # fmt: skip
    tail = ["", f"Problems ({len(problems)}):", *(problems or ["- none"])]
    full = head + ["", "| case | expected (" + "/".join(commands) + ") | " + " | ".join(commands) + " |",
                   "|---|---|" + "---|" * len(commands), *rows] + tail  # fmt: skip
    text = "\n".join(full)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    if args.condensed:
        args.condensed.parent.mkdir(parents=True, exist_ok=True)
        args.condensed.write_text("\n".join(head + tail) + "\n")
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
