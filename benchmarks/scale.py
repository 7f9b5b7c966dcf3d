"""Memory and wall time of `scan` and `sanitize` on a LLaVA-1.5-7B-shaped checkpoint (issue 17, "Real-size models").

Writes the sharded bf16 checkpoint of ``benchmarks/scan_speed.py`` (its own writer: projector 1024 -> 4096 -> 4096,
Llama-7B LLM, CLIP ViT-L tower, 3 shards, ~14 GB) and its reference projector, then measures in one run, each
command in its own subprocess (peak RSS from ``os.wait4``'s rusage of that child):

* ``scan CKPT --reference REF``: peak RSS;
* data-free ``sanitize CKPT --method subspace --param rank=1 --reference REF --out OUT``: peak RSS and wall time;
* a plain ``cp -r CKPT OUT`` (and ``cp -r`` followed by ``sync`` of the copied files, since sanitize fsyncs
  what it writes): wall time;
* ``sanitize ... --link``: wall time;
* the writer alone (``write_projector`` in-process, copying and with ``link=True``): wall time, to separate what
  the copy costs from the method's own compute.

Wall times are medians over ``--repeats`` rounds whose order rotates (page-cache effects fall on each in turn).

``--fill dense`` (the default) writes every tensor (a real checkpoint's cost: every byte must be copied);
``--fill sparse`` leaves the tensors scan never reads as holes, as scan_speed.py does (a copy then only moves
the ~0.7 GB of data). ``--scale F`` keeps a fraction F of the LLM and vision layers (embeddings, lm_head and
projector stay full size) when the disk cannot take ~2 x 14 GB. Results go to ``--results`` (Markdown) with the
command line. The files are deleted at the end unless ``--keep``.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/scale.py [--fill dense|sparse] [--scale 1.0] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import projlens_defense as pld

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scan_speed  # noqa: E402  (the 7B-shaped checkpoint writer)

KINDS = ("cp", "cp+sync", "sanitize", "link", "write", "write-link")
TARGETS = {"scan_rss_gb": 1.5, "sanitize_rss_gb": 2.0, "sanitize_vs_cp": 1.2, "link_s": 5.0}


def build(root: Path, fill: str, scale: float) -> tuple[Path, Path, int]:
    """scan_speed.build, with every tensor written (``dense``) and/or fewer layers (``scale`` < 1)."""
    saved = scan_speed.LAYERS, scan_speed.V_LAYERS, scan_speed._real
    try:
        if scale < 1:
            scan_speed.LAYERS = max(2, round(saved[0] * scale))  # the scan reads the first two LLM layers
            scan_speed.V_LAYERS = max(1, round(saved[1] * scale))
        if fill == "dense":
            scan_speed._real = lambda name: True
        return scan_speed.build(root)
    finally:
        scan_speed.LAYERS, scan_speed.V_LAYERS, scan_speed._real = saved


def run(cmd: list[str]) -> dict:
    """Run ``cmd`` in its own process: wall time, exit code, peak RSS (of it and the children it waited for)."""
    with tempfile.TemporaryFile() as fo, tempfile.TemporaryFile() as fe:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=fo, stderr=fe)
        _, status, usage = os.wait4(p.pid, 0)  # this child's own rusage (RUSAGE_CHILDREN would be a running max)
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        fo.seek(0)
        fe.seek(0)
        out, err = fo.read().decode(errors="replace"), fe.read().decode(errors="replace")
    rss = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # bytes (Linux reports KiB)
    return {"cmd": cmd, "wall_s": wall, "rc": p.returncode, "peak_rss": rss, "stdout": out, "stderr": err}


def write_step(ckpt: Path, out: Path, link: bool) -> float:
    """Wall time of the writer alone (``write_projector``: copy or link, patch, fsync, verify, rename), in-process,
    for a projector that differs from the checkpoint's: the part of sanitize that scales with the checkpoint."""
    proj = pld.load_projector(ckpt)
    new = proj.with_weights([layer.weight * 0.5 for layer in proj.layers])
    t0 = time.perf_counter()
    pld.write_projector(ckpt, new, out, link=link)
    return time.perf_counter() - t0


def disk_bytes(path: Path) -> int:
    return sum(os.stat(p).st_blocks * 512 for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def shared_files(a: Path, b: Path) -> int:
    return sum(1 for p in a.rglob("*") if p.is_file() and os.stat(p).st_ino == os.stat(b / p.relative_to(a)).st_ino)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where to write the checkpoint and the copies")
    ap.add_argument("--fill", choices=["dense", "sparse"], default="dense")
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of the LLM / vision layers kept (0 < F <= 1)")
    ap.add_argument("--repeats", type=int, default=3, help="timing rounds (cp, sanitize, sanitize --link each)")
    ap.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "results" / "scale.md")
    ap.add_argument("--append", action="store_true", help="append to --results instead of replacing it")
    ap.add_argument("--keep", action="store_true", help="keep the files")
    args = ap.parse_args(argv)
    if not 0 < args.scale <= 1:
        raise SystemExit("--scale must be in (0, 1]")
    command = "OMP_NUM_THREADS={} .venv/bin/python benchmarks/scale.py {}".format(
        os.environ.get("OMP_NUM_THREADS", "<unset>"), shlex.join(argv if argv is not None else sys.argv[1:]))

    full = sum(scan_speed._numel(s) * 2 for _, s in scan_speed.llava_7b_tensors())
    need = (full * args.scale * 2.2 if args.fill == "dense" else 3e9)
    free = shutil.disk_usage(args.dir).free
    if free < need:
        raise SystemExit(f"{args.dir}: {free / 2**30:.1f} GiB free, need ~{need / 2**30:.1f} GiB; lower --scale "
                         "or use --fill sparse")
    root = Path(tempfile.mkdtemp(prefix="projlens-scale-", dir=args.dir))
    py = [sys.executable, "-m", "projlens_defense"]
    lines: list[str] = []

    def say(s: str = "") -> None:
        print(s, flush=True)
        lines.append(s)

    try:
        t0 = time.perf_counter()
        ckpt, ref, total = build(root, args.fill, args.scale)
        fs = (shutil.which("findmnt") and subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "--target", str(root)],
                                                          capture_output=True, text=True).stdout.strip()) \
            or subprocess.run(["stat", "-f", "-c", "%T", str(root)], capture_output=True, text=True).stdout.strip()
        print(f"wrote {ckpt} in {time.perf_counter() - t0:.1f} s", flush=True)
        files = sorted(p.name for p in ckpt.iterdir())
        on_disk = disk_bytes(ckpt)

        scan = run(py + ["scan", str(ckpt), "--reference", str(ref), "--format", "json"])
        if scan["rc"] not in (0, 1, 5):
            raise SystemExit(f"scan failed ({scan['rc']}): {scan['stderr'][-2000:]}")
        verdict = json.loads(scan["stdout"])
        verdict = verdict[0] if isinstance(verdict, list) else verdict
        verdict = (verdict.get("results") or [verdict])[0].get("verdict") if isinstance(verdict, dict) else "?"

        def sanitize(out: Path, link: bool) -> dict:
            r = run(py + ["sanitize", str(ckpt), "--method", "subspace", "--param", "rank=1", "--reference", str(ref),
                          "--out", str(out), "--format", "json"] + (["--link"] if link else []))
            if r["rc"] != 0:
                raise SystemExit(f"sanitize failed ({r['rc']}): {r['stderr'][-2000:]}")
            return r

        rounds = []
        for i in range(args.repeats):
            row: dict = {}
            order = KINDS[i % len(KINDS):] + KINDS[: i % len(KINDS)]  # rotated: no kind always meets a cold cache
            for name in order:
                out = root / f"out-{name}-{i}"
                if name in ("write", "write-link"):
                    row[name] = {"wall_s": write_step(ckpt, out, name == "write-link"), "rc": 0}
                elif name == "cp":
                    row[name] = run(["cp", "-r", str(ckpt), str(out)])
                elif name == "cp+sync":
                    t = time.perf_counter()
                    r = run(["cp", "-r", str(ckpt), str(out)])
                    s = run(["sync"] + [str(p) for p in sorted(out.iterdir())])
                    r["wall_s"] = time.perf_counter() - t
                    row[name] = r if s["rc"] == 0 else {**r, "rc": s["rc"]}
                else:
                    row[name] = sanitize(out, name == "link")
                    if name == "link":
                        row["shared"] = shared_files(ckpt, out)
                        row["link_warnings"] = json.loads(row[name]["stdout"]).get("warnings", [])
                    else:
                        row["sanitize_rss"] = row[name]["peak_rss"]
                if row[name]["rc"] != 0:
                    raise SystemExit(f"{name} failed: {row[name]['stderr'][-2000:]}")
                shutil.rmtree(out, ignore_errors=True)
            rounds.append(row)
            print(f"round {i + 1}: " + ", ".join(f"{k} {row[k]['wall_s']:.2f} s" for k in KINDS), flush=True)

        best = {k: statistics.median(r[k]["wall_s"] for r in rounds) for k in KINDS}
        san_rss = max(r["sanitize_rss"] for r in rounds)
        gb = 1e9
        ok = {
            "scan_rss_gb": scan["peak_rss"] / gb < TARGETS["scan_rss_gb"],
            "sanitize_rss_gb": san_rss / gb < TARGETS["sanitize_rss_gb"],
            "sanitize_vs_cp": best["sanitize"] <= TARGETS["sanitize_vs_cp"] * best["cp"],
            "link_s": best["link"] <= TARGETS["link_s"],
        }
        mark = lambda k: "yes" if ok[k] else "**no**"  # noqa: E731

        say("# Issue-17 numbers: scan and sanitize on a LLaVA-1.5-7B-shaped checkpoint")
        say()
        say(f"Command: `{command}`")
        say()
        say(f"Machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end (shared with other "
            f"jobs), {fs} filesystem, Python {platform.python_version()}, torch {torch.__version__}, "
            f"`cp` {subprocess.run(['cp', '--version'], capture_output=True, text=True).stdout.splitlines()[0]}.")
        say()
        say(f"Checkpoint: `scan_speed.py`'s writer, fill **{args.fill}**, scale **{args.scale:g}** "
            f"({scan_speed.N_SHARDS} bf16 shards + index, config, tokenizer: {len(files)} files; "
            f"{total / gb:.2f} GB of tensors, {on_disk / gb:.2f} GB on disk); reference: a separate "
            "`mm_projector.safetensors` differing in the projector. Sanitize: "
            "`sanitize CKPT --method subspace --param rank=1 --reference REF --out OUT` (data-free), each command "
            "its own process, times include Python / torch start-up. Peak RSS: `os.wait4` rusage of the process.")
        say()
        say("| measurement | value | target | met |")
        say("|---|---|---|---|")
        say(f"| `scan` peak RSS | {scan['peak_rss'] / gb:.3f} GB (verdict {verdict}, {scan['wall_s']:.1f} s) | "
            f"< {TARGETS['scan_rss_gb']} GB | {mark('scan_rss_gb')} |")
        say(f"| data-free `sanitize` peak RSS | {san_rss / gb:.3f} GB | < {TARGETS['sanitize_rss_gb']} GB | "
            f"{mark('sanitize_rss_gb')} |")
        say(f"| `sanitize` wall time vs plain `cp -r` (median of {args.repeats}) | {best['sanitize']:.2f} s vs "
            f"{best['cp']:.2f} s = {best['sanitize'] / best['cp']:.2f}x | <= {TARGETS['sanitize_vs_cp']}x | "
            f"{mark('sanitize_vs_cp')} |")
        say(f"| `sanitize --link` wall time (median of {args.repeats}) | {best['link']:.2f} s "
            f"({rounds[-1]['shared']} of {len(files)} files shared with the input) | <= {TARGETS['link_s']:g} s | "
            f"{mark('link_s')} |")
        say(f"| for reference: `cp -r` then `sync` of the copied files (sanitize fsyncs what it writes) | "
            f"{best['cp+sync']:.2f} s | | |")
        say(f"| the writer alone (`write_projector`, in-process: copy, patch, fsync, verify, rename) | "
            f"{best['write']:.2f} s = {best['write'] / best['cp']:.2f}x `cp -r` | <= {TARGETS['sanitize_vs_cp']}x | "
            f"{'yes' if best['write'] <= TARGETS['sanitize_vs_cp'] * best['cp'] else '**no**'} |")
        say(f"| `sanitize` minus the writer: start-up and the method's own compute | "
            f"{best['sanitize'] - best['write']:.2f} s | | |")
        say(f"| the writer alone with `link=True` | {best['write-link']:.2f} s | <= {TARGETS['link_s']:g} s | "
            f"{'yes' if best['write-link'] <= TARGETS['link_s'] else '**no**'} |")
        say()
        say("Every round (wall seconds; the order of the six measurements rotates from round to round):")
        say()
        say("| round | cp -r | cp -r + sync | sanitize | sanitize --link | writer | writer, link | sanitize peak RSS |")
        say("|---|---|---|---|---|---|---|---|")
        for i, r in enumerate(rounds):
            say(f"| {i + 1} | " + " | ".join(f"{r[k]['wall_s']:.2f}" for k in ("cp", "cp+sync", "sanitize", "link",
                                                                                "write", "write-link"))
                + f" | {r['sanitize_rss'] / gb:.3f} GB |")
        say()
        say("sanitize warnings: " + ("; ".join(rounds[-1]["link_warnings"]) or "none"))
        args.results.parent.mkdir(parents=True, exist_ok=True)
        if args.append and args.results.is_file():
            lines[0] = f"## fill {args.fill}, scale {args.scale:g}"
            args.results.write_text(args.results.read_text() + "\n" + "\n".join(lines) + "\n")
        else:
            args.results.write_text("\n".join(lines) + "\n")
        print(f"wrote {args.results}")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
