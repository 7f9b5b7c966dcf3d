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

PROJ = "multi_modal_projector."


def _tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="session")
def micro_attacks(micro_zoo, tmp_path_factory):
    out = tmp_path_factory.mktemp("attacks")
    recs = {}
    for name, cfg in {
        "backdoored": AttackConfig(variant="badnets", poison_rate=0.2, seed=0),
        "benign": AttackConfig(variant=None, seed=0, eval_variant="badnets"),
    }.items():
        recs[name] = run_attack(cfg, micro_zoo.reference, micro_zoo.train_data, micro_zoo.test_data, out / name,
                                progress=False)
    return out, recs


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


def test_attack_is_deterministic_for_a_seed(micro_zoo, micro_attacks, tmp_path):
    out, _ = micro_attacks
    run_attack(AttackConfig(variant="badnets", poison_rate=0.2, seed=0), micro_zoo.reference,
               micro_zoo.train_data, None, tmp_path / "again", progress=False)
    a, b = _tensors(out / "backdoored"), _tensors(tmp_path / "again")
    assert all(torch.equal(a[k], b[k]) for k in a)


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


def test_lora_attack_merges_into_plain_projector(micro_zoo, tmp_path):
    rec = run_attack(AttackConfig(variant="badnets", poison_rate=0.2, seed=0, lora_rank=4, epochs=2),
                     micro_zoo.reference, micro_zoo.train_data, None, tmp_path / "lora", progress=False)
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
        assert r.exit_code in (0, 1), r.output
        objs = json.loads(r.stdout)
        objs = objs if isinstance(objs, list) else [objs]
        runs.append([{k: v for k, v in o.items() if k != "seconds"} for o in objs])
    assert runs[0] == runs[1]
