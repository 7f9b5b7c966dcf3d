"""The hostile corpus through the reader and every CLI command that takes a checkpoint: each case
ends with the exit code its ``Case`` expects for that command (2 or 3 with a one-line reason
naming the file; 0 where the damage is only in a part the command does not need, with a warning
naming it and a complete, loadable output), no traceback, no payload executed, no output or
temporary file left after a failure, inputs never modified, bounded time and memory.

Default suite: the pristine bases through every command (they must be processed, else a hostile
case's error proves nothing), every case x command in-process (the reader directly, the CLI via
click's CliRunner), a few representative cases as real subprocesses, and the malicious-pickle
proof (the payloads are live under a plain pickle.load, and no command runs them).
``-m slow``: every case x command as a subprocess, with time and peak RSS
(``tests/hostile_matrix.py`` writes that as a table).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import hostile_corpus as hc
import pytest

CLI_COMMANDS = [c for c in hc.COMMANDS if c != "reader"]
ALL_COMMANDS = [*hc.COMMANDS, *hc.PAYLOAD_COMMANDS]
# cases that the default suite also runs as real subprocesses (each costs a ~2.5 s interpreter start)
REPRESENTATIVE = [
    "mm-bin--payload-os-system",
    "bare-pt--payload-builtins-exec",
    "hf--pytorch-model-bin-payload-os-system",
    "qwen2-vl-dir--pytorch-model-bin-payload-os-system",
    "hf-sharded--shard-dotdot",
    "any--header-120k-tensors",
    "any--empty-dir",
    "hf--tokenizer-invalid-json",  # sanitize: exit 0, a warning naming tokenizer.json, a complete output
]
# (command, case) -> why it currently fails; the tests fail once such a case passes (then delete it here)
KNOWN_ISSUES: dict[tuple[str, str], str] = {}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[hc.Case], dict[str, str]]:
    """(root, cases, snapshot of every input as built)."""
    root = tmp_path_factory.mktemp("hostile") / "corpus"
    cases = hc.build_corpus(root)
    return root, cases, hc.snapshot(root)


def _case(cases: list[hc.Case], name: str) -> hc.Case:
    return next(c for c in cases if c.name == name)


def _remove(path: Path | None) -> None:
    if path is not None and path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path is not None:
        path.unlink(missing_ok=True)


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
    root, cases, _ = corpus
    names = {c.name for c in cases}
    assert len(names) == len(cases) and all(c.expected in (2, 3) for c in cases)
    for c in cases:
        assert c.path.exists() or c.path.is_symlink(), c.name
        assert set(c.exits) <= set(hc.COMMANDS), c.name
    st_attacks = ["truncated", "zero-byte", "header-len-exceeds-file", "header-len-over-cap", "header-invalid-json",
                  "dtype-unknown", "dtype-int32", "absurd-dims", "offsets-outside"]  # fmt: skip
    tensor_attacks = ["nan", "inf", "shapes-do-not-chain", "dtype-int64", "missing-key", "no-projector-keys"]
    pickle_attacks = ["payload-os-system", "payload-path-touch", "payload-builtins-exec", "truncated", "zero-byte",
                      "storage-bomb", "absurd-dims", "zip-bomb"]  # fmt: skip
    want = {
        "hf": st_attacks + tensor_attacks + ["symlink-loop", "config-invalid-json", "tokenizer-invalid-json",
                                             "lm-head-width", "pytorch-model-bin-payload-os-system"],
        "hf-sharded": st_attacks + ["missing-shard", "missing-llm-shard", "shard-dotdot", "shard-symlink-loop",
                                    "index-invalid-json", "nan"],
        "mm-bin": tensor_attacks + pickle_attacks + ["symlink-loop"],
        "mm-safetensors": st_attacks + tensor_attacks,
        "qwen2-vl-merger": st_attacks + tensor_attacks,
        "qwen2-vl-dir": st_attacks + tensor_attacks + ["norm-nan", "norm-width", "merger-wrong-shape",
                                                       "merger-truncated", "pytorch-model-bin-payload-os-system"],
        "bare-safetensors": st_attacks + tensor_attacks,
        "bare-pt": tensor_attacks + pickle_attacks,
        "any": ["empty-dir", "zero-byte-unknown", "symlink-loop-file"],
    }  # fmt: skip
    missing = [f"{fam}--{a}" for fam, attacks in want.items() for a in attacks if f"{fam}--{a}" not in names]
    assert not missing
    assert _case(cases, "any--empty-dir").expected == 3
    assert sum(c.marker is not None for c in cases) >= 13
    # where a command legitimately succeeds: sanitize, on damage it only reads for its optional lens
    succeed = sorted((cmd, c.name) for c in cases for cmd, code in c.exits.items() if code == 0)
    assert succeed == [("sanitize", n) for n in sorted(
        ["hf--tokenizer-invalid-json", "hf--tokenizer-bad-vocab", "hf--tokenizer-added-tokens-int",
         "hf--tokenizer-not-object", "hf--lm-head-width", "hf-sharded--missing-llm-shard"])]  # fmt: skip
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())
    assert size < 40e6, f"corpus is {size / 1e6:.1f} MB"
    _no_markers(root)


@pytest.mark.parametrize("command", list(hc.COMMANDS))
def test_pristine_bases_are_processed(corpus, command, tmp_path):
    """Every command processes the unmodified base of every format (exit 0, or 1: a suspicious scan),
    except the documented limits in ``pristine_cases``; a successful sanitize writes a complete copy."""
    root, _, _ = corpus
    failures = {}
    for c in hc.pristine_cases(root):
        res = hc.invoke(command, c, tmp_path)
        bad = hc.problems(res, c, hc.marker_dir(root), in_process=True)
        if bad:
            failures[c.name] = bad
    _settle(command, failures)


# ------------------------------------------------------------------------------- every case x command
@pytest.mark.parametrize("command", list(hc.COMMANDS))
def test_every_case_in_process(corpus, command, tmp_path):
    """Each case through ``command`` in this process: exit code, reason, output checks, < 10 s.

    In-process on purpose: a payload that ran would run in the test process itself.
    """
    root, cases, _ = corpus
    failures: dict[str, list[str]] = {}
    for c in cases:
        res = hc.invoke(command, c, tmp_path)
        bad = hc.problems(res, c, hc.marker_dir(root), in_process=True)
        if bad:
            failures[c.name] = bad
        _remove(res.out)
    _no_markers(root)
    _settle(command, failures)


@pytest.mark.parametrize(
    ("command", "case_name"),
    # the reader's child process only on the payload cases (every case: -m slow / hostile_matrix.py)
    [(cmd, n) for cmd in hc.COMMANDS for n in REPRESENTATIVE if cmd != "reader" or "payload" in n],
)
def test_subprocess_representative_cases(corpus, command, case_name, tmp_path):
    """Real child processes: exit code, one line naming the file, no traceback/marker, < 10 s, < 2 GB."""
    root, cases, _ = corpus
    case = _case(cases, case_name)
    res = hc.run_case(command, case, tmp_path)
    bad = hc.problems(res, case, hc.marker_dir(root))
    if (command, case_name) in KNOWN_ISSUES:
        assert bad, f"known issue fixed, delete it from KNOWN_ISSUES: {(command, case_name)}"
        pytest.xfail(KNOWN_ISSUES[command, case_name])
    assert not bad, f"{command} on {case_name}: {bad}\n--- stdout\n{res.stdout}\n--- stderr\n{res.stderr}"


# what test_inputs_unchanged runs itself: every case where some command succeeds (sanitize copies
# the damaged checkpoint's other files), the subprocess representatives and a few more shapes of input
UNCHANGED_CASES = [*REPRESENTATIVE, "hf--truncated", "hf--nan", "hf-sharded--missing-shard", "mm-bin--truncated",
                   "mm-safetensors--header-invalid-json", "qwen2-vl-merger--nan", "qwen2-vl-dir--nan", "qwen2-vl-dir--norm-width", "bare-pt--payload-path-touch",
                   "any--symlink-loop-file"]  # fmt: skip


# exit codes of a command that read its whole input: clean / suspicious, and scan's inconclusive (5)
RAN_TO_COMPLETION = (0, 1, 5)


def _changes(before: dict[str, str], after: dict[str, str]) -> list[str]:
    return sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))


def test_inputs_unchanged(corpus, tmp_path):
    """No command modifies, adds or removes an input. Self-contained: it runs every command (in this
    process) on the pristine bases and on a subset of cases, checking the corpus snapshot before and
    after; and the corpus must still be as built, whatever ran before this test."""
    root, cases, built = corpus
    assert not _changes(built, hc.snapshot(root)), "corpus changed before this test ran"
    pristine = hc.pristine_cases(root)
    assert not set(UNCHANGED_CASES) - {c.name for c in cases}, "UNCHANGED_CASES names a missing case"
    chosen = pristine + [c for c in cases if c.name in UNCHANGED_CASES or 0 in c.exits.values()]
    processed = []
    for command in hc.COMMANDS:
        before = hc.snapshot(root)
        for c in chosen:
            res = hc.invoke(command, c, tmp_path)
            processed += [(command, c.name)] if res.returncode in RAN_TO_COMPLETION else []
            _remove(res.out)
        changed = _changes(before, hc.snapshot(root))
        assert not changed, f"{command} changed the inputs (paths relative to {root}): {changed[:10]}"
    # the commands really read and wrote: every one processed the bases it supports (a command that
    # failed early would leave the inputs unchanged trivially)
    for c in pristine:
        for command in hc.COMMANDS:
            if c.expected_for(command) in (0, 1):
                assert (command, c.name) in processed, f"{command} did not process {c.name}"
    assert ("sanitize", "hf--tokenizer-invalid-json") in processed
    _no_markers(root)
    assert not _changes(built, hc.snapshot(root))


# ----------------------------------------------------------------------------- malicious pickles
@pytest.fixture(scope="module")
def payloads(tmp_path_factory) -> tuple[Path, list[hc.Case]]:
    root = tmp_path_factory.mktemp("payloads") / "p"
    return root, hc.build_payload_files(root)


def test_payloads_are_live_under_an_unsafe_load(tmp_path):
    """Contrast: a plain pickle.load / torch.load(weights_only=False) of these files runs the payload."""
    root = tmp_path / "live"
    cases = hc.build_payload_files(root)
    paths = [str(c.payload) for c in cases]
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


@pytest.mark.parametrize("command", ALL_COMMANDS)
def test_no_command_runs_a_payload(payloads, command, tmp_path):
    """Every payload file (mm_projector.bin dirs; HF dirs whose pytorch_model.bin transformers would
    load) through every command that takes a checkpoint, in-process and as a child process: refused
    with one line naming the file, no traceback, no marker."""
    root, cases = payloads
    assert len(cases) == 15 and all(c.payload is not None and c.payload.is_file() for c in cases)
    failures = {}
    for c in cases:  # in-process: the payload would run in this very process
        bad = hc.problems(hc.invoke(command, c, tmp_path), c, hc.marker_dir(root), in_process=True)
        if bad:
            failures[c.name] = bad
    assert not failures, failures
    _no_markers(root)
    # a child process: all files at once where the command takes several paths, else the HF one
    if command in ("reader", "scan"):
        argv = hc.command_argv(command, cases[0], tmp_path / "out") + [str(c.path) for c in cases[1:]]
        chosen = cases
    else:
        chosen = [_case(cases, "payload-os-system-hf-pytorch-model-bin")]
        argv = hc.command_argv(command, chosen[0], tmp_path / "out")
    rc, out, err, wall, rss, timed_out = hc.run_child(argv, tmp_path)
    assert rc == 2 and not timed_out and "Traceback" not in out + err, dict(rc=rc, timed_out=timed_out, wall=wall,
                                                                          rss_mb=rss, out=out, err=err)
    assert all(str(c.path) in out + err for c in chosen)
    assert wall < hc.TIMEOUT_S and rss < hc.MAX_RSS_MB
    _no_markers(root)


# ------------------------------------------------------------------------------- the full matrix
@pytest.mark.slow
@pytest.mark.parametrize("command", list(hc.COMMANDS))
def test_full_matrix_as_subprocesses(corpus, command, tmp_path):
    """Every case as its own child process (~2.5 s each: minutes per command)."""
    root, cases, _ = corpus
    failures = {}
    for c in cases:
        res = hc.run_case(command, c, tmp_path / "work")
        bad = hc.problems(res, c, hc.marker_dir(root))
        if bad:
            failures[c.name] = bad
        _remove(res.out)
    _settle(command, failures)
