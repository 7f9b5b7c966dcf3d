"""The CLI package's own contract: flag wording of library errors, the one KEY=VALUE parser, exit codes set in
one place, and the entry points (`projlens-defense`, `python -m projlens_defense`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from projlens_defense import api
from projlens_defense.cli import main
from projlens_defense.cli.exits import EXIT_USAGE, exception_code, flag_wording, guard_code
from projlens_defense.cli.options import parse_kv
from projlens_defense.errors import (
    CheckpointError,
    NothingRemovedError,
    NothingScannableError,
    ProjlensError,
    UsageError,
)


def test_flag_wording_names_the_commands_flags() -> None:
    cmd = main.commands["sanitize"]
    msg = "method 'unlearn' needs clean samples (`clean_data`: JSON); pass `force`; see `projlens-defense x`"
    assert flag_wording(msg, cmd) == ("method 'unlearn' needs clean samples (--clean-data: JSON); pass --force; "
                                      "see `projlens-defense x`")
    assert flag_wording("`data` is bad", main.commands["analyze"], {"data": "test_data"}) == "--data is bad"
    assert flag_wording("`nope` here", cmd) == "nope here"  # not a parameter: plain name


def test_library_errors_name_python_parameters_and_the_cli_its_flags(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="`clean_data`"):
        api.sanitize(tmp_path / "ck", tmp_path / "out", method="unlearn")
    with pytest.raises(ValueError):  # a UsageError is a ValueError for Python callers
        api.sanitize(tmp_path / "ck", tmp_path / "out", method="nope")
    r = CliRunner().invoke(main, ["sanitize", str(tmp_path / "ck"), "--method", "unlearn", "--out",
                                  str(tmp_path / "out")])
    assert r.exit_code == EXIT_USAGE and "--clean-data" in r.output and "`" not in r.output, r.output
    (tmp_path / "out").mkdir()
    r = CliRunner().invoke(main, ["sanitize", str(tmp_path / "ck"), "--out", str(tmp_path / "out")])
    assert r.exit_code == EXIT_USAGE and "pass --force to replace it" in r.output, r.output


def test_exit_codes_of_exceptions_and_results() -> None:
    assert [exception_code(e) for e in (UsageError("x"), CheckpointError("x"), NothingScannableError("x"),
                                        NothingRemovedError("x"), ProjlensError("x"))] == [4, 2, 3, 6, 2]
    assert (guard_code(1, []), guard_code(0, ["bad.png"]), guard_code(0, [])) == (1, 2, 0)


def test_one_key_value_parser() -> None:
    assert parse_kv(("a=1", " b =[1, 2]", "c=x=y", "d=true"), "--param") == {"a": 1, "b": [1, 2], "c": "x=y",
                                                                           "d": True}
    assert parse_kv(("std=10",), "--trigger-param", json_values=False) == {"std": "10"}
    with pytest.raises(UsageError, match="--param expects KEY=VALUE, got 'oops'"):
        parse_kv(("oops",), "--param")
    r = CliRunner().invoke(main, ["sanitize", "ck", "--param", "oops", "--out", "o"])
    assert r.exit_code == EXIT_USAGE and "error: --param expects KEY=VALUE" in r.output


def test_every_command_is_a_worded_command_and_help_works() -> None:
    from projlens_defense.cli.exits import Command, Group

    def walk(group: click.Group):
        for c in group.commands.values():
            yield c
            if isinstance(c, click.Group):
                yield from walk(c)

    cmds = list(walk(main))
    assert {c.name for c in cmds} >= {"scan", "calibrate", "sanitize", "attack", "evaluate", "analyze", "guard",
                                       "bench", "merge", "zoo", "build", "path", "variants"}
    assert all(isinstance(c, (Command, Group)) for c in cmds)
    for c in cmds:
        assert CliRunner().invoke(main, [*_path_to(main, c), "--help"]).exit_code == 0, c.name


def _path_to(group: click.Group, target: click.Command) -> list[str]:
    for name, c in group.commands.items():
        if c is target:
            return [name]
        if isinstance(c, click.Group):
            sub = _path_to(c, target)
            if sub:
                return [name, *sub]
    return []


def test_python_m_entry_point_and_missing_path_exit_code(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "projlens_defense", "scan", str(tmp_path / "nope")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 4 and r.stderr.strip() == f"error: {tmp_path / 'nope'}: path does not exist", r.stderr


def test_registries_come_from_the_classes_and_parameters_are_introspectable() -> None:
    from projlens_defense.detectors import DETECTORS
    from projlens_defense.detectors.base import Detector
    from projlens_defense.mitigations import MITIGATIONS
    from projlens_defense.mitigations.base import Mitigation

    assert all(name == cls.name for name, cls in DETECTORS.items())
    assert all(name == cls.name for name, cls in MITIGATIONS.items())
    assert {n for n, c in MITIGATIONS.items() if c.uses_lens} == {"subspace", "target-direction"}
    assert {n for n, c in DETECTORS.items() if c.learns} == {"logit-lens", "task-residual", "reference-free", "activation"}
    for cls in DETECTORS.values():
        det = cls()
        params = det.get_params()
        assert list(params) == cls.param_names() and params  # every keyword, by introspection
        assert type(det)(**params).get_params() == params  # an unfitted copy
    assert DETECTORS["spectral"](top_k=3).get_params()["top_k"] == 3
    for cls in MITIGATIONS.values():  # the same contract: explicit keywords, found by introspection
        mit = cls()
        assert list(mit.get_params()) == cls.param_names() and mit.get_params() == cls.defaults()
        assert type(mit)(**mit.get_params()).get_params() == mit.get_params()
    assert "lens" not in MITIGATIONS["subspace"].param_names()  # an input, not a parameter
    assert MITIGATIONS["clp"](u=2.5).get_params() == {**MITIGATIONS["clp"].defaults(), "u": 2.5}
    assert MITIGATIONS["clp"].from_params({"u": 2.5}).u == 2.5
    with pytest.raises(UsageError, match="unknown parameter"):  # what --param / the bench harness pass through
        MITIGATIONS["clp"].from_params({"nope": 1})
    with pytest.raises(TypeError):
        MITIGATIONS["clp"](nope=1)
    for base in (Detector, Mitigation):  # abstract: a subclass must implement score / apply
        with pytest.raises(TypeError):
            base()
