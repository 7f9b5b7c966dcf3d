"""The README's Python API example, executed on the micro zoo (the README itself is the source of truth)."""

from __future__ import annotations

import re
from pathlib import Path

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
    assert rec["metrics"]["asr"] >= 0.5
    assert res.verdict == "suspicious" and res.p_value < res.fpr and res.calibration
    assert fix["report"]["rank"] >= 1 and (tmp_path / "repaired" / "model.safetensors").is_file()
    assert after["asr"] <= 0.1 and after["clean_accuracy"] >= rec["metrics"]["clean_accuracy"] - 0.03
    out = capsys.readouterr().out
    assert "suspicious" in out and "ASR after" in out


def test_public_api_is_small_and_documented() -> None:
    assert set(pld.__all__) >= {"scan", "calibrate", "sanitize", "analyze", "attack", "evaluate"}
    for name in ("scan", "calibrate", "sanitize", "analyze", "attack", "evaluate", "load_zoo"):
        assert getattr(pld, name).__doc__, name
