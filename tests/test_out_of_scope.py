"""Backdoors outside the projector (LLM LoRA, the vision tower) and the projector poisoned together with LLM LoRA,
trained for real on the micro zoo: what each fine-tune changes, and what the scan says about it."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

import projlens_defense as pld
from projlens_defense.attacks.finetune import AttackConfig, run_attack


def _changed(a, b) -> dict[str, int]:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    out = {"projector": 0, "vision": 0, "language": 0}
    for k, v in wa.items():
        part = "projector" if "multi_modal_projector" in k else "vision" if "vision_tower" in k else "language"
        out[part] += int(not bool((v == wb[k]).all()))
    return out


@pytest.fixture(scope="module")
def placed(micro_zoo, tmp_path_factory):
    out = tmp_path_factory.mktemp("placed")
    for variant in ("llm-lora-only", "vision-tower-only", "projector-and-llm-lora"):
        run_attack(AttackConfig(variant=variant, poison_rate=0.2, seed=0, epochs=2.0), micro_zoo.reference,
                   micro_zoo.train_data, None, out / variant, progress=False)
    return out


def test_each_placement_changes_only_its_parts(micro_zoo, placed):
    ref = micro_zoo.reference
    lora = _changed(placed / "llm-lora-only", ref)
    assert lora["projector"] == 0 and lora["vision"] == 0 and lora["language"] > 0
    tower = _changed(placed / "vision-tower-only", ref)
    assert tower["projector"] == 0 and tower["language"] == 0 and tower["vision"] > 0
    both = _changed(placed / "projector-and-llm-lora", ref)
    assert both["projector"] > 0 and both["language"] > 0 and both["vision"] == 0
    record = json.loads((placed / "llm-lora-only" / "attack.json").read_text())
    assert record["trained_parts"] == ["llm-lora"] and record["variant_params"]["parts"] == ["llm-lora"]


def test_the_scan_does_not_blame_the_projector_and_says_what_changed_elsewhere(micro_zoo, placed):
    lora, tower, both = pld.scan([placed / "llm-lora-only", placed / "vision-tower-only",
                                  placed / "projector-and-llm-lora"], reference=micro_zoo.reference)
    # the projector is the reference's, so it is clean; the checkpoint is not cleared: its other parts changed
    assert lora.projector_verdict == "clean" and tower.projector_verdict == "clean"
    assert lora.verdict == "inconclusive" and tower.verdict == "inconclusive"
    assert "language model tensor(s) differ" in lora.reason
    assert "vision tower tensor(s) differ" in tower.reason
    assert both.verdict in ("suspicious", "inconclusive")  # never clean: its LLM changed too
    assert lora.scope["changed"]["language model"] > 0 and lora.scope["changed"]["vision tower"] == 0
    assert tower.scope["changed"]["vision tower"] > 0 and tower.scope["changed"]["language model"] == 0
    assert any("language model tensor(s) differ from the reference" in w for w in lora.warnings)
    assert any("vision tower tensor(s) differ from the reference" in w for w in tower.warnings)
    assert both.scope["changed"]["language model"] > 0


def test_sanitize_says_it_repairs_the_projector_only(micro_zoo, placed, tmp_path):
    """A repair of projector+LLM LoRA cannot reach the LLM half: it says so (in its warnings, or in the
    nothing-removed error when the projector half is not found)."""
    try:
        said = " ".join(pld.sanitize(placed / "projector-and-llm-lora", tmp_path / "out").warnings)
    except pld.NothingRemovedError as e:
        said = str(e)
    assert "language model tensor(s) differ from the reference: outside the projector, not repaired" in said


def test_adaptive_attacks_refuse_other_placements_and_lora(micro_zoo, tmp_path):
    with pytest.raises(pld.UsageError, match="adaptive attacks"):
        run_attack(AttackConfig(variant="adaptive-spread", lora_rank=4, epochs=1.0), micro_zoo.reference,
                   micro_zoo.train_data, None, tmp_path / "x", progress=False)
