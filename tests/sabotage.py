"""Sabotage check: break the product on purpose, one break at a time, and show the fast suite turns red.

    python tests/sabotage.py [--out sabotage.md] [--only NAME ...]

Each break is a textual patch of one library file, applied to a fresh `git worktree` of HEAD plus the
working tree's changes (so the repository itself is never modified), where the fast suite then runs with
`-x` (it stops at the first failure, which names the test that caught the break). A break the suite does
not catch is a hole in the tests; the script exits 1 if there is any. The caller's OMP_NUM_THREADS is kept
(on a shared machine, 1 avoids oversubscription), except for the thread-count break, which needs the suite's
zoo build to run on every core.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# name -> (file, old text, new text, what it breaks)
SABOTAGES: dict[str, tuple[str, str, str, str]] = {
    "scan-decision-inverted": (
        "projlens_defense/detectors/scan.py",
        "if math.isfinite(score) and score > cal.threshold(self.mode, used):",
        "if math.isfinite(score) and not score > cal.threshold(self.mode, used):",
        "scan flags what is below the threshold and clears what is above",
    ),
    "subspace-removal-no-op": (
        "projlens_defense/mitigations/subspace.py",
        "        weights[li] -= s * torch.outer(u, v)\n",
        "        weights[li] -= 0 * s * torch.outer(u, v)\n",
        "the subspace mitigation removes nothing",
    ),
    "asr-always-zero": (
        "projlens_defense/metrics.py",
        "    return float(np.mean([shows_target(o, target) for o in outputs]))",
        "    return 0.0",
        "the ASR metric reports 0 whatever the outputs",
    ),
    "calibration-threshold-ignored": (
        "projlens_defense/detectors/calibration.py",
        "        return float(t.isf(self.fpr / m, n - 1)) * math.sqrt(1 + 1 / n)",
        "        return 0.0",
        "the calibrated threshold is replaced by 0 (the benign null is ignored)",
    ),
    "writer-drops-a-tensor": (
        "projlens_defense/checkpoint/writer.py",
        "    mine = {k: v for k, v in new.items() if info.tensors is not None and info.tensors.file_of(k) == src_file}",
        "    mine = {k: v for k, v in new.items() if info.tensors is not None and info.tensors.file_of(k) == src_file}\n"
        "    mine = dict(list(mine.items())[1:])",
        "the checkpoint writer leaves one repaired tensor out of the output",
    ),
    "reader-skips-header-check": (
        "projlens_defense/checkpoint/safetensors_io.py",
        "            if n > MAX_HEADER_BYTES:",
        "            if False:",
        "the safetensors reader no longer bounds the declared header length",
    ),
    "zoo-build-thread-dependent": (
        "projlens_defense/zoo/build.py",
        "    torch.set_num_threads(1)\n    try:\n        yield",
        "    try:\n        yield",
        "the zoo build runs on every core again (bytes depend on the thread count)",
    ),
    "zoo-key-ignores-platform": (
        "projlens_defense/zoo/build.py",
        '{"v": ZOO_FORMAT_VERSION, "platform": build_platform(), **fields}',
        '{"v": ZOO_FORMAT_VERSION, **fields}',
        "the zoo cache key leaves out the build platform (a zoo built by another torch or CPU ISA is reused)",
    ),
    "fine-prune-prunes-nothing": (
        "projlens_defense/mitigations/fine_prune.py",
        "            pruned = trial\n",
        "            pass\n",
        "fine-prune prunes no channel (it degrades to plain clean fine-tuning)",
    ),
    "unlearn-trains-nothing": (
        "projlens_defense/mitigations/unlearn.py",
        "                opt.step()\n",
        "                pass\n",
        "unlearn's unlearning steps update nothing (the projector comes back unchanged)",
    ),
}


def _worktree() -> Path:
    tmp = Path(tempfile.mkdtemp(prefix="projlens-sabotage-"))
    shutil.rmtree(tmp)
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(tmp), "HEAD"], check=True)
    diff = subprocess.run(["git", "-C", str(ROOT), "diff", "HEAD", "--binary"], capture_output=True, check=True).stdout
    if diff:
        subprocess.run(["git", "-C", str(tmp), "apply", "--whitespace=nowarn", "-"], input=diff, check=True)
    return tmp


FRESH_CACHE = {"zoo-build-thread-dependent"}
"""Breaks only a fresh build can show (a cached zoo was built before the break): run with an empty cache."""


def run_one(name: str, python: str, extra: list[str]) -> tuple[str, str, float]:
    """Apply one sabotage in a fresh worktree, run the fast suite with -x; (outcome, first failing test, seconds)."""
    rel, old, new, _ = SABOTAGES[name]
    tree = _worktree()
    try:
        path = tree / rel
        text = path.read_text()
        if text.count(old) != 1:
            return "patch-failed", f"{rel}: the text to break was found {text.count(old)} times", 0.0
        path.write_text(text.replace(old, new))
        t0 = time.time()
        env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}
        if name in FRESH_CACHE:
            env["PROJLENS_CACHE"] = tempfile.mkdtemp(prefix="projlens-sabotage-cache-")
            env.pop("OMP_NUM_THREADS", None)  # the suite's own zoo build uses every core, as on CI
        r = subprocess.run([python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *extra], cwd=tree, env=env,
                           capture_output=True, text=True)
        secs = time.time() - t0
        failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", r.stdout, re.M)
        if r.returncode == 0:
            return "NOT CAUGHT", "", secs
        return "caught", failed[0] if failed else f"pytest exit {r.returncode}", secs
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", choices=sorted(SABOTAGES), help="run only these breaks")
    ap.add_argument("--out", type=Path, help="write the table (Markdown) here too")
    ap.add_argument("--python", default=sys.executable, help="interpreter with the project's test dependencies")
    ap.add_argument("pytest_args", nargs="*", help="extra pytest arguments (e.g. a test file to speed things up)")
    args = ap.parse_args()
    rows = ["| break | what it breaks | outcome | first failing test | pytest s |", "|---|---|---|---|---|"]
    holes = 0
    for name in args.only or list(SABOTAGES):
        outcome, test, secs = run_one(name, args.python, args.pytest_args)
        holes += outcome != "caught"
        rows.append(f"| {name} | {SABOTAGES[name][3]} | {outcome} | `{test}` | {secs:.0f} |")
        print(rows[-1], flush=True)
    table = "\n".join(rows) + "\n"
    if args.out:
        args.out.write_text(table)
    print(table)
    return 1 if holes else 0


if __name__ == "__main__":
    sys.exit(main())
