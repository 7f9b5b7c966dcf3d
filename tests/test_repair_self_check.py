"""The data-free repair's self-check on the micro zoo: the calibrated scan judges each candidate repair, and what
the repair reports about the scan is what a real `scan` of the written output says."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from projlens_defense.checkpoint import load_projector
from projlens_defense.cli import main
from projlens_defense.detectors.lens_context import lens_context
from projlens_defense.detectors.scan import Scanner, repair_judge
from projlens_defense.mitigations.subspace import SubspaceMitigation, fitted_task_subspace, remove_components


def _scan(ckpt: Path, reference: Path) -> dict:
    r = CliRunner().invoke(main, ["scan", str(ckpt), "--reference", str(reference), "--format", "json"])
    assert "Traceback" not in r.output, r.output
    return json.loads(r.stdout)[0]


def test_the_self_check_reports_what_a_scan_of_the_output_says(micro_zoo, micro_attacks, tmp_path):
    out, _ = micro_attacks
    r = CliRunner().invoke(main, ["sanitize", str(out / "backdoored"), "--out", str(tmp_path / "s"), "--format", "json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)["report"]
    check = rep["scan_check"]
    before = _scan(out / "backdoored", micro_zoo.reference)
    assert before["verdict"] == "suspicious"
    after = _scan(tmp_path / "s", micro_zoo.reference)
    assert check["verdict_after"] == after["verdict"] == "clean", (check, after)
    assert after["score"] < after["threshold"] < before["score"]


def test_scan_guided_removal_clears_a_flag_the_share_test_left(micro_zoo, micro_attacks):
    """Starting from nothing removed (as when the benign-share test finds no component, e.g. a weak 1% backdoor):
    the repair takes the fewest components outside the task subspace whose removal ends the real scan's flag."""
    out, _ = micro_attacks
    ref = load_projector(micro_zoo.reference)
    lens, cal = lens_context(out / "backdoored", ref)
    judge = repair_judge(lens, cal)
    assert judge is not None
    m = SubspaceMitigation(lens=lens, calibration=cal, judge=judge)
    delta = lens.projector.delta(ref)
    extra, report = m._scan_guided(lens.projector, delta, [], fitted_task_subspace(cal, delta))
    assert report["verdict"] == "suspicious" and report["removed"] == len(extra) >= 1, report
    assert len(report["scores"]) == len(extra) + 1
    assert all(s > report["threshold"] for s in report["scores"][:-1]) and report["scores"][-1] < report["threshold"]
    assert judge(remove_components(lens.projector, extra)).verdict == "clean"
    assert judge(remove_components(lens.projector, extra[:-1])).verdict == "suspicious"
    # the judge is the scan: the same score as a Scanner in reference mode on the same input
    assert Scanner(calibration=cal, mode="reference").judge(lens).score == report["score"]


def test_no_judge_without_a_calibration(micro_zoo, micro_attacks):
    out, _ = micro_attacks
    lens, _ = lens_context(out / "backdoored", load_projector(micro_zoo.reference))
    assert repair_judge(lens, None) is None and repair_judge(None, None) is None
