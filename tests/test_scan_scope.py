"""The scan says what it did not examine: the tensors outside the projector, and which of them differ from the
reference (a vision-tower or LLM backdoor is outside a projector scan's scope)."""

from __future__ import annotations

import json

import torch
from click.testing import CliRunner

import projlens_defense as pld
from projlens_defense.cli import main


def _fine_tuned(make_hf_llava, tmp_path, *, tower: bool, llm: bool):
    ref, model = make_hf_llava(seed=0)
    params = dict(model.named_parameters())

    def first(part: str, name: str) -> torch.nn.Parameter:
        return next(p for k, p in params.items() if part in k and k.endswith(name))

    with torch.no_grad():
        first("multi_modal_projector", "linear_2.weight").add_(0.05)
        if tower:
            first("vision_tower", "fc1.weight").add_(0.01)
        if llm:
            first("language_model", "up_proj.weight").add_(0.01)
            first("language_model", "down_proj.weight").add_(0.01)
    out = tmp_path / f"suspect-{int(tower)}{int(llm)}"
    model.save_pretrained(out)
    return ref, out


def test_scan_counts_the_changed_tensors_outside_the_projector(make_hf_llava, tmp_path):
    ref, tower_changed = _fine_tuned(make_hf_llava, tmp_path, tower=True, llm=False)
    _, llm_changed = _fine_tuned(make_hf_llava, tmp_path, tower=False, llm=True)
    _, projector_only = _fine_tuned(make_hf_llava, tmp_path, tower=False, llm=False)
    a, b, c = pld.scan([tower_changed, llm_changed, projector_only], reference=ref)
    assert a.scope["changed"] == {"vision tower": 1, "language model": 0}
    assert b.scope["changed"] == {"vision tower": 0, "language model": 2}
    assert c.scope["changed"] == {"vision tower": 0, "language model": 0}
    assert a.scope["examined"] == 4 and a.scope["outside"]["vision tower"] > 0 and a.scope["outside"]["language model"] > 0
    assert any("1 vision tower tensor(s) differ from the reference" in w for w in a.warnings)
    assert any("2 language model tensor(s) differ" in w for w in b.warnings)
    assert not any("differ from the reference" in w for w in c.warnings)


def test_without_a_reference_the_scope_says_nothing_was_compared(make_hf_llava, tmp_path):
    _, suspect = _fine_tuned(make_hf_llava, tmp_path, tower=True, llm=False)
    [r] = pld.scan([suspect])
    assert r.scope["changed"] is None and r.scope["note"] == "not compared (no reference)"
    out = CliRunner().invoke(main, ["scan", str(suspect)])
    assert "scope: projector examined (4 tensors); not examined: language model (" in out.stdout
    assert "not compared (no reference)" in out.stdout
    js = json.loads(CliRunner().invoke(main, ["scan", str(suspect), "--format", "json"]).stdout)
    assert js[0]["scope"]["outside"] == r.scope["outside"]


def test_a_projector_only_file_has_nothing_outside(make_mm_projector):
    path, _ = make_mm_projector()
    [r] = pld.scan([path])
    assert r.scope is not None and r.scope["outside"] == {} and r.scope["note"] is None


def test_a_projector_only_file_against_a_full_reference_is_not_counted_as_changed(make_hf_llava, tmp_path):
    """LLaVA's own `mm_projector` file holds the projector only: its model's other parts are absent, not changed,
    so they neither warn nor keep a clean projector from a clean verdict."""
    from safetensors.torch import save_file

    ref, model = make_hf_llava(seed=0)
    proj = next(m for k, m in model.named_modules() if k.endswith("multi_modal_projector"))
    sd = {f"model.mm_projector.{i}.{p}": getattr(getattr(proj, name), p).detach().clone()
          for i, name in ((0, "linear_1"), (2, "linear_2")) for p in ("weight", "bias")}
    sd["model.mm_projector.2.weight"] += 0.05
    d = tmp_path / "mm"
    d.mkdir()
    save_file(sd, d / "mm_projector.safetensors", metadata={"format": "pt"})
    [r] = pld.scan([d / "mm_projector.safetensors"], reference=ref)
    assert r.verdict != "error", r.errors
    assert r.scope["changed"] is None and r.scope["note"] == "not compared (the checkpoint holds the projector only)"
    assert not any("differ from the reference" in w for w in r.warnings)
    assert r.projector_verdict == r.verdict
