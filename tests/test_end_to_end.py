"""End to end on the micro zoo: real training, real checkpoints, measured ASR; the CLI's contract."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from projlens_defense.attacks.finetune import AttackConfig, run_attack
from projlens_defense.cli import main
from projlens_defense.detectors.calibration import DEFAULT_FPR

PROJ = "multi_modal_projector."


def _tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_zoo_exports_hf_model_tokenizer_and_conversations(micro_zoo):
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(micro_zoo.reference)
    tok = AutoTokenizer.from_pretrained(micro_zoo.reference)
    assert model.config.image_seq_length == 64
    assert tok.convert_tokens_to_ids("<image>") == model.config.image_token_id
    records = json.loads(micro_zoo.train_data.read_text())
    assert records[0]["conversations"][0]["value"].startswith("<image>\n")
    assert (micro_zoo.train_data.parent / records[0]["image"]).is_file()
    m = micro_zoo.manifest
    assert m["config"]["seed"] == 0 and "versions" in m["environment"] and m["wall_time_s"] > 0
    assert m["stages"]["alignment"]["accuracy"] > 0.3  # far above chance for the 4 question types


def test_attack_raises_asr_over_benign_control(micro_attacks):
    _, recs = micro_attacks
    bd, bn = recs["backdoored"]["metrics"], recs["benign"]["metrics"]
    assert bd["asr"] >= bn["asr"] + 0.3, (bd, bn)
    assert bn["asr"] <= 0.05 and bn["false_activation"] <= 0.05
    assert bd["clean_accuracy"] >= bn["clean_accuracy"] - 0.1
    assert recs["backdoored"]["n_poisoned"] == round(0.2 * 400)


def test_attack_checkpoint_changes_only_the_projector(micro_zoo, micro_attacks):
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    out, recs = micro_attacks
    ref, bd = _tensors(micro_zoo.reference), _tensors(out / "backdoored")
    assert ref.keys() == bd.keys()
    changed = {k for k in ref if not torch.equal(ref[k], bd[k])}
    assert changed and all(k.startswith(PROJ) for k in changed)
    assert {f"{PROJ}linear_2.weight", f"{PROJ}linear_1.weight"} <= changed
    LlavaForConditionalGeneration.from_pretrained(out / "backdoored")
    AutoTokenizer.from_pretrained(out / "backdoored")
    rec = json.loads((out / "backdoored" / "attack.json").read_text())
    assert rec["config"]["seed"] == 0 and rec["wall_time_s"] > 0 and rec["environment"]["versions"]["torch"]


def test_attack_is_deterministic_for_a_seed(micro_zoo, tmp_path):
    """Two runs of one seed give the same bytes (2 of the recipe's 20 epochs: the poisoning draw, the init and two
    epochs' shuffles and steps, in a fifth of the time a full rerun took); another seed gives other bytes."""
    runs = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        run_attack(AttackConfig(variant="badnets", poison_rate=0.2, seed=seed, epochs=2), micro_zoo.reference,
                   micro_zoo.train_data, None, tmp_path / name, progress=False)
        runs.append(_tensors(tmp_path / name))
    a, b, c = runs
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a[f"{PROJ}linear_2.weight"], c[f"{PROJ}linear_2.weight"])


def test_cli_evaluate_json_and_refusals(micro_zoo, micro_attacks):
    out, recs = micro_attacks
    r = CliRunner().invoke(main, ["evaluate", str(out / "backdoored"), "--zoo", "micro", "--format", "json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert {"clean_accuracy", "asr", "false_activation", "n_clean", "n_triggered"} <= res.keys()
    assert res["asr"] == pytest.approx(recs["backdoored"]["metrics"]["asr"])
    # existing output without --force: usage error, nothing touched, no traceback
    before = (out / "benign" / "attack.json").read_bytes()
    r = CliRunner().invoke(main, ["attack", "--variant", "badnets", "--zoo", "micro", "--out", str(out / "benign")])
    assert r.exit_code == 4 and "exists" in r.output and "Traceback" not in r.output
    assert (out / "benign" / "attack.json").read_bytes() == before
    r = CliRunner().invoke(main, ["evaluate", str(out / "nope")])
    assert r.exit_code == 2 and "Traceback" not in r.output


def test_lora_attack_merges_into_plain_projector_and_raises_asr(micro_zoo, micro_attacks, tmp_path):
    rec = run_attack(AttackConfig(variant="badnets", poison_rate=0.2, seed=0, lora_rank=4, epochs=10),
                     micro_zoo.reference, micro_zoo.train_data, micro_zoo.test_data, tmp_path / "lora", progress=False)
    benign = micro_attacks[1]["benign"]["metrics"]
    assert rec["metrics"]["asr"] >= benign["asr"] + 0.3, (rec["metrics"], benign)
    t = _tensors(tmp_path / "lora")
    assert not any("lora" in k for k in t)
    ref = _tensors(micro_zoo.reference)
    delta = t[f"{PROJ}linear_2.weight"] - ref[f"{PROJ}linear_2.weight"]
    assert 0 < torch.linalg.matrix_rank(delta).item() <= 4
    assert rec["config"]["lora_rank"] == 4


def test_scan_json_is_deterministic(micro_zoo, micro_attacks):
    out, _ = micro_attacks
    runs = []
    for _ in range(2):
        r = CliRunner().invoke(main, ["scan", str(out / "backdoored"), "--reference", str(micro_zoo.reference),
                                      "--format", "json"])
        assert r.exit_code == 1, r.output  # the badnets checkpoint is flagged
        objs = json.loads(r.stdout)
        objs = objs if isinstance(objs, list) else [objs]
        runs.append([{k: v for k, v in o.items() if k != "seconds"} for o in objs])
    assert runs[0] == runs[1]


def _scan_json(*args: str) -> tuple[int, list[dict]]:
    r = CliRunner().invoke(main, ["scan", *args, "--format", "json"])
    assert "Traceback" not in r.output, r.output
    return r.exit_code, json.loads(r.stdout)


def test_scan_flags_the_backdoor_and_clears_the_benign_control(micro_zoo, micro_attacks):
    """With the calibration the zoo build generated for itself (found in the cache by the reference digest)."""
    out, _ = micro_attacks
    code, res = _scan_json(str(out / "backdoored"), str(out / "benign"), "--reference", str(micro_zoo.reference))
    bd, bn = res
    assert bd["verdict"] == "suspicious" and bd["score"] > bd["threshold"] and bd["p_value"] < bd["fpr"], bd
    assert bn["verdict"] == "clean" and bn["score"] < bn["threshold"] and bn["p_value"] >= bn["fpr"], bn
    assert bd["calibration"] and bd["calibration"] == bn["calibration"] and bd["fpr"] == DEFAULT_FPR
    assert code == 1
    code, res = _scan_json(str(out / "benign"), "--reference", str(micro_zoo.reference))
    assert code == 0 and res[0]["verdict"] == "clean"


def test_reference_free_scan_never_says_clean(micro_attacks):
    out, _ = micro_attacks
    code, res = _scan_json(str(out / "benign"))
    assert res[0]["verdict"] == "inconclusive" and "reference" in res[0]["reason"]
    assert code == 5


def test_scan_without_a_calibration_for_the_model_is_inconclusive(micro_zoo, micro_attacks, tmp_path, monkeypatch):
    out, _ = micro_attacks
    monkeypatch.setenv("PROJLENS_CACHE", str(tmp_path))  # an empty cache: no calibration for this reference
    code, res = _scan_json(str(out / "backdoored"), "--reference", str(micro_zoo.reference))
    assert code == 5 and res[0]["verdict"] == "inconclusive" and "calibrate" in res[0]["reason"]
    assert res[0]["score"] is None and res[0]["threshold"] is None


def _evaluate(ckpt: Path, variant: str) -> dict:
    r = CliRunner().invoke(main, ["evaluate", str(ckpt), "--zoo", "micro", "--variant", variant, "--format", "json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


@pytest.mark.parametrize("mode", ["data-free", "few-shot"])
def test_sanitize_removes_the_backdoor_and_keeps_clean_accuracy(micro_zoo, micro_attacks, tmp_path, mode):
    out, recs = micro_attacks
    before = recs["backdoored"]["metrics"]
    assert before["asr"] >= 0.5
    extra = [] if mode == "data-free" else ["--clean-data", str(micro_zoo.train_data), "--n-clean", "64", "--n-eval", "0"]
    r = CliRunner().invoke(main, ["sanitize", str(out / "backdoored"), "--out", str(tmp_path / "s"), *extra,
                                  "--format", "json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)["report"]
    assert rep["rank"] >= 1
    if mode == "few-shot":  # the zoo's self-calibration holds a task subspace: the whole outside part goes, then refit
        assert rep["mode"] == "few-shot" and rep["refit"]["steps"] > 0, rep
        f = rep["refit"]  # refitted 10 epochs at a time until it fits the clean samples within 10x the suspect's loss
        assert f["epochs"] == 10 * len(f["clean_loss_after"]) <= 40, f
        assert all(x > 10 * f["suspect_clean_loss"] for x in f["clean_loss_after"][:-1]), f
        assert f["clean_loss_after"][-1] <= 10 * f["suspect_clean_loss"] or f["epochs"] == 40, f
    after = _evaluate(tmp_path / "s", "badnets")
    assert after["asr"] <= 0.1, (before, after, rep)
    assert after["clean_accuracy"] >= before["clean_accuracy"] - 0.03, (before, after)


def test_sanitize_that_removes_nothing_says_so_and_writes_nothing(micro_zoo, tmp_path):
    """The reference itself has no update: there is nothing to remove, so no 'sanitized' copy is written."""
    r = CliRunner().invoke(main, ["sanitize", str(micro_zoo.reference), "--reference", str(micro_zoo.reference),
                                  "--method", "subspace", "--param", "rank=1", "--out", str(tmp_path / "s")])
    assert r.exit_code == 6, r.output
    assert "nothing removed" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "s").exists()


def test_restore_equals_the_reference_bit_for_bit(micro_zoo, micro_attacks, tmp_path):
    out, _ = micro_attacks
    r = CliRunner().invoke(main, ["sanitize", str(out / "backdoored"), "--method", "restore", "--out", str(tmp_path / "r")])
    assert r.exit_code == 0, r.output
    got, ref = _tensors(tmp_path / "r"), _tensors(micro_zoo.reference)
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


# ---- golden: `scan --format json` / text on the micro zoo, as main printed it before the CLI became a package ----
GOLDEN = Path(__file__).resolve().parent / "data" / "golden_scan_micro.json"


def _normalize(obj, subs: list[tuple[str, str]]):
    """Paths replaced by placeholders, timings dropped (everything else must match)."""
    if isinstance(obj, dict):
        return {k: _normalize(v, subs) for k, v in obj.items() if k != "seconds"}
    if isinstance(obj, list):
        return [_normalize(v, subs) for v in obj]
    if isinstance(obj, str):
        for old, new in subs:
            obj = obj.replace(old, new)
        return obj
    return obj


def _normalize_text(text: str, subs: list[tuple[str, str]]) -> list[str]:
    import re

    text = _normalize(text, subs)
    text = re.sub(r"in \d+\.\d+ s", "in <T> s", text)
    text = re.sub(r"-{3,}", "---", text)  # rule widths follow the (machine-dependent) path column's width
    return [" ".join(line.split()) for line in text.splitlines()]


def _approx_equal(a, b, where: str = "") -> None:
    if isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6), where
    elif isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _approx_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _approx_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _golden_inputs(micro_zoo, out: Path) -> dict:
    """The norm of each scanned projector: the golden's numbers hold only for (nearly) these weights. Training is
    reproducible on one machine up to float noise, not across CPU models (another float summation order trains
    another model)."""
    from safetensors.torch import load_file

    def norm(d: Path) -> float:
        w = load_file(d / "model.safetensors")
        return float(sum(v.double().pow(2).sum() for k, v in w.items() if "multi_modal_projector" in k) ** 0.5)

    return {"backdoored": norm(out / "backdoored"), "benign": norm(out / "benign"), "reference": norm(micro_zoo.reference)}


def _golden_runs(micro_zoo, out: Path) -> dict:
    from projlens_defense.cache import cache_dir

    subs = [(str(out), "<ATTACKS>"), (str(micro_zoo.root), "<ZOO>"), (str(cache_dir()), "<CACHE>")]
    runs: dict = {"inputs": _golden_inputs(micro_zoo, out)}
    for name, args in {
        "reference": [str(out / "backdoored"), str(out / "benign"), "--reference", str(micro_zoo.reference)],
        "reference-free": [str(out / "benign"), str(out / "backdoored")],
    }.items():
        for fmt in ("json", "text"):
            r = CliRunner().invoke(main, ["scan", *args, "--format", fmt])
            assert "Traceback" not in r.output, r.output
            body = _normalize(json.loads(r.stdout), subs) if fmt == "json" else _normalize_text(r.stdout, subs)
            runs[f"{name}/{fmt}"] = {"exit_code": r.exit_code, "output": body}
    return runs


def _shape(obj):
    """The structure of a scan output without its values: dict keys (recursively), the element shape of lists,
    the type of a leaf. What must not change with the machine that trained the checkpoints."""
    if isinstance(obj, dict):
        return {k: _shape(v) for k, v in obj.items() if k not in SHAPE_FREE_KEYS}
    if isinstance(obj, list):
        return [_shape(obj[0])] if obj and not isinstance(obj[0], (str, int, float)) else "list"
    return "number" if isinstance(obj, (int, float)) and not isinstance(obj, bool) else type(obj).__name__


SHAPE_FREE_KEYS = {"evidence", "zscores", "signals", "detectors", "suspected_target_tokens", "signals_used"}
"""Keys whose contents (not presence) follow the data: which evidence and tokens a scan reports differs between
two trained models."""


def _text_labels(lines: list[str]) -> list[str]:
    """The labels of a text report (what precedes the first colon of each labelled line)."""
    return sorted({line.split(":")[0] for line in lines if ":" in line and not line[:1].isdigit()})


def test_scan_output_matches_the_golden(micro_zoo, micro_attacks):
    """The CLI's scan output (JSON and text, exit codes) is what main printed before the refactoring into
    a CLI package (regenerate with PROJLENS_WRITE_GOLDEN=1 only when a change of output is intended).
    Value for value where the scanned projectors are the golden's (norms within 1e-5); elsewhere (a CPU model
    that trains other weights) the structure of the output: keys, types and text labels."""
    import os

    runs = _golden_runs(micro_zoo, micro_attacks[0])
    if os.environ.get("PROJLENS_WRITE_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps(runs, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert runs.keys() == golden.keys()
    same_bytes = runs["inputs"] == pytest.approx(golden["inputs"], rel=1e-5)
    for key in golden:
        if key == "inputs":
            continue
        if not same_bytes:
            got, want = runs[key]["output"], golden[key]["output"]
            if key.endswith("/text"):
                assert _text_labels(got) == _text_labels(want), key
            else:
                assert _shape(got) == _shape(want), key
            continue
        assert runs[key]["exit_code"] == golden[key]["exit_code"], key
        if key.endswith("/text"):  # numbers printed rounded: the lines match exactly
            assert runs[key]["output"] == golden[key]["output"], key
        else:
            _approx_equal(runs[key]["output"], golden[key]["output"], key)


def test_reference_free_scan_uses_the_calibration_of_its_own_model(micro_zoo, micro_attacks, tmp_path, monkeypatch):
    """Without a reference, of the cached calibrations whose shapes and vocabulary match, the scan uses the one whose
    model the suspect's projector lies nearest to, not the most recent: two builds of one architecture share shapes
    (a seed-0 micro benign fine-tune scanned against the seed-2 build's null was flagged, z 9.98 > 2.01). The decoy
    is a newer copy of the zoo's own calibration whose stored benign fine-tune lies far from this model."""
    import os
    import shutil

    from safetensors.torch import load_file, save_file

    from projlens_defense.self_calibration import calibration_path

    out, _ = micro_attacks
    own_src = calibration_path(micro_zoo.reference).parent
    monkeypatch.setenv("PROJLENS_CACHE", str(tmp_path))
    own, decoy = tmp_path / "calibrations" / own_src.name, tmp_path / "calibrations" / "decoy"
    for d in (own, decoy):
        d.mkdir(parents=True)
        shutil.copy(own_src / "calibration.json", d / "calibration.json")
        shutil.copy(own_src / "benign-00.safetensors", d / "benign-00.safetensors")
    save_file({k: v + 1.0 for k, v in load_file(decoy / "benign-00.safetensors").items()},
              str(decoy / "benign-00.safetensors"))
    later = (own / "calibration.json").stat().st_mtime + 60
    os.utime(decoy / "calibration.json", (later, later))
    for ckpt in ("benign", "backdoored"):
        _, res = _scan_json(str(out / ckpt))
        assert Path(res[0]["calibration"]).parent == own, res[0]["calibration"]
    (own / "benign-00.safetensors").unlink()  # nothing to measure the distance by: the most recent one
    _, res = _scan_json(str(out / "benign"))
    assert Path(res[0]["calibration"]).parent == decoy, res[0]["calibration"]
