"""A reference-mode `clean` must be backed by the weights too: an update below the lens threshold whose top
component outside the benign task subspace exceeds the benign bound (the data-free repair's test, at the
calibration's FPR) is `inconclusive` (exit 5), not `clean`. On micro zoos built from seed 1 and on another CPU,
backdoors with ASR >= 0.99 scored below the lens threshold while that test removed them (issue 12)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from projlens_defense.cli import main
from projlens_defense.self_calibration import calibration_path


@pytest.fixture(scope="module")
def lens_blind_calibration(micro_zoo, tmp_path_factory) -> Path:
    """The zoo's own calibration with the lens signals' benign values raised far above any fine-tune's, so no
    lens signal can flag anything; the task subspace and its residual-share null are the zoo's as fitted."""
    d = json.loads(calibration_path(micro_zoo.reference).read_text())
    table = d["null"]["reference"]
    for s in d["combine"]["reference"]:
        table[s] = [None if v is None else v + 1e3 for v in table[s]]
    out = tmp_path_factory.mktemp("cal") / "lens_blind.json"
    out.write_text(json.dumps(d))
    return out


@pytest.fixture(scope="module")
def reference_free_alarmed_calibration(micro_zoo, tmp_path_factory) -> Path:
    """The zoo's own calibration with the reference-free signals' benign values moved far below any fine-tune's
    (evenly spread, so none of them is flagged held out), so that test flags every fine-tune; the reference-mode
    null is the zoo's as fitted."""
    d = json.loads(calibration_path(micro_zoo.reference).read_text())
    table = d["null"]["reference-free"]
    for s in d["combine"]["reference-free"]:
        table[s] = [None if v is None else -1e3 + 0.1 * i for i, v in enumerate(table[s])]
    out = tmp_path_factory.mktemp("cal") / "reference_free_alarmed.json"
    out.write_text(json.dumps(d))
    return out


def _scan(ckpt: Path, reference: Path, calibration: Path) -> tuple[int, dict]:
    r = CliRunner().invoke(main, ["scan", str(ckpt), "--reference", str(reference), "--calibration", str(calibration),
                                  "--format", "json"])
    assert "Traceback" not in r.output, r.output
    return r.exit_code, json.loads(r.stdout)[0]


def test_below_the_lens_threshold_with_an_outsized_component_is_inconclusive(micro_zoo, micro_attacks,
                                                                             lens_blind_calibration):
    code, res = _scan(micro_attacks[0] / "backdoored", micro_zoo.reference, lens_blind_calibration)
    assert res["score"] < res["threshold"], res  # the lens does not flag it under this calibration
    assert res["verdict"] == "inconclusive" and code == 5, res
    assert "exceeds the benign bound" in res["reason"] and "multi_modal_projector" in res["reason"], res["reason"]


def test_a_benign_update_below_every_bound_stays_clean(micro_zoo, micro_attacks, lens_blind_calibration):
    code, res = _scan(micro_attacks[0] / "benign", micro_zoo.reference, lens_blind_calibration)
    assert res["verdict"] == "clean" and code == 0 and res["reason"] is None, res


def test_the_scan_and_the_data_free_repair_agree(micro_zoo, micro_attacks, tmp_path):
    """What makes the scan inconclusive is what `sanitize` removes: on the benign control it removes nothing
    (exit 6) and the scan says clean."""
    r = CliRunner().invoke(main, ["sanitize", str(micro_attacks[0] / "benign"), "--out", str(tmp_path / "s")])
    assert r.exit_code == 6, r.output
    code, res = _scan(micro_attacks[0] / "benign", micro_zoo.reference, calibration_path(micro_zoo.reference))
    assert res["verdict"] == "clean" and code == 0, res


def test_a_clean_verdict_needs_the_reference_free_test_too(micro_zoo, micro_attacks,
                                                           reference_free_alarmed_calibration):
    """Below every reference-mode bound, but flagged by the calibrated reference-free test: `inconclusive`, with
    the reference-free score in the reason and its signals in the result; the lens score is the one of the
    unchanged reference-mode null (the benign control is `clean` under it, test above)."""
    code, res = _scan(micro_attacks[0] / "benign", micro_zoo.reference, reference_free_alarmed_calibration)
    assert res["score"] < res["threshold"], res
    assert res["verdict"] == "inconclusive" and code == 5, res
    assert "reference-free test flags it" in res["reason"], res["reason"]
    code, plain = _scan(micro_attacks[0] / "benign", micro_zoo.reference, calibration_path(micro_zoo.reference))
    assert plain["score"] == res["score"] and plain["verdict"] == "clean" and code == 0, plain
    # the same projector read alone gives the same signal; only its benign null moved, so its z-score jumps
    assert plain["signals"]["rf.task_influence"] == res["signals"]["rf.task_influence"], (plain, res)
    assert res["zscores"]["rf.task_influence"] > plain["zscores"]["rf.task_influence"] + 10, (plain, res)


def test_a_reference_free_test_that_flags_its_own_benign_cannot_veto(micro_zoo, micro_attacks,
                                                                     reference_free_alarmed_calibration, tmp_path):
    """The same alarmed null with one benign fine-tune far above the rest: held out, that one is flagged, so the
    reference-free test has no ground to withhold `clean`."""
    d = json.loads(reference_free_alarmed_calibration.read_text())
    for s in d["combine"]["reference-free"]:
        d["null"]["reference-free"][s][-1] = 1e3
    cal = tmp_path / "self_flagging.json"
    cal.write_text(json.dumps(d))
    code, res = _scan(micro_attacks[0] / "benign", micro_zoo.reference, cal)
    assert res["verdict"] == "clean" and code == 0, res
