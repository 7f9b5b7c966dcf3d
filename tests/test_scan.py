"""`scan` / `calibrate`: detectors on planted updates, calibration, CLI exit codes, JSON and SARIF.

Checkpoints are tiny real LLaVA saves with hand-made projector updates (no training): benign ones
get a small random full-rank update, the suspect a rank-1 update along a direction that the
logit lens reads as one known token.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from tiny_world import attention_direction, save_with_tokenizer

from projlens_defense.cli import main
from projlens_defense.cli.exits import scan_code
from projlens_defense.detectors import DETECTORS, LogitLensDetector, ReferenceFreeDetector, SpectralDetector
from projlens_defense.detectors.base import DetectorReport
from projlens_defense.detectors.calibration import (
    WEIGHT_SPACE_DETECTORS,
    Calibration,
    fit_calibration,
)
from projlens_defense.detectors.loading import load_checkpoint
from projlens_defense.detectors.scan import Scanner
from projlens_defense.detectors.spectral import spectrum_stats
from projlens_defense.errors import CheckpointError
from projlens_defense.eval.scan_report import RULE_BACKDOOR, RULE_ERROR, sarif_report
from projlens_defense.linalg import top_singular
from projlens_defense.scan_input import OvLayer, ScanInput

TARGET = 17
TASK = 30
N_BENIGN = 7  # benign0..5 calibrate, benign6 is the held-out clean one
CLEAN = f"benign{N_BENIGN - 1}"
P1, P2 = "multi_modal_projector.linear_1.weight", "multi_modal_projector.linear_2.weight"
# the official OASIS SARIF 2.1.0 schema (errata01), vendored: see tests/data/README.md
SARIF_SCHEMA = Path(__file__).parent / "data" / "sarif-schema-2.1.0.json"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, tiny_llava_factory) -> dict[str, Path]:
    """reference, 5 benign fine-tunes, a suspect (attention-lens target) and an embedding-aligned suspect."""
    root = tmp_path_factory.mktemp("scan")
    out: dict[str, Path] = {}
    model = tiny_llava_factory(0)
    with torch.no_grad():  # a well-conditioned attention OV map (random init is nearly singular)
        lm = model.model.language_model
        for layer in lm.layers:
            for lin in (layer.self_attn.v_proj, layer.self_attn.o_proj):
                lin.weight.copy_(torch.linalg.qr(torch.randn(lin.weight.shape, generator=torch.Generator().manual_seed(7)))[0])
            layer.input_layernorm.weight.fill_(1.0)
        lm.norm.weight.fill_(1.0)
    out["reference"] = save_with_tokenizer(model, root / "reference")
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    w2 = model.model.multi_modal_projector.linear_2.weight
    norm2 = float(w2.detach().norm())

    def unit(n: int) -> torch.Tensor:
        x = torch.randn(n, generator=gen)
        return x / x.norm()

    # every fine-tune of "the task" moves the projector along the same direction (toward TASK), with
    # seed-to-seed variation; the backdoor adds a rank-1 piece toward TARGET on top
    task_in = unit(w2.shape[1])
    task = 0.5 * norm2 * torch.outer(attention_direction(model, TASK), task_in)

    def variant(name: str, i: int, extra: torch.Tensor | None = None) -> Path:
        model.load_state_dict(sd)
        with torch.no_grad():
            proj = model.model.multi_modal_projector
            proj.linear_1.weight += 0.01 * torch.randn(proj.linear_1.weight.shape, generator=gen)
            proj.linear_2.weight += (1 + 0.1 * i) * task + 0.01 * torch.randn(w2.shape, generator=gen)
            if extra is not None:
                proj.linear_2.weight += extra
        return save_with_tokenizer(model, root / name)

    for i in range(N_BENIGN):
        out[f"benign{i}"] = variant(f"benign{i}", i)
    v = unit(w2.shape[1])
    out["suspect"] = variant("suspect", 2, 1.5 * norm2 * torch.outer(attention_direction(model, TARGET), v))
    # a backdoor riding on the task's own input direction: its update is rank-1 and points mostly at TASK
    out["suspect_task"] = variant("suspect_task", 2, 0.3 * norm2 * torch.outer(attention_direction(model, TARGET), task_in))
    e = model.model.language_model.embed_tokens.weight[TARGET].detach()
    out["suspect_embed"] = variant("suspect_embed", 2, 1.5 * norm2 * torch.outer(e / e.norm(), v))
    model.load_state_dict(sd)
    return out


@pytest.fixture(scope="module")
def calibration_file(world: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cal") / "calibration.json"
    benign = [str(world[f"benign{i}"]) for i in range(N_BENIGN - 1)]
    res = CliRunner().invoke(main, ["calibrate", "--benign", *benign, "--reference", str(world["reference"]),
                                    "--out", str(path)])
    assert res.exit_code == 0, res.output
    return path


def _scan(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(main, ["scan", *args])
    assert "Traceback" not in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    return res.exit_code, res.output


def _valid_sarif(text: str) -> dict:
    """Parse ``text`` as strict JSON (no NaN/inf) and validate it against the official SARIF 2.1.0
    schema, formats included (``uri`` / ``uri-reference`` need rfc3986-validator, a test extra)."""
    from jsonschema import Draft4Validator, FormatChecker

    log = json.loads(text, parse_constant=lambda c: pytest.fail(f"SARIF output is not strict JSON: {c}"))
    schema = json.loads(SARIF_SCHEMA.read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-04/schema#"
    checker = FormatChecker()  # every known format: draft 4's own list has no "uri-reference"
    assert {"uri", "uri-reference"} <= set(checker.checkers), "install the test extra (rfc3986-validator)"
    errors = sorted(Draft4Validator(schema, format_checker=checker).iter_errors(log), key=lambda e: e.json_path)
    assert not errors, "SARIF violates the 2.1.0 schema:\n" + "\n".join(f"  {e.json_path}: {e.message}" for e in errors)
    return log


def _input(world: dict[str, Path], name: str, reference: bool = True, lens_layers: int = 2) -> ScanInput:
    s = Scanner(Calibration(null={}), reference=world["reference"] if reference else None, ov_layers=lens_layers)
    return s.build_input(load_checkpoint(world[name], ov_layers=lens_layers), [])


# --------------------------------------------------------------------------- detectors
def test_registry_names_match_detectors() -> None:
    assert {"spectral", "logit-lens", "reference-free"} <= set(DETECTORS)
    for name, cls in DETECTORS.items():
        assert cls.name == name


def test_logit_lens_names_the_planted_token(world: dict[str, Path]) -> None:
    det = LogitLensDetector()
    rep = det.score(_input(world, "suspect"))
    assert f"tok{TARGET}" in rep.suspected_tokens[:2]  # beside the task's own token
    assert rep.signals["lens.peak"] > 3 and "lens.novelty" not in rep.signals  # unfitted: no baseline
    json.dumps(rep.to_dict())  # serialisable
    det.fit([_input(world, f"benign{i}") for i in range(N_BENIGN - 1)])
    rep = det.score(_input(world, "suspect"))
    assert rep.evidence["most_novel_token"]["token"] == f"tok{TARGET}"
    clean = det.score(_input(world, CLEAN))
    assert rep.signals["lens.novelty"] > clean.signals["lens.novelty"]
    assert rep.signals["lens.influence"] > clean.signals["lens.influence"]


def test_plain_embedding_lens_names_an_embedding_aligned_update(world: dict[str, Path]) -> None:
    inp = _input(world, "suspect_embed", lens_layers=0)
    assert not inp.ov_layers
    rep = LogitLensDetector(readings=["embed"]).score(inp)
    assert rep.suspected_tokens[0] == f"tok{TARGET}"


def test_benign_update_reads_as_the_task_token(world: dict[str, Path]) -> None:
    rep = LogitLensDetector().score(_input(world, CLEAN))
    assert rep.suspected_tokens[0] == f"tok{TASK}"
    assert f"tok{TARGET}" not in rep.suspected_tokens[:3]


def test_reference_free_finds_the_planted_token(world: dict[str, Path]) -> None:
    inp = _input(world, "suspect", reference=False)
    assert inp.reference is None
    rep = ReferenceFreeDetector().score(inp)
    assert f"tok{TARGET}" in rep.suspected_tokens[:5]


def test_task_residual_reads_the_update_outside_the_benign_task_subspace(world: dict[str, Path]) -> None:
    from projlens_defense.detectors import TaskResidualDetector
    from projlens_defense.scan_input import MissingInput

    with pytest.raises(MissingInput):
        TaskResidualDetector().score(_input(world, "suspect"))
    det = TaskResidualDetector().fit([_input(world, f"benign{i}") for i in range(N_BENIGN - 1)])
    bad, ok = det.score(_input(world, "suspect")), det.score(_input(world, CLEAN))
    # the planted backdoor is a rank-1 piece no benign fine-tune moves: many benign std out; the held-out benign is not
    assert bad.signals["task.residual_share"] > 5 and ok.signals["task.residual_share"] < 3
    again = TaskResidualDetector().set_state(json.loads(json.dumps(det.get_state())))
    assert again.score(_input(world, "suspect")).signals == pytest.approx(bad.signals, rel=1e-3)  # stored to 6 digits
    assert "task-residual" in DETECTORS and not TaskResidualDetector().can_score(_input(world, "suspect", False))


def test_spectral_reports_per_layer_structure(world: dict[str, Path]) -> None:
    rep = SpectralDetector().score(_input(world, "suspect"))
    layers = rep.evidence["layers"]
    assert list(layers) == ["multi_modal_projector.linear_1", "multi_modal_projector.linear_2"]
    assert rep.signals["l1.top1_energy"] < 0.5  # random full-rank noise
    assert layers["multi_modal_projector.linear_2"]["stable_rank"] < 2  # task + backdoor: low rank
    # a benign task update is just as low-rank: spectra alone cannot tell them apart (DESIGN.md 2)
    ben = SpectralDetector().score(_input(world, CLEAN)).evidence["layers"]["multi_modal_projector.linear_2"]
    assert ben["stable_rank"] < 2


def test_spectrum_stats_and_randomized_svd() -> None:
    s = torch.tensor([3.0, 1.0, 1.0, 1.0])
    st = spectrum_stats(s, float((s**2).sum()))
    assert st["top1_energy"] == pytest.approx(0.75)
    assert st["stable_rank"] == pytest.approx(12 / 9)
    assert st["gap12"] == pytest.approx(3.0)
    g = torch.Generator().manual_seed(0)
    m = torch.randn(120, 100, generator=g) * 0.01 + 5 * torch.outer(torch.randn(120, generator=g), torch.randn(100, generator=g))
    u, sv, v = top_singular(m, 3, min_dim=50)  # min dim 100 > 50: randomized
    eu, es, _ = torch.linalg.svd(m, full_matrices=False)
    assert sv[0] == pytest.approx(float(es[0]), rel=1e-4)
    assert abs(float(u[:, 0] @ eu[:, 0])) > 0.999
    assert u.shape == (120, 3) and v.shape == (100, 3)


def test_ov_layer_grouped_query_attention_matches_per_head_math() -> None:
    g = torch.Generator().manual_seed(0)
    hidden, heads, kv, hd = 8, 4, 2, 2
    vp, op = torch.randn(kv * hd, hidden, generator=g), torch.randn(hidden, heads * hd, generator=g)
    x = torch.randn(hidden, 3, generator=g)
    got = OvLayer(vp, op, None, heads // kv, hd).apply(x)
    v = (vp @ x).reshape(kv, hd, 3)
    want = sum(op[:, h * hd:(h + 1) * hd] @ v[h // (heads // kv)] for h in range(heads))
    assert torch.allclose(got, want, atol=1e-5)


# --------------------------------------------------------------------------- calibration
def test_calibration_threshold_is_a_student_t_prediction_bound_at_the_stated_fpr() -> None:
    from scipy.stats import t

    vals = [1.0, 2.0, 3.0, 2.0]
    cal = Calibration(null={"reference": {"lens.novelty": vals}}, fpr=0.05, combine={"reference": ["lens.novelty"]})
    used = ["lens.novelty"]
    n = len(vals)
    assert cal.threshold("reference", used) == pytest.approx(t.isf(0.05, n - 1) * (1 + 1 / n) ** 0.5)
    # two signals combined by max: each is tested at fpr / 2 (Bonferroni)
    two = Calibration(null={"reference": {"a": vals, "b": vals}}, fpr=0.05, combine={"reference": ["a", "b"]})
    assert two.threshold("reference", ["a", "b"]) == pytest.approx(t.isf(0.025, n - 1) * (1 + 1 / n) ** 0.5)
    score, got, z = cal.score("reference", {"lens.novelty": 10.0, "lens.peak": 1.0})
    assert got == used and score > cal.threshold("reference", used)
    assert cal.p_value("reference", z, used) < 0.05 < cal.p_value("reference", {"lens.novelty": 0.5}, used)
    again = Calibration.from_dict(json.loads(json.dumps(cal.to_dict())))
    assert again.threshold("reference", used) == pytest.approx(cal.threshold("reference", used))
    assert again.fpr == 0.05
    assert cal.at_fpr(0.01).threshold("reference", used) == pytest.approx(t.isf(0.01, n - 1) * (1 + 1 / n) ** 0.5)


@pytest.mark.parametrize("fpr", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_a_rate_outside_0_1_is_a_usage_error_for_calibration_and_scanner(fpr: float) -> None:
    from projlens_defense.errors import UsageError

    cal = Calibration(null={"reference": {"a": [1.0, 2.0, 3.0]}}, fpr=0.05, combine={"reference": ["a"]})
    with pytest.raises(UsageError, match="fpr must be in"):
        cal.at_fpr(fpr)
    with pytest.raises(UsageError, match="fpr must be in"):
        Scanner(cal, fpr=fpr)
    # the same rate in a calibration file is the file's fault: a CheckpointError naming the file
    with pytest.raises(CheckpointError, match="cal.json: fpr must be a number in"):
        Calibration.from_dict({**cal.to_dict(), "fpr": fpr}, source="cal.json")


def test_calibration_file_is_valid_and_says_how_many_benign_it_would_flag(calibration_file: Path) -> None:
    d = json.loads(calibration_file.read_text())
    assert set(d["thresholds"]) == {"reference", "reference-free"}
    assert all(len(v) == N_BENIGN - 1 for v in d["null"]["reference"].values())
    assert d["fpr"] == 0.05 and d["benign_flagged_loo"]["reference"] == 0


def test_fit_calibration_refuses_too_few_benign(world: dict[str, Path]) -> None:
    from projlens_defense.errors import UsageError

    with pytest.raises(UsageError):
        fit_calibration([_input(world, "benign0")], {n: DETECTORS[n] for n in WEIGHT_SPACE_DETECTORS})


# --------------------------------------------------------------------------- CLI
def test_scan_exit_codes_clean_and_suspicious(world: dict[str, Path], calibration_file: Path) -> None:
    ref = ["--reference", str(world["reference"]), "--calibration", str(calibration_file)]
    code, out = _scan(str(world[CLEAN]), *ref)
    assert code == 0, out
    code, out = _scan(str(world["suspect"]), *ref)
    assert code == 1, out
    assert "SUSPICIOUS" in out and f"tok{TARGET}" in out


def test_scan_json_fields(world: dict[str, Path], calibration_file: Path, tmp_path: Path) -> None:
    out_file = tmp_path / "report.json"
    code, _ = _scan(str(world["suspect"]), str(world[CLEAN]), "--reference", str(world["reference"]),
                    "--calibration", str(calibration_file), "--format", "json", "--output", str(out_file))
    assert code == 1
    data = json.loads(out_file.read_text())
    assert isinstance(data, list) and len(data) == 2
    for obj in data:
        for key in ("path", "verdict", "score", "threshold", "suspected_target_tokens", "format", "errors"):
            assert key in obj
        assert obj["verdict"] in ("clean", "suspicious")
        assert obj["format"] == "hf-llava"
        assert isinstance(obj["suspected_target_tokens"], list)
        assert math.isfinite(obj["score"]) and math.isfinite(obj["threshold"])
    sus, ben = data
    assert sus["verdict"] == "suspicious" and f"tok{TARGET}" in sus["suspected_target_tokens"][:2]
    assert ben["verdict"] == "clean" and ben["errors"] == []
    size = sum(f.stat().st_size for f in world["suspect"].glob("*.safetensors"))
    # with a reference, a small checkpoint is read whole once more: its tensors outside the projector are compared
    assert size < sus["bytes_read"] < 2 * size and sus["scope"]["changed"] == {"language model": 0, "vision tower": 0}


def test_scan_decides_at_the_rate_it_is_given(world: dict[str, Path], calibration_file: Path) -> None:
    from scipy.stats import t

    ref = ["--reference", str(world["reference"]), "--calibration", str(calibration_file), "--format", "json"]
    n = N_BENIGN - 1
    thresholds = {}
    for fpr in ("0.05", "0.01", "0.001"):
        code, out = _scan(str(world["suspect"]), *ref, *(["--fpr", fpr] if fpr != "0.05" else []))
        obj = json.loads(out)[0]
        assert obj["fpr"] == float(fpr) and (code == 1) == (obj["score"] > obj["threshold"])
        m = len(obj["signals_used"])  # Bonferroni over the combined signals
        assert obj["threshold"] == pytest.approx(t.isf(float(fpr) / m, n - 1) * (1 + 1 / n) ** 0.5, abs=1e-4)
        thresholds[fpr] = obj["threshold"]
    assert thresholds["0.05"] < thresholds["0.01"] < thresholds["0.001"]  # the default 5% is the lowest bar
    code, out = _scan(str(world["suspect"]), *ref, "--fpr", "0.9")
    assert code == 4 and "Traceback" not in out


def test_scan_reference_free_mode(world: dict[str, Path], calibration_file: Path) -> None:
    code, out = _scan(str(world["suspect"]), "--calibration", str(calibration_file), "--format", "json")
    obj = json.loads(out)[0]
    # without one it reads only the projector and the LLM read-out the lens needs
    assert 0 < obj["bytes_read"] < sum(f.stat().st_size for f in world["suspect"].glob("*.safetensors"))
    assert obj["mode"] == "reference-free"
    assert obj["signals_used"] and obj["signals_used"][0].startswith("rf.")
    assert f"tok{TARGET}" in obj["suspected_target_tokens"][:5]
    # a planted rank-1 update of 1.5x the layer's norm toward one token (score ~47 against a threshold ~3.5)
    assert obj["verdict"] == "suspicious", obj
    assert code == 1


def test_scan_sarif_is_valid_2_1_0(world: dict[str, Path], calibration_file: Path) -> None:
    code, out = _scan(str(world["suspect"]), str(world[CLEAN]), "--reference", str(world["reference"]),
                      "--calibration", str(calibration_file), "--format", "sarif")
    assert code == 1
    log = _valid_sarif(out)
    assert log["version"] == "2.1.0" and "sarif-2.1.0" in log["$schema"]
    run = log["runs"][0]
    assert run["tool"]["driver"]["name"] == "projlens-defense"
    rule_ids = {r["id"] for r in run["tool"]["driver"]["rules"]}
    assert len(run["results"]) == 2
    for r in run["results"]:
        assert r["ruleId"] in rule_ids
        assert r["level"] in ("none", "note", "warning", "error")
        assert r["message"]["text"]
        assert r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]
    assert [r["level"] for r in run["results"]] == ["error", "none"]


def test_scan_sarif_with_an_error_result_is_valid_2_1_0(world: dict[str, Path], calibration_file: Path,
                                                        tmp_path: Path) -> None:
    """A corrupt checkpoint among the paths: its result is a schema-valid PLD002 warning naming the
    file and the reason, beside the suspicious and the clean ones; alone it exits 2, still valid SARIF."""
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    code, out = _scan(str(bad), str(world["suspect"]), str(world[CLEAN]), "--reference", str(world["reference"]),
                      "--calibration", str(calibration_file), "--format", "sarif")
    assert code == 1, out  # an error does not hide the suspicious checkpoint
    results = _valid_sarif(out)["runs"][0]["results"]
    assert [(r["ruleId"], r["level"], r["kind"]) for r in results] == [
        (RULE_ERROR, "warning", "fail"), (RULE_BACKDOOR, "error", "fail"), (RULE_BACKDOOR, "none", "pass")]
    err = results[0]
    assert err["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] == bad.resolve().as_uri()
    assert err["message"]["text"].startswith("could not scan: ") and "bad.safetensors" in err["message"]["text"]
    assert err["properties"]["verdict"] == "error" and err["properties"]["score"] is None
    code, out = _scan(str(bad), "--format", "sarif")
    assert code == 2
    (only,) = _valid_sarif(out)["runs"][0]["results"]
    assert only["ruleId"] == RULE_ERROR


def test_scan_sarif_relative_path_is_a_valid_uri_reference(world: dict[str, Path], calibration_file: Path,
                                                           tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A relative path with characters a URI may not hold (space, '#', '%') is percent-encoded."""
    import shutil
    from urllib.parse import unquote

    name = "my ckpt #1 100%"
    shutil.copytree(world[CLEAN], tmp_path / name)
    monkeypatch.chdir(tmp_path)
    code, out = _scan(name, "--reference", str(world["reference"]), "--calibration", str(calibration_file),
                      "--format", "sarif")
    assert code == 0, out
    uri = _valid_sarif(out)["runs"][0]["results"][0]["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]
    assert uri == "my%20ckpt%20%231%20100%25" and unquote(uri) == name


def test_sarif_report_non_finite_numbers_are_null() -> None:
    """A non-finite score must not turn the log into invalid JSON (``NaN``)."""
    from projlens_defense.detectors.scan import ScanResult

    res = ScanResult("/x/ckpt", "clean", score=float("nan"), threshold=float("inf"), format="hf-llava", mode="reference")
    log = _valid_sarif(json.dumps(sarif_report([res], tool_version="0.0.0"), allow_nan=False))
    props = log["runs"][0]["results"][0]["properties"]
    assert props["score"] is None and props["threshold"] is None


def test_scan_folder_of_checkpoints_skips_non_checkpoints(world: dict[str, Path], calibration_file: Path,
                                                         tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "many"
    folder.mkdir()
    shutil.copytree(world[CLEAN], folder / "a")
    shutil.copytree(world["suspect"], folder / "b")
    (folder / "notes").mkdir()
    (folder / "README.md").write_text("hello")
    code, out = _scan(str(folder), "--reference", str(world["reference"]), "--calibration", str(calibration_file),
                      "--format", "json")
    assert code == 1
    assert [Path(o["path"]).name for o in json.loads(out)] == ["a", "b"]


def test_scan_corrupt_file_exits_2(world: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    code, out = _scan(str(bad), "--format", "json")
    assert code == 2
    obj = json.loads(out)[0]
    assert obj["verdict"] == "error" and obj["errors"]
    code, out = _scan(str(bad))
    assert code == 2 and "ERROR" in out


def test_scan_error_does_not_hide_a_suspicious_checkpoint(world: dict[str, Path], calibration_file: Path,
                                                          tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\xff" * 16)
    code, _ = _scan(str(bad), str(world["suspect"]), "--reference", str(world["reference"]),
                    "--calibration", str(calibration_file))
    assert code == 1


def test_scan_empty_dir_exits_3(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    code, out = _scan(str(tmp_path / "empty"))
    assert code == 3 and "nothing scannable" in out


@pytest.mark.parametrize("args", [["--format", "xml"], ["--lens-layers", "-1"], []])
def test_scan_usage_errors_exit_4(world: dict[str, Path], args: list[str]) -> None:
    paths = [str(world["benign0"])] if args else []
    code, out = _scan(*paths, *args)
    assert code == 4, out


def test_scan_missing_path_and_reference_exit_4(world: dict[str, Path], tmp_path: Path) -> None:
    code, _ = _scan(str(tmp_path / "nope"))
    assert code == 4
    code, _ = _scan(str(world["benign0"]), "--reference", str(tmp_path / "nope"))
    assert code == 4


def test_bad_calibration_file_is_one_line_error(world: dict[str, Path], tmp_path: Path) -> None:
    from projlens_defense.detectors.calibration import CALIBRATION_VERSION

    cal = tmp_path / "cal.json"
    cal.write_text(json.dumps({"version": CALIBRATION_VERSION, "null": {"reference": {"x": "oops"}}}))
    res = CliRunner().invoke(main, ["scan", str(world["benign0"]), "--calibration", str(cal)])
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and isinstance(res.exception, SystemExit)
    assert res.stdout == "" and res.output == res.stderr  # nothing but the error, and that on stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0] == f"error: {cal}: signal 'x' must be a list of numbers"


def test_unwritable_output_is_usage_error(world: dict[str, Path], calibration_file: Path, tmp_path: Path) -> None:
    code, out = _scan(str(world["benign0"]), "--calibration", str(calibration_file), "--output", str(tmp_path / "no" / "x.json"))
    assert code == 4 and "cannot write" in out


def test_calibrate_usage_errors(world: dict[str, Path], calibration_file: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(main, ["calibrate", "--benign", str(world["benign0"]), "--out", str(calibration_file)])
    assert res.exit_code == 4 and "exists" in res.output and "Traceback" not in res.output
    res = runner.invoke(main, ["calibrate", "--benign", str(world["benign0"]), "--reference", str(world["reference"]),
                               "--out", str(calibration_file.parent / "new.json")])
    assert res.exit_code == 4 and "at least 3" in res.output


def test_scan_without_calibration_for_the_model_is_inconclusive(world: dict[str, Path], tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROJLENS_CACHE", str(tmp_path))  # no cached calibration for this reference
    code, out = _scan(str(world["suspect"]), "--reference", str(world["reference"]), "--format", "json")
    obj = json.loads(out)[0]
    assert code == 5 and obj["verdict"] == "inconclusive" and "calibrate" in obj["reason"]
    assert obj["score"] is None and obj["suspected_target_tokens"]  # the evidence is still reported


def test_calibration_of_another_model_is_not_used(world: dict[str, Path], calibration_file: Path, tmp_path: Path) -> None:
    d = json.loads(calibration_file.read_text())
    vocab = dict(d, model={**d["model"], "vocab_size": d["model"]["vocab_size"] + 1})
    digest = dict(d, model={**d["model"], "reference_digest": "0" * 16})
    for name, cal in (("vocab", vocab), ("digest", digest)):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(cal))
        code, out = _scan(str(world["suspect"]), "--reference", str(world["reference"]), "--calibration", str(path),
                          "--format", "json")
        obj = json.loads(out)[0]
        assert code == 5 and obj["verdict"] == "inconclusive", (name, obj)
        assert any("another model" in w and ("vocabulary" in w if name == "vocab" else "reference projector" in w)
                   for w in obj["warnings"]), obj["warnings"]


def test_bare_mm_projector_borrows_the_reference_llm(world: dict[str, Path], calibration_file: Path,
                                                     tmp_path: Path) -> None:
    from safetensors.torch import load_file

    sd = load_file(world["suspect"] / "model.safetensors")
    d = tmp_path / "mm"
    d.mkdir()
    save_file({"model.mm_projector.0.weight": sd[P1], "model.mm_projector.0.bias": sd[P1.replace("weight", "bias")],
               "model.mm_projector.2.weight": sd[P2], "model.mm_projector.2.bias": sd[P2.replace("weight", "bias")]},
              d / "mm_projector.safetensors")
    code, out = _scan(str(d / "mm_projector.safetensors"), "--reference", str(world["reference"]),
                      "--calibration", str(calibration_file), "--format", "json")
    obj = json.loads(out)[0]
    assert obj["format"] == "llava-mm-projector" and code == 1
    assert f"tok{TARGET}" in obj["suspected_target_tokens"][:2]
    assert any("reference's LLM" in w for w in obj["warnings"])


def test_exit_code_precedence() -> None:
    from projlens_defense.detectors.scan import ScanResult

    def exit_code(results: list[ScanResult]) -> int:
        return scan_code([r.verdict for r in results])

    assert exit_code([]) == 3
    assert exit_code([ScanResult("a", "clean")]) == 0
    assert exit_code([ScanResult("a", "clean"), ScanResult("b", "error")]) == 2
    assert exit_code([ScanResult("a", "error"), ScanResult("b", "suspicious")]) == 1
    assert exit_code([ScanResult("a", "clean"), ScanResult("b", "inconclusive")]) == 5


def test_unreadable_calibration_json_raises_checkpoint_error(tmp_path: Path) -> None:
    from projlens_defense.detectors.calibration import load_calibration

    p = tmp_path / "c.json"
    p.write_text("[1, 2]")
    with pytest.raises(CheckpointError):
        load_calibration(p)


def test_nan_in_the_llm_readout_is_an_error(world: dict[str, Path], calibration_file: Path, tmp_path: Path) -> None:
    import shutil

    from safetensors.torch import load_file

    d = tmp_path / "nan"
    shutil.copytree(world[CLEAN], d)
    sd = load_file(d / "model.safetensors")
    key = next(k for k in sd if k.endswith("lm_head.weight"))
    sd[key][3, 4] = float("nan")
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    code, out = _scan(str(d), "--reference", str(world["reference"]), "--calibration", str(calibration_file),
                      "--format", "json")
    obj = json.loads(out)[0]
    assert code == 2 and obj["verdict"] == "error" and "NaN" in obj["errors"][0]


def test_identical_to_reference_is_clean(world: dict[str, Path], calibration_file: Path) -> None:
    code, out = _scan(str(world["reference"]), "--reference", str(world["reference"]),
                      "--calibration", str(calibration_file), "--format", "sarif")
    assert code == 0
    res = _valid_sarif(out)["runs"][0]["results"][0]
    assert res["level"] == "none" and "identical" in res["message"]["text"]


def test_task_removed_lens_names_a_target_hidden_under_the_task(world: dict[str, Path]) -> None:
    """The plain reading of a backdoor that shares the task's update direction names the task's
    token; removing the benign fine-tunes' shared subspace names the target (the refusal case)."""
    det = LogitLensDetector().fit([_input(world, f"benign{i}") for i in range(N_BENIGN - 1)])
    assert det.task_basis is not None and det.task_rank == 4 and det.task_basis.shape[1] == 8  # kept for mitigations
    inp = _input(world, "suspect_task")
    assert int(det.reading(inp, task=False)[0].token_scores().argmax()) == TASK
    rep = det.score(inp)
    assert rep.suspected_tokens[0] == f"tok{TARGET}"
    assert rep.evidence["task_rank_removed"] == 4 and rep.signals["lens.task_novelty"] > 3
    # the fitted state (basis included) survives the calibration file's JSON round trip
    again = LogitLensDetector().set_state(json.loads(json.dumps(det.get_state())))
    assert again.score(_input(world, "suspect_task")).suspected_tokens[0] == f"tok{TARGET}"
    # without a task subspace the ranking falls back to the plain reading's scores
    assert LogitLensDetector(task_rank=0).fit([_input(world, f"benign{i}") for i in range(N_BENIGN - 1)]).score(
        inp).suspected_tokens[0] == f"tok{TASK}"


def test_data_free_subspace_removes_the_backdoor_outside_the_task_subspace(
        world: dict[str, Path], calibration_file: Path) -> None:
    """With a calibration's task subspace, data-free `subspace` removes the piece of the update
    outside it (the backdoor toward TARGET) and keeps the task's piece (toward TASK) whole."""
    from projlens_defense.checkpoint import load_projector
    from projlens_defense.detectors.calibration import load_calibration
    from projlens_defense.detectors.lens_context import lens_context
    from projlens_defense.mitigations import MITIGATIONS

    ref, sus = load_projector(world["reference"]), load_projector(world["suspect_task"])
    lens, cal = lens_context(world["suspect_task"], ref, [], calibration_file)
    assert cal is not None and cal.detector_states["logit-lens"]["task_basis"]
    res = MITIGATIONS["subspace"](lens=lens, calibration=cal).apply(sus, ref)
    assert res.report["selection"].startswith("components above the benign bound")
    assert res.report["rank"] == 1 and [x["removed"] for x in res.report["layers"]] == [0, 1]
    spec = load_calibration(calibration_file).task_subspace["layers"][-1]
    left, right = (torch.linalg.qr(torch.tensor(spec[k]))[0] for k in ("left", "right"))
    before, after = sus.delta(ref)[-1], res.projector.delta(ref)[-1]
    task_before, task_after = left.T @ before @ right, left.T @ after @ right
    assert float((task_after - task_before).norm() / task_before.norm()) < 0.05  # the task piece is kept (to 5%)
    assert torch.equal(res.projector.layers[0].weight, sus.layers[0].weight)


def _orthogonal_unit(against: torch.Tensor, seed: int) -> torch.Tensor:
    x = torch.randn(against.shape[0], generator=torch.Generator().manual_seed(seed))
    q = torch.linalg.qr(against)[0]
    x = x - q @ (q.T @ x)
    return x / x.norm()


def test_data_free_subspace_removes_one_component_per_layer(world: dict[str, Path], calibration_file: Path) -> None:
    """The benign-bound test removes a layer's top component outside the task subspace only: a second, weaker
    piece outside it stays (removing such pieces cost 2-5 points of clean accuracy for no ASR on the transfer
    checkpoints); more goes only where the calibrated scan still flags the result (the scan-guided step)."""
    from projlens_defense.checkpoint import load_projector
    from projlens_defense.detectors.lens_context import lens_context
    from projlens_defense.mitigations import MITIGATIONS

    ref, sus = load_projector(world["reference"]), load_projector(world["suspect_task"])
    lens, cal = lens_context(world["suspect_task"], ref, [], calibration_file)
    first = MITIGATIONS["subspace"](lens=lens, calibration=cal).apply(sus, ref)
    removed = sus.delta(ref)[-1] - first.projector.delta(ref)[-1]
    u0, s0, v0 = top_singular(removed, 1)
    spec = cal.task_subspace["layers"][-1]
    left, right = (torch.tensor(spec[k]) for k in ("left", "right"))
    u2 = _orthogonal_unit(torch.cat([left, u0], dim=1), 1)
    v2 = _orthogonal_unit(torch.cat([right, v0], dim=1), 2)
    weights = [layer.weight.clone() for layer in sus.layers]
    weights[-1] += 0.9 * float(s0[0]) * torch.outer(u2, v2)  # above the benign second share, below the first
    two = sus.with_weights(weights)
    res = MITIGATIONS["subspace"](lens=lens, calibration=cal).apply(two, ref)
    assert res.report["rank"] == 1 and [x["removed"] for x in res.report["layers"]] == [0, 1]
    kept = float(u2 @ res.projector.delta(ref)[-1] @ v2)
    assert kept > 0.8 * 0.9 * float(s0[0])  # the weaker piece is (most of it) still there
    assert float(u0[:, 0] @ res.projector.delta(ref)[-1] @ v0[:, 0]) < 0.1 * float(s0[0])  # the backdoor's is not
    # the lens no longer finds TARGET outside the task: the sanitized update reads like a benign one
    det = LogitLensDetector().fit([_input(world, f"benign{i}") for i in range(N_BENIGN - 1)])

    def read(proj: object) -> DetectorReport:
        return det.score(ScanInput(projector=proj, reference=ref, readout=lens.readout, ov_layers=lens.ov_layers,
                                   final_norm=lens.final_norm, vocab=lens.vocab))

    was, now = read(sus), read(res.projector)
    assert was.suspected_tokens[0] == f"tok{TARGET}" and now.suspected_tokens[0] != f"tok{TARGET}"
    ben = [_input(world, f"benign{i}") for i in range(N_BENIGN - 1)]
    loo = [LogitLensDetector().fit(ben[:i] + ben[i + 1 :]).score(b).signals["lens.task_novelty"] for i, b in enumerate(ben)]
    assert now.signals["lens.task_novelty"] <= max(loo)  # within what benign fine-tunes show
