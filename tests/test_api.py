"""The README's Python API example, executed on the micro zoo (the README itself is the source of truth)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import projlens_defense as pld

README = Path(__file__).resolve().parent.parent / "README.md"


def _example() -> str:
    text = README.read_text()
    section = text[text.index("### Python API") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_api_example_runs_and_its_claims_hold(micro_zoo, tmp_path, capsys) -> None:
    code = _example().replace('zoo_preset="default"', 'zoo_preset="micro"').replace("runs/api", str(tmp_path))
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)  # noqa: S102 - our own README
    rec, res, fix, after = scope["rec"], scope["res"], scope["fix"], scope["after"]
    assert isinstance(rec, pld.AttackResult) and rec.metrics["asr"] >= 0.5
    assert json.loads(json.dumps(rec.to_dict())) == json.loads((tmp_path / "attacked" / "attack.json").read_text())
    # never called clean: flagged by the lens (p < FPR) on some builds of the micro zoo; on others (seed 1, another
    # CPU) below the lens threshold and held back by the repair's residual-share test (issue 12)
    assert res.calibration and res.verdict in ("suspicious", "inconclusive"), (res.verdict, res.score, res.reason)
    assert res.p_value < res.fpr if res.verdict == "suspicious" else "exceeds the benign bound" in res.reason
    assert isinstance(fix, pld.SanitizeResult) and fix.to_dict()["report"] is fix.report
    assert fix.report["rank"] >= 1 and (tmp_path / "repaired" / "model.safetensors").is_file()
    assert after.to_dict()["asr"] == after.metrics.asr
    assert after.metrics.asr <= 0.1 and after.metrics.clean_accuracy >= rec.metrics["clean_accuracy"] - 0.03
    out = capsys.readouterr().out
    assert res.verdict in out and "ASR after" in out


def test_public_api_is_small_and_documented() -> None:
    assert set(pld.__all__) >= {"scan", "calibrate", "sanitize", "analyze", "attack", "evaluate"}
    for name in ("scan", "calibrate", "sanitize", "analyze", "attack", "evaluate", "load_zoo"):
        assert getattr(pld, name).__doc__, name
    for name in ("AttackResult", "EvaluationResult", "SanitizeResult", "AnalysisResult", "GuardResult"):
        assert name in pld.__all__ and getattr(pld, name).__doc__, name


def test_attack_result_reads_a_record_back_and_renders_it_unchanged(tmp_path) -> None:
    rec = {"variant": "badnets", "benign": False, "config": {"variant": "badnets", "eval_variant": None},
           "base_model": "base", "metrics": {"asr": 1.0}, "wall_time_s": 1.5}
    res = pld.AttackResult.from_dict(rec, tmp_path / "ck")
    assert res.to_dict() == rec and list(res.to_dict()) == list(rec) and res.to_dict() is not rec
    assert res.written and res.metrics == {"asr": 1.0} and res.record.base_model == "base"
    assert res.record.path == tmp_path / "ck" / "attack.json"
    assert not pld.AttackResult.from_dict({"variant": "none", "written": False}, tmp_path).written
    with pytest.raises(pld.CheckpointError, match="not an attack record"):
        pld.AttackResult.from_dict([], tmp_path)


def test_result_dicts_keep_the_cli_json_order(tmp_path) -> None:
    from projlens_defense.attacks.evaluate import EvalResult

    ev = pld.EvaluationResult(tmp_path, "badnets", tmp_path / "t.json", "cpu", "float32", EvalResult(0.9, 0.1, 0.0, 8, 4))
    assert list(ev.to_dict()) == ["clean_accuracy", "asr", "false_activation", "n_clean", "n_triggered", "checkpoint",
                                  "variant", "test_data", "device", "dtype"]
    san = pld.SanitizeResult(tmp_path, tmp_path / "o", "hf", "subspace", "data-free", None, True, {}, {"rank": 1}, [])
    assert list(san.to_dict()) == ["checkpoint", "out", "format", "method", "mode", "reference", "writable", "params",
                                   "report", "warnings"]
    assert "clean_accuracy" in pld.SanitizeResult(**{**vars(san), "clean_accuracy": {"n": 1}}).to_dict()
    rows = [{"image": "a.png", "score": 2.0, "flagged": True}, {"image": "b.png", "score": 0.1, "flagged": False}]
    g = pld.GuardResult(tmp_path, 1.0, "m", 8, 0.01, rows, [])
    assert g.flagged == 1 and list(g.to_dict())[-1] == "flagged"
    an = pld.AnalysisResult({"checkpoint": "c", "figures": {}}, None, tmp_path / "report.md")
    assert an.to_dict() == {"checkpoint": "c", "figures": {}, "benign_source": None, "report": str(tmp_path / "report.md")}
