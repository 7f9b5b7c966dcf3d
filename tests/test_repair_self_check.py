"""The data-free repair's self-check on the micro zoo: the calibrated scan judges each candidate repair, and what
the repair reports about the scan is what a real `scan` of the written output says."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from projlens_defense.checkpoint import load_projector
from projlens_defense.cli import main
from projlens_defense.detectors.lens_context import lens_context
from projlens_defense.detectors.scan import Scanner, repair_judge
from projlens_defense.mitigations.subspace import SubspaceMitigation, fitted_task_subspace, remove_components
from projlens_defense.task_subspace import REPAIR_FPR


def _scan(ckpt: Path, reference: Path, *extra: str) -> dict:
    r = CliRunner().invoke(main, ["scan", str(ckpt), "--reference", str(reference), "--format", "json", *extra])
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
    # the repair judges itself at its own rate (REPAIR_FPR, 1%), so the scan that agrees with it is one at that rate;
    # at the scan's 5% default a repaired update may still be flagged on some builds (README, "What a verdict means")
    after = _scan(tmp_path / "s", micro_zoo.reference, "--fpr", str(REPAIR_FPR))
    # not flagged any more; `inconclusive` where the repaired update's next component outside the task subspace
    # still exceeds the benign bound (a build from another CPU), which the scan then says rather than `clean`
    assert check["verdict_after"] == after["verdict"] in ("clean", "inconclusive"), (check, after)
    assert after["score"] < after["threshold"] < before["score"]


def _repair_inputs(micro_zoo, micro_attacks, name: str):
    """(reference, lens input, calibration, judge, update, task subspace, data-free share-test removals) of the micro
    attacks' fine-tune ``name``."""
    out, _ = micro_attacks
    ref = load_projector(micro_zoo.reference)
    lens, cal = lens_context(out / name, ref)
    judge = repair_judge(lens, cal)
    assert judge is not None
    delta = lens.projector.delta(ref)
    task = fitted_task_subspace(cal, delta)
    first, _ = SubspaceMitigation(lens=lens, calibration=cal)._null_calibrated(lens.projector, delta, task)
    return ref, lens, cal, judge, delta, task, first


def test_scan_guided_removal_finishes_a_repair_the_share_test_stopped_short(micro_zoo, micro_attacks):
    """The benign-share test's repair cut short by three components (as when a weak backdoor's later components
    look benign-sized): the scan still flags it, and the repair takes further components outside the task
    subspace, each lowering the real scan's score, until the flag ends."""
    _, lens, cal, judge, delta, task, full = _repair_inputs(micro_zoo, micro_attacks, "backdoored")
    short = full[:-3]
    start = judge(remove_components(lens.projector, short))
    if len(full) < 4 or start.verdict != "suspicious":  # the scenario needs a backdoor the scan flags strongly
        pytest.skip(f"this build's micro backdoor: {len(full)} components above the bound, partial repair scored "
                    f"{start.score} ({start.verdict}); on CI's 2026-12-01 build the whole backdoor scored z 3.77")
    m = SubspaceMitigation(lens=lens, calibration=cal, judge=judge)
    extra, report = m._scan_guided(lens.projector, delta, short, task)
    assert report["verdict"] == "suspicious" and report["removed"] == len(extra) >= 1, report
    scores = report["scores"]
    assert len(scores) == len(extra) + 1 and all(b < a for a, b in zip(scores, scores[1:], strict=False)), scores
    assert scores[-1] < report["threshold"] < scores[0]
    assert judge(remove_components(lens.projector, short + extra)).verdict == report["verdict_after"] != "suspicious"
    # the judge is the scan: the same score as a Scanner in reference mode on the same input
    assert Scanner(calibration=cal, mode="reference").judge(lens).score == judge(lens.projector).score


def test_a_removal_that_raises_the_score_is_not_kept(micro_zoo, micro_attacks):
    """The stop rule: a removal that raises the scan's score is not removing what the scan sees, so the repair
    keeps nothing rather than cut blindly. The real scan judges the start; the judge given to the repair then
    reports a higher score for the first candidate removal (on one build of the micro zoo the real backdoor's
    second component did this by itself; on a build from another CPU it did not, so the case is made here)."""
    out, _ = micro_attacks
    ref = load_projector(micro_zoo.reference)
    lens, cal = lens_context(out / "backdoored", ref)
    delta = lens.projector.delta(ref)
    real = repair_judge(lens, cal)
    seen: list = []

    def judge(projector):
        res = real(projector)
        if seen:  # every candidate removal: scored above the start
            res = dataclasses.replace(res, score=seen[0].score + 1.0 + len(seen), verdict="suspicious")
        seen.append(res)
        return res

    m = SubspaceMitigation(lens=lens, calibration=cal, judge=judge)
    extra, report = m._scan_guided(lens.projector, delta, [], fitted_task_subspace(cal, delta))
    assert seen[0].verdict == "suspicious", seen[0]  # the backdoor is flagged to begin with
    scores = report["scores"]
    assert len(seen) == 2 and len(scores) == 2 and scores[1] > scores[0], scores  # stopped at the first rise
    assert extra == [] and report["removed"] == 0 and report["verdict_after"] == "suspicious", report


def test_no_judge_without_a_calibration(micro_zoo, micro_attacks):
    out, _ = micro_attacks
    lens, _ = lens_context(out / "backdoored", load_projector(micro_zoo.reference))
    assert repair_judge(lens, None) is None and repair_judge(None, None) is None


def test_few_shot_refits_what_the_scan_does_not_call_clean(micro_zoo, micro_attacks):
    """Few-shot, the refit also runs where no component exceeds the benign bound but the scan, as `scan` prints it,
    does not call the update clean (a weak backdoor the reference-free cross-check flags); where the scan calls it
    clean, no refit runs. The benign fine-tune is the case of nothing over the bound; the judge's `as_scan` verdict
    is made `inconclusive` for the first half, as the cross-check makes it on such a backdoor."""
    from projlens_defense.conversations import load_conversations
    from projlens_defense.mitigations.base import CleanData
    from projlens_defense.mitigations.subspace import whole_outside_task
    from projlens_defense.runtime import LlavaRuntime

    ref, lens, cal, real, delta, task, first = _repair_inputs(micro_zoo, micro_attacks, "benign")
    assert first == [], "the benign fine-tune has a component over the benign bound"
    scanned = real(lens.projector, as_scan=True)
    printed = Scanner(calibration=cal, mode="reference").judge(lens)  # what `scan` prints: 5%, cross-checked
    assert (scanned.verdict, scanned.score) == (printed.verdict, printed.score) == ("clean", printed.score), printed
    rt = LlavaRuntime.from_pretrained(micro_zoo.reference)
    clean = CleanData.from_samples(rt, load_conversations(micro_zoo.train_data), n=16, seed=0)

    def unbacked(projector, as_scan=False):
        res = real(projector, as_scan=as_scan)
        return dataclasses.replace(res, verdict="inconclusive", reason="the two modes disagree") if as_scan else res

    res = SubspaceMitigation(lens=lens, calibration=cal, judge=unbacked).apply(lens.projector, ref, clean)
    rep = res.report
    assert rep["mode"] == "few-shot" and rep["refit"]["epochs"] > 0, rep
    assert "calibrated scan calls it inconclusive (the two modes disagree)" in rep["selection"], rep["selection"]
    assert rep["rank"] == len(whole_outside_task(delta, task)) > 0
    assert res.projector is not None and not torch.equal(res.projector.layers[-1].weight, lens.projector.layers[-1].weight)
    # the scan calls it clean: no refit (the probe search runs, which removes nothing without a fixed target)
    comps, rep2 = SubspaceMitigation(lens=lens, calibration=cal, judge=real)._few_shot_after_task_removed(
        lens.projector, delta, clean)
    assert not rep2.get("refit") and "scan_verdict" not in rep2, rep2


def test_data_free_removes_until_the_scan_calls_it_clean(micro_zoo, micro_attacks):
    """Data-free, an update with nothing over the benign bound that the scan (as printed) does not call clean loses
    its components outside the task subspace one at a time, each lowering the scan's score, until the scan calls it
    clean; where removal never gets there, nothing is removed and the report says why. The benign fine-tune stands
    in for such an update: its unrepaired self is reported `inconclusive`, every candidate as the real scan says."""
    out, _ = micro_attacks
    ref = load_projector(micro_zoo.reference)
    lens, cal = lens_context(out / "benign", ref)
    real = repair_judge(lens, cal)
    assert real is not None
    suspect = lens.projector

    def judge_with(always: bool):
        def judge(projector, as_scan=False):
            res = real(projector, as_scan=as_scan)
            unrepaired = projector is suspect or all(
                torch.equal(a.weight, b.weight) for a, b in zip(projector.layers, suspect.layers, strict=True))
            if as_scan and (always or unrepaired):
                res = dataclasses.replace(res, verdict="inconclusive", reason="the two modes disagree")
            return res
        return judge

    res = SubspaceMitigation(lens=lens, calibration=cal, judge=judge_with(False)).apply(suspect, ref)
    check = res.report["scan_check"]
    assert check["as_scan"] and check["verdict"] == "inconclusive" and check["verdict_after"] == "clean", check
    scores = check["scores"]
    assert res.report["rank"] == check["removed"] == len(scores) - 1 >= 1, res.report
    assert all(b < a for a, b in zip(scores, scores[1:], strict=False)), scores
    assert "until the scan as printed calls it clean" in res.report["selection"]
    assert real(res.projector, as_scan=True).verdict == "clean"

    res = SubspaceMitigation(lens=lens, calibration=cal, judge=judge_with(True)).apply(suspect, ref)
    assert res.report["rank"] == 0 and res.report["removed"] == [], res.report
    assert "calls it inconclusive (the two modes disagree), but removing components" in res.report["selection"]
