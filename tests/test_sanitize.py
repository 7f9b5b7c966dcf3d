"""Mitigations and `sanitize`: the pure math on planted updates, the CLI's file-handling contract.

Everything here is fast: tiny real LLaVA saves with hand-made projector updates (no training), or
bare Projector math. The measured numbers on the zoo come from benchmarks/mitigation_table.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from tiny_world import attention_direction, save_with_tokenizer

from projlens_defense.checkpoint import load_projector
from projlens_defense.cli import main
from projlens_defense.detectors.loading import load_checkpoint
from projlens_defense.errors import UsageError
from projlens_defense.mitigations import MITIGATIONS, CleanData
from projlens_defense.mitigations.clp import ClpMitigation
from projlens_defense.mitigations.norm_guard import NormGuardMitigation
from projlens_defense.mitigations.subspace import SubspaceMitigation
from projlens_defense.mitigations.target_direction import TargetDirectionMitigation
from projlens_defense.projector import LinearLayer, Projector, ProjectorModule
from projlens_defense.scan_input import ScanInput

TARGET = 17
PROJ = "multi_modal_projector."


# ---------------------------------------------------------------------------------- synthetic math
def _mlp(seed: int, dims: tuple[int, int, int] = (16, 24, 24)) -> Projector:
    g = torch.Generator().manual_seed(seed)
    a, h, o = dims
    return Projector([LinearLayer(torch.randn(h, a, generator=g) / a**0.5, torch.randn(h, generator=g) * 0.1),
                      LinearLayer(torch.randn(o, h, generator=g) / h**0.5, torch.randn(o, generator=g) * 0.1)])


def _unit(n: int, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, generator=g)
    return x / x.norm()


def _planted(seed: int = 0) -> tuple[Projector, Projector, torch.Tensor, torch.Tensor, torch.Tensor]:
    """reference, suspect = reference + benign random update + planted rank-1 (u, v) on linear_2."""
    ref = _mlp(seed)
    g = torch.Generator().manual_seed(seed + 100)
    w2 = ref.layers[1].weight
    benign = 0.02 * torch.randn(w2.shape, generator=g)
    u, v = _unit(w2.shape[0], g), _unit(w2.shape[1], g)
    planted = 1.0 * torch.outer(u, v)
    sus = ref.with_weights([ref.layers[0].weight + 0.02 * torch.randn(ref.layers[0].weight.shape, generator=g),
                            w2 + benign + planted])
    return ref, sus, benign, u, v


def test_subspace_removes_a_planted_rank1_update_and_keeps_the_benign_one() -> None:
    ref, sus, benign, u, v = _planted()
    res = SubspaceMitigation().apply(sus, ref)  # data-free, no LLM read-out: the top component
    new_update = res.projector.delta(ref)[1]
    planted_left = float(u @ new_update @ v)
    assert abs(planted_left) < 0.02, planted_left  # was 1.0 (+ a tiny benign part)
    benign_kept = float((new_update * benign).sum()) / float(benign.pow(2).sum())
    assert benign_kept > 0.9, benign_kept
    assert res.report["rank"] == 1 and res.report["removed"][0]["energy"] > 0.5
    assert torch.equal(res.projector.layers[0].weight, sus.layers[0].weight)  # linear_1 untouched


def test_subspace_fixed_rank_and_report_serialises() -> None:
    ref, sus, *_ = _planted(1)
    res = SubspaceMitigation(rank=3).apply(sus, ref)
    assert res.report["rank"] == 3
    d = json.loads(json.dumps(res.to_dict()))
    assert d["method"] == "subspace" and d["writable"] and d["report"]["weight_change"][1]["change_rank"] == 3


def test_projector_module_matches_projector_and_round_trips() -> None:
    p = _mlp(3)
    m = ProjectorModule(p)
    x = torch.randn(2, 5, 16)
    assert torch.allclose(m(x), p.forward(x), atol=1e-6)
    back = m.to_projector()
    assert all(torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
               for a, b in zip(p.layers, back.layers, strict=True))


def test_clp_prunes_an_outlier_channel() -> None:
    p = _mlp(4)
    w1 = p.layers[0].weight.clone()
    w1[5] *= 20
    res = ClpMitigation().apply(p.with_weights([w1, p.layers[1].weight]))
    assert res.report["pruned_channels"] == [5]
    assert torch.count_nonzero(res.projector.layers[1].weight[:, 5]) == 0


def test_norm_guard_keeps_clean_inputs_and_clamps_out_of_range_ones() -> None:
    ref, sus, _, u, v = _planted(5)
    feats = torch.randn(8, 6, 16)
    res = NormGuardMitigation().apply(sus, ref, CleanData(None, feats, [""] * 8, [""] * 8))
    assert not res.writable and res.projector is None
    guard = res.as_module()
    with torch.no_grad():
        assert torch.allclose(guard(feats), sus.forward(feats), atol=1e-5)
        big = feats * 10
        assert guard(big).norm() < sus.forward(big).norm()


def test_unknown_parameter_and_missing_inputs_are_usage_errors() -> None:
    ref, sus, *_ = _planted()
    with pytest.raises(UsageError, match="unknown parameter"):
        SubspaceMitigation.from_params({"nope": 1})
    with pytest.raises(UsageError, match="reference"):
        MITIGATIONS["restore"]().apply(sus, None)
    with pytest.raises(UsageError, match="clean samples"):
        MITIGATIONS["finetune"]().apply(sus, ref, None)
    for name in ("few_shot", "outside"):
        with pytest.raises(UsageError, match=f"{name} must be one of"):
            SubspaceMitigation.from_params({name: "everything"}).apply(sus, ref)
    for bad in ({"refit_epochs": 0}, {"refit_epochs": 20, "refit_max_epochs": 10}):  # the refit loop must end
        with pytest.raises(UsageError, match="refit_epochs must be > 0"):
            SubspaceMitigation.from_params(bad).apply(sus, ref)


def test_the_whole_outside_task_update_is_its_components_sum() -> None:
    """`outside=all` and the few-shot refit drop every component of the update outside the task subspace: the
    components taken must add up to that part exactly, and what is left must lie inside the subspace."""
    from projlens_defense.mitigations.subspace import _all_components, outside_task

    g = torch.Generator().manual_seed(3)
    m = torch.randn(24, 16, generator=g)
    left, right = torch.linalg.qr(torch.randn(24, 3, generator=g))[0], torch.linalg.qr(torch.randn(16, 3, generator=g))[0]
    rest = outside_task(m, left, right)
    comps = _all_components(1, rest)
    total = sum(s * torch.outer(u, v) for _, _, s, u, v in comps)
    assert len(comps) == 16 and torch.allclose(total, rest, atol=1e-5)
    kept = m - total
    assert torch.allclose(kept, left @ left.T @ m @ right @ right.T, atol=1e-5)


def test_registry_names_are_the_cli_names() -> None:
    assert set(MITIGATIONS) >= {"subspace", "target-direction", "norm-guard", "restore", "finetune", "fine-prune",
                                "clp", "orthogonal"}
    assert all(cls.name == name for name, cls in MITIGATIONS.items())


# ------------------------------------------------------------------------------ tiny real checkpoints
@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, tiny_llava_factory) -> dict[str, Path]:
    """A tiny LLaVA reference and a suspect whose linear_2 update has a rank-1 piece toward TARGET."""
    root = tmp_path_factory.mktemp("sanitize")
    model = tiny_llava_factory(0)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # a well-conditioned OV map, as in test_scan
        lm = model.model.language_model
        for layer in lm.layers:
            for lin in (layer.self_attn.v_proj, layer.self_attn.o_proj):
                lin.weight.copy_(torch.linalg.qr(torch.randn(lin.weight.shape, generator=g))[0])
            layer.input_layernorm.weight.fill_(1.0)
        lm.norm.weight.fill_(1.0)
    out = {"reference": save_with_tokenizer(model, root / "reference")}
    proj = model.model.multi_modal_projector
    with torch.no_grad():
        w2 = proj.linear_2.weight
        n2 = float(w2.norm())
        proj.linear_1.weight += 0.01 * torch.randn(proj.linear_1.weight.shape, generator=g)
        w2 += 0.01 * torch.randn(w2.shape, generator=g)
        w2 += 1.5 * n2 * torch.outer(attention_direction(model, TARGET), _unit(w2.shape[1], g))
    out["suspect"] = save_with_tokenizer(model, root / "suspect")
    (out["suspect"] / "attack.json").write_text(json.dumps({"base_model": str(out["reference"])}))
    return out


def _lens(world: dict[str, Path]) -> ScanInput:
    ck = load_checkpoint(world["suspect"])
    return ScanInput(projector=ck.projector, reference=load_projector(world["reference"]), readout=ck.readout,
                     ov_layers=ck.ov_layers, final_norm=ck.final_norm, vocab=ck.vocab)


def test_data_free_subspace_selects_the_lens_aligned_component(world: dict[str, Path]) -> None:
    ref, sus = load_projector(world["reference"]), load_projector(world["suspect"])
    res = SubspaceMitigation(lens=_lens(world)).apply(sus, ref)
    assert res.report["selection"] == "logit lens"
    assert [c["component"] for c in res.report["removed"]] == [0]
    assert res.report["components"][0]["token"] == f"tok{TARGET}"
    assert res.report["energy_removed"][f"{PROJ}linear_2"] > 0.9


def test_target_direction_from_the_lens_removes_the_target_shift(world: dict[str, Path]) -> None:
    ref, sus = load_projector(world["reference"]), load_projector(world["suspect"])
    lens = _lens(world)
    res = TargetDirectionMitigation(lens=lens).apply(sus, ref)
    assert res.report["target_tokens"] == [f"tok{TARGET}"]
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(world["reference"])
    t = attention_direction(model, TARGET)
    before = float((t @ sus.delta(ref)[1]).norm())
    after = float((t @ res.projector.delta(ref)[1]).norm())
    assert after < 0.2 * before, (before, after)


def _tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _invoke(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(main, ["sanitize", *args])
    assert "Traceback" not in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    return res.exit_code, res.output


def test_sanitize_hf_checkpoint_changes_only_the_projector(world: dict[str, Path], tmp_path: Path, digest) -> None:
    from transformers import LlavaForConditionalGeneration

    before = digest(world["suspect"])
    out = tmp_path / "clean"
    code, text = _invoke(str(world["suspect"]), "--out", str(out), "--format", "json")  # reference from attack.json
    assert code == 0, text
    rec = json.loads(text)
    assert rec["method"] == "subspace" and rec["reference"] == str(world["reference"])
    assert rec["report"]["rank"] == 1
    assert digest(world["suspect"]) == before  # the input's bytes are unchanged
    LlavaForConditionalGeneration.from_pretrained(out)  # plain HF loading
    a, b = _tensors(world["suspect"]), _tensors(out)
    assert a.keys() == b.keys()
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed == {f"{PROJ}linear_2.weight"}
    assert set(os.listdir(out)) == set(os.listdir(world["suspect"]))


def test_sanitize_refuses_an_existing_output_without_force(world: dict[str, Path], tmp_path: Path, digest) -> None:
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, text = _invoke(str(world["suspect"]), "--out", str(out))
    assert code == 4 and "already exists" in text
    assert (out / "keep.txt").read_text() == "mine"
    code, text = _invoke(str(world["suspect"]), "--out", str(out), "--force", "--method", "restore")
    assert code == 0, text
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_interrupted_write_leaves_no_partial_output(world: dict[str, Path], tmp_path: Path, monkeypatch) -> None:
    import projlens_defense.checkpoint.writer as writer

    real = writer._patch_safetensors

    def crash(src: Path, dst: Path, new: dict, *rest) -> None:
        real(src, dst, new, *rest)  # the file is half-way into the temp dir when the crash comes
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer, "_patch_safetensors", crash)
    out = tmp_path / "partial"
    code, text = _invoke(str(world["suspect"]), "--out", str(out))
    assert code == 2 and "No space left" in text
    assert not out.exists()
    assert os.listdir(tmp_path) == []  # no temporary sibling left behind either


def test_sanitize_usage_errors(world: dict[str, Path], tmp_path: Path) -> None:
    ref_only = tmp_path / "bare"
    ref_only.mkdir()
    for f in os.listdir(world["suspect"]):
        if f != "attack.json":
            (ref_only / f).write_bytes((world["suspect"] / f).read_bytes())
    code, text = _invoke(str(ref_only), "--out", str(tmp_path / "o1"))
    assert code == 4 and "--reference" in text
    code, text = _invoke(str(world["suspect"]), "--method", "norm-guard", "--out", str(tmp_path / "o2"))
    assert code == 4 and "run-time" in text
    code, text = _invoke(str(world["suspect"]), "--method", "nope", "--out", str(tmp_path / "o3"))
    assert code == 4 and "unknown method" in text
    code, text = _invoke(str(world["suspect"]), "--method", "finetune", "--out", str(tmp_path / "o4"))
    assert code == 4 and "--clean-data" in text
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))


def test_sanitize_mm_projector_bin_stays_a_loadable_pickle(make_mm_projector, tmp_path: Path, digest) -> None:
    src, module = make_mm_projector(seed=0)
    ref, _ = make_mm_projector(seed=1)
    before = digest(src)
    out = tmp_path / "fixed" / "mm_projector.bin"
    out.parent.mkdir()
    code, text = _invoke(str(src), "--reference", str(ref), "--method", "subspace", "--param", "rank=2",
                         "--out", str(out))
    assert code == 0, text
    assert digest(src) == before
    sd = torch.load(out, weights_only=True)
    orig = torch.load(src, weights_only=True)
    assert list(sd) == list(orig)
    assert torch.equal(sd["model.mm_projector.0.weight"], orig["model.mm_projector.0.weight"])
    assert not torch.equal(sd["model.mm_projector.2.weight"], orig["model.mm_projector.2.weight"])
