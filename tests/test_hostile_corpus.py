"""The hostile corpus through the reader and every CLI command: exit 2 or 3 with a one-line reason
naming the file, no traceback, no payload executed, bounded time and memory.

Default suite: every case in-process (the reader, and each CLI command via click's CliRunner),
a few representative cases as real subprocesses, and the malicious-pickle proof (the payloads
are live under an unsafe load, and no command runs them). ``-m slow``: every case x command
as a subprocess, with time and peak RSS (``tests/hostile_matrix.py`` prints that as a table).

COMMANDS in hostile_corpus.py lists the commands; one not yet in the CLI is skipped.
"""

from __future__ import annotations

import shutil
import sys
import time
import warnings
from pathlib import Path

import hostile_corpus as hc
import pytest
from click.testing import CliRunner

from projlens_defense.cli import main

CLI_COMMANDS = [c for c in hc.COMMANDS if c != "reader"]
# cases that the default suite also runs as real subprocesses (each costs a ~2.5 s interpreter start)
REPRESENTATIVE = [
    "mm-bin--payload-os-system",
    "bare-pt--payload-builtins-exec",
    "hf-sharded--shard-dotdot",
    "any--header-120k-tensors",
    "any--empty-dir",
]
# (command, case) -> why it currently fails; the tests fail once such a case passes (then delete it here)
KNOWN_ISSUES: dict[tuple[str, str], str] = {
    # e.g. ("scan", "any--empty-dir"): "the 'nothing scannable' message does not name the path",
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[hc.Case]]:
    root = tmp_path_factory.mktemp("hostile") / "corpus"
    return root, hc.build_corpus(root)


_PROBES: dict[str, str | None] = {}


@pytest.fixture
def usable(corpus):
    """usable(command): skip unless the command exists and handles a valid checkpoint here."""

    def check(command: str) -> None:
        if command != "reader" and command not in main.commands:
            pytest.skip(f"`{command}` is not in the CLI yet (main.commands: {', '.join(sorted(main.commands))})")
        if command not in _PROBES:
            _PROBES[command] = hc.probe(command, corpus[0])
        if _PROBES[command]:
            pytest.skip(_PROBES[command])

    return check


def _case(cases: list[hc.Case], name: str) -> hc.Case:
    return next(c for c in cases if c.name == name)


def _no_markers(root: Path) -> None:
    leaked = sorted(p.name for p in hc.marker_dir(root).iterdir())
    assert not leaked, f"payload executed: marker file(s) {leaked}"


def _settle(command: str, failures: dict[str, list[str]]) -> None:
    """Fail on unknown failures; fail when a known issue no longer fails; else xfail on known ones."""
    known = {case: why for (cmd, case), why in KNOWN_ISSUES.items() if cmd == command}
    unknown = {k: v for k, v in failures.items() if k not in known}
    fixed = sorted(set(known) - set(failures))
    assert not unknown, f"{len(unknown)} case(s) mishandled by {command}:\n" + "\n".join(
        f"  {k}: {'; '.join(v)}" for k, v in sorted(unknown.items())
    )
    assert not fixed, f"known issue(s) of {command} now pass, delete them from KNOWN_ISSUES: {fixed}"
    if failures:
        pytest.xfail("; ".join(f"{k}: {known[k]}" for k in sorted(failures)))


# --------------------------------------------------------------------------------------- the corpus
def test_corpus_covers_every_format_and_attack(corpus):
    root, cases = corpus
    names = {c.name for c in cases}
    assert len(names) == len(cases) and all(c.expected in (2, 3) for c in cases)
    for c in cases:
        assert c.path.exists() or c.path.is_symlink(), c.name
    st_attacks = ["truncated", "zero-byte", "header-len-exceeds-file", "header-len-over-cap", "header-invalid-json",
                  "dtype-unknown", "dtype-int32", "absurd-dims", "offsets-outside"]  # fmt: skip
    tensor_attacks = ["nan", "inf", "shapes-do-not-chain", "dtype-int64", "missing-key", "no-projector-keys"]
    pickle_attacks = ["payload-os-system", "payload-path-touch", "payload-builtins-exec", "truncated", "zero-byte",
                      "storage-bomb", "absurd-dims", "zip-bomb"]  # fmt: skip
    want = {
        "hf": st_attacks + tensor_attacks + ["symlink-loop", "config-invalid-json"],
        "hf-sharded": st_attacks + ["missing-shard", "shard-dotdot", "shard-symlink-loop", "index-invalid-json", "nan"],
        "mm-bin": tensor_attacks + pickle_attacks + ["symlink-loop"],
        "mm-safetensors": st_attacks + tensor_attacks,
        "qwen2-vl-merger": st_attacks + tensor_attacks,
        "bare-safetensors": st_attacks + tensor_attacks,
        "bare-pt": tensor_attacks + pickle_attacks,
        "any": ["empty-dir", "zero-byte-unknown", "symlink-loop-file"],
    }
    missing = [f"{fam}--{a}" for fam, attacks in want.items() for a in attacks if f"{fam}--{a}" not in names]
    assert not missing
    assert _case(cases, "any--empty-dir").expected == 3
    assert sum(c.marker is not None for c in cases) >= 11
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())
    assert size < 40e6, f"corpus is {size / 1e6:.1f} MB"
    _no_markers(root)


def test_reader_in_process_handles_every_case(corpus, usable):
    """detect_format + load_projector + load_lm_readout + load_tokenizer_vocab on every case."""
    usable("reader")
    root, cases = corpus
    failures: dict[str, list[str]] = {}
    for c in cases:
        t0 = time.monotonic()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                code, msg = hc.read_in_process(c.path)
            except Exception as e:  # noqa: BLE001 - the point: nothing but ProjlensError may escape
                code, msg = -1, f"{type(e).__name__} escaped: {e}"
        bad = []
        if code != c.expected:
            bad.append(f"exit {code}, expected {c.expected}: {msg[:200]}")
        if "\n" in msg or c.must_name() not in msg:
            bad.append(f"message is not one line naming {c.must_name()}: {msg[:200]!r}")
        if c.reason and c.reason not in msg:
            bad.append(f"reason {c.reason!r} not in {msg[:200]!r}")
        if caught:
            bad.append(f"warnings: {[str(w.message)[:80] for w in caught]}")
        if time.monotonic() - t0 > hc.TIMEOUT_S:
            bad.append(f"took {time.monotonic() - t0:.1f} s")
        if bad:
            failures[c.name] = bad
    _no_markers(root)
    _settle("reader", failures)


@pytest.mark.parametrize("command", CLI_COMMANDS)
def test_cli_in_process_handles_every_case(corpus, usable, command, tmp_path):
    usable(command)
    root, cases = corpus
    runner = CliRunner()
    failures: dict[str, list[str]] = {}
    for c in cases:
        out = tmp_path / f"out-{c.name}"
        args = [a.format(ckpt=c.path, out=out) for a in hc.COMMANDS[command]]
        t0 = time.monotonic()
        res = runner.invoke(main, args)
        wall = time.monotonic() - t0
        bad = []
        if res.exception is not None and not isinstance(res.exception, SystemExit):
            bad.append(f"{type(res.exception).__name__} escaped: {res.exception}")
        if res.exit_code != c.expected:
            bad.append(f"exit {res.exit_code}, expected {c.expected}: {res.output.strip()[-200:]!r}")
        if "Traceback" in res.output or "internal error" in res.output:
            bad.append(f"crash in the output: {res.output.strip()[-300:]!r}")
        if not any(c.must_name() in ln for ln in res.output.splitlines()):
            bad.append(f"no output line names {c.must_name()}: {res.output.strip()[-200:]!r}")
        if len([ln for ln in res.stderr.splitlines() if ln.strip()]) > 1:
            bad.append(f"more than one line on stderr: {res.stderr[:300]!r}")
        if "{out}" in " ".join(hc.COMMANDS[command]) and out.exists():
            bad.append(f"left an output behind at {out}")
        if wall > hc.TIMEOUT_S:
            bad.append(f"took {wall:.1f} s")
        if bad:
            failures[c.name] = bad
    _no_markers(root)
    _settle(command, failures)


@pytest.mark.parametrize("case_name", REPRESENTATIVE)
@pytest.mark.parametrize("command", list(hc.COMMANDS))
def test_subprocess_representative_cases(corpus, usable, command, case_name, tmp_path):
    """Real child processes: exit code, one line naming the file, no traceback/marker, < 10 s, < 2 GB."""
    usable(command)
    if command == "reader" and "payload" not in case_name:
        pytest.skip("the reader subprocess runs only the payload cases here (all of them: -m slow)")
    root, cases = corpus
    case = _case(cases, case_name)
    res = hc.run_case(command, case, tmp_path)
    bad = hc.problems(res, case, hc.marker_dir(root))
    if (command, case_name) in KNOWN_ISSUES:
        assert bad, f"known issue fixed, delete it from KNOWN_ISSUES: {(command, case_name)}"
        pytest.xfail(KNOWN_ISSUES[command, case_name])
    assert not bad, f"{command} on {case_name}: {bad}\n--- stdout\n{res.stdout}\n--- stderr\n{res.stderr}"


# ----------------------------------------------------------------------------- malicious pickles
@pytest.fixture(scope="module")
def payloads(tmp_path_factory) -> tuple[Path, list[hc.Case]]:
    root = tmp_path_factory.mktemp("payloads") / "p"
    return root, hc.build_payload_files(root)


def test_payloads_are_live_under_an_unsafe_load(tmp_path):
    """Contrast: a plain pickle.load / torch.load(weights_only=False) of these files runs the payload."""
    root = tmp_path / "live"
    cases = hc.build_payload_files(root)
    paths = [str(c.path / "mm_projector.bin") for c in cases]
    snippet = (
        "import pickle, sys, torch\n"
        "for p in sys.argv[1:]:\n"
        "    try:\n"
        "        torch.load(p, weights_only=False)\n"
        "    except Exception:\n"
        "        with open(p, 'rb') as f:\n"
        "            pickle.load(f)\n"
    )
    work = tmp_path / "work"
    work.mkdir()
    rc, out, err, *_ = hc.run_child([sys.executable, "-c", snippet, *paths], work, timeout=60)
    created = {c.name for c in cases if c.marker is not None and c.marker.exists()}
    assert created == {c.name for c in cases}, (rc, err[-2000:])


@pytest.mark.parametrize("command", list(hc.COMMANDS))
def test_no_command_runs_a_payload(payloads, usable, command, tmp_path):
    """Every payload file through the command, in-process and as a child process: refused, no marker."""
    usable(command)
    root, cases = payloads
    assert len(cases) == 9
    for c in cases:  # in-process: the payload would run in this very process
        if command == "reader":
            code, msg = hc.read_in_process(c.path)
            assert code == 2 and "refused to load" in msg and str(c.path) in msg, msg
        else:
            args = [a.format(ckpt=c.path, out=tmp_path / f"out-{c.name}") for a in hc.COMMANDS[command]]
            res = CliRunner().invoke(main, args)
            assert res.exit_code == 2 and "refused to load" in res.output, res.output
    _no_markers(root)
    # a child process: all nine files at once where the command takes several paths, else one
    multi = command in ("reader", "scan")
    chosen = cases if multi else [c for c in cases if c.name == "payload-os-system-torch"]
    if multi:
        argv = hc.command_argv(command, chosen[0], tmp_path / "out") + [str(c.path) for c in chosen[1:]]
    else:
        argv = hc.command_argv(command, chosen[0], tmp_path / "out")
    rc, out, err, wall, rss, timed_out = hc.run_child(argv, tmp_path)
    assert rc == 2 and not timed_out and "Traceback" not in out + err, (out, err)
    assert all(str(c.path) in out + err for c in chosen)
    assert wall < hc.TIMEOUT_S and rss < hc.MAX_RSS_MB
    _no_markers(root)


# ------------------------------------------------------------------------------- the full matrix
@pytest.mark.slow
@pytest.mark.parametrize("command", list(hc.COMMANDS))
def test_full_matrix_as_subprocesses(corpus, usable, command, tmp_path):
    """Every case as its own child process (~2.5 s each: minutes per command)."""
    usable(command)
    root, cases = corpus
    failures = {}
    for c in cases:
        res = hc.run_case(command, c, tmp_path / "work")
        bad = hc.problems(res, c, hc.marker_dir(root))
        if bad:
            failures[c.name] = bad
        shutil.rmtree(tmp_path / "work" / f"out-{command}-{c.name}", ignore_errors=True)
    _settle(command, failures)
