"""Projector view: forward matches the real HF modules, dims, delta, with_weights, state_dict, validate."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from projlens_defense.checkpoint import load_projector
from projlens_defense.errors import CheckpointError
from projlens_defense.projector import LinearLayer, Projector

VISION_DIM, TEXT_DIM = 16, 24  # tiny dims used by the conftest builders


def _from_sequential(seq: nn.Sequential) -> Projector:
    lins = [m for m in seq if isinstance(m, nn.Linear)]
    return Projector(
        layers=[LinearLayer(m.weight.detach().clone(), m.bias.detach().clone()) for m in lins],
        activation="gelu",
        keys=[(f"{i * 2}.weight", f"{i * 2}.bias") for i in range(len(lins))],
        dtypes=[(torch.float32, torch.float32)] * len(lins),
    )


def test_forward_matches_llava_multimodal_projector(make_hf_llava):
    d, model = make_hf_llava()
    proj = load_projector(d)
    x = torch.randn(3, 5, VISION_DIM) * 4
    with torch.no_grad():
        ref = model.model.multi_modal_projector(x)
    out = proj.forward(x)
    assert out.shape == (3, 5, TEXT_DIM)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert (proj.in_dim, proj.hidden_dim, proj.out_dim, proj.num_layers) == (
        VISION_DIM,
        TEXT_DIM,
        TEXT_DIM,
        2,
    )
    assert proj.activation == "gelu" and proj.format == "hf-llava"


@pytest.mark.parametrize("act", ["gelu_pytorch_tanh", "quick_gelu", "relu"])
def test_forward_follows_projector_hidden_act(make_hf_llava, act):
    d, model = make_hf_llava(projector_hidden_act=act)
    proj = load_projector(d)
    assert proj.activation == act
    x = torch.randn(7, VISION_DIM) * 3
    with torch.no_grad():
        ref = model.model.multi_modal_projector(x)
    torch.testing.assert_close(proj(x), ref, atol=1e-5, rtol=0)


def test_forward_without_bias(make_hf_llava):
    d, model = make_hf_llava(multimodal_projector_bias=False)
    proj = load_projector(d)
    assert all(layer.bias is None for layer in proj.layers)
    assert proj.keys == [
        ("multi_modal_projector.linear_1.weight", None),
        ("multi_modal_projector.linear_2.weight", None),
    ]
    x = torch.randn(4, VISION_DIM)
    with torch.no_grad():
        torch.testing.assert_close(proj(x), model.model.multi_modal_projector(x), atol=1e-5, rtol=0)


def test_forward_matches_sequential(make_mm_projector):
    path, seq = make_mm_projector()
    proj = load_projector(path)
    x = torch.randn(2, 9, VISION_DIM) * 5
    with torch.no_grad():
        torch.testing.assert_close(proj(x), seq(x), atol=1e-5, rtol=0)
    for layer, lin in zip(proj.layers, [seq[0], seq[2]], strict=True):
        assert torch.equal(layer.weight, lin.weight) and torch.equal(layer.bias, lin.bias)


def test_single_linear_has_no_activation(make_mm_projector):
    path, lin = make_mm_projector(kind="linear")
    proj = load_projector(path)
    assert proj.num_layers == 1 and proj.activation == "none"
    assert (proj.in_dim, proj.hidden_dim, proj.out_dim) == (VISION_DIM, TEXT_DIM, TEXT_DIM)
    x = torch.randn(6, VISION_DIM)
    with torch.no_grad():
        torch.testing.assert_close(proj(x), lin(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("rms", [False, True], ids=["qwen2-vl-layernorm", "qwen2.5-vl-rmsnorm"])
def test_forward_matches_patch_merger(make_merger, rms):
    path, merger = make_merger(rms=rms)
    proj = load_projector(path)
    assert proj.merge_size == 2 and proj.pre_norm_type == ("rmsnorm" if rms else "layernorm")
    assert (proj.in_dim, proj.hidden_dim, proj.out_dim) == (VISION_DIM, 4 * VISION_DIM, TEXT_DIM)
    x = torch.randn(12, VISION_DIM) * 3 + 1
    with torch.no_grad():
        ref = merger(x)
    out = proj(x)
    assert out.shape == (3, TEXT_DIM)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_forward_rejects_wrong_width(make_mm_projector):
    proj = load_projector(make_mm_projector()[0])
    with pytest.raises(ValueError, match="width 16"):
        proj(torch.zeros(2, VISION_DIM + 1))


def test_delta_is_weight_difference(make_hf_llava):
    (d0, m0), (d1, m1) = make_hf_llava(seed=0), make_hf_llava(seed=1)
    ref, sus = load_projector(d0), load_projector(d1)
    dws = sus.delta(ref)
    assert [tuple(dw.shape) for dw in dws] == [(TEXT_DIM, VISION_DIM), (TEXT_DIM, TEXT_DIM)]
    for dw, name in zip(dws, ["linear_1", "linear_2"], strict=True):
        w0 = getattr(m0.model.multi_modal_projector, name).weight
        w1 = getattr(m1.model.multi_modal_projector, name).weight
        torch.testing.assert_close(dw, (w1 - w0).detach(), atol=0, rtol=0)
    assert all(float(dw.abs().sum()) == 0 for dw in ref.delta(ref))


def test_delta_shape_mismatch_names_layer(make_hf_llava, make_mm_projector):
    llava = load_projector(make_hf_llava()[0])
    single = load_projector(make_mm_projector(kind="linear")[0])
    with pytest.raises(CheckpointError, match="1 layers vs 2"):
        single.delta(llava)
    other = llava.with_weights([llava.layers[0].weight, llava.layers[1].weight])
    other.layers[1] = LinearLayer(torch.zeros(TEXT_DIM, 8), None)
    with pytest.raises(CheckpointError, match=r"linear_2 has shape \(24, 8\), reference has \(24, 24\)"):
        other.delta(llava)


def test_with_weights_returns_new_projector_same_keys(make_hf_llava):
    d, _ = make_hf_llava(dtype=torch.bfloat16)
    proj = load_projector(d)
    assert proj.dtypes[0] == (torch.bfloat16, torch.bfloat16)
    assert all(layer.weight.dtype == torch.float32 for layer in proj.layers)
    new_w = [torch.zeros_like(layer.weight) for layer in proj.layers]
    new = proj.with_weights(new_w)
    assert new is not proj and new.keys == proj.keys and new.format == proj.format
    assert float(proj.layers[0].weight.abs().sum()) > 0  # original untouched
    torch.testing.assert_close(new.layers[1].bias, proj.layers[1].bias)
    sd = new.state_dict()
    assert set(sd) == {f"multi_modal_projector.linear_{i}.{p}" for i in (1, 2) for p in ("weight", "bias")}
    assert all(t.dtype == torch.bfloat16 for t in sd.values())
    assert float(sd["multi_modal_projector.linear_1.weight"].abs().sum()) == 0
    with pytest.raises(ValueError, match="shape"):
        proj.with_weights([torch.zeros(3, 3), new_w[1]])
    with pytest.raises(ValueError, match="add or drop a bias"):
        proj.with_weights(new_w, [None, None])


def test_state_dict_round_trips_original_dtype_bits(make_mm_projector):
    path, seq = make_mm_projector(dtype=torch.float16)
    proj = load_projector(path)
    sd = proj.state_dict()
    original = torch.load(path, weights_only=True)
    assert list(sd) == [k for k in original]  # same keys, same order
    for k, t in original.items():
        assert sd[k].dtype == torch.float16 and torch.equal(sd[k], t)


def test_merger_state_dict_includes_norm(make_merger):
    path, merger = make_merger()
    sd = load_projector(path).state_dict()
    assert set(sd) == {"visual.merger." + k for k in merger.state_dict()}
    for k, t in merger.state_dict().items():
        assert torch.equal(sd["visual.merger." + k], t)


def test_validate_rejects_nan_naming_layer():
    proj = _from_sequential(nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 3)))
    proj.validate()
    proj.layers[1].weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match=r"^2: weight has 1 NaN/inf"):
        proj.validate()
    proj.layers[1].weight[0, 0] = 0.0
    proj.layers[0].bias[2] = float("inf")
    with pytest.raises(CheckpointError, match=r"^0: bias has 1 NaN/inf"):
        proj.validate()


def test_validate_rejects_shapes_that_do_not_chain():
    proj = Projector(layers=[LinearLayer(torch.zeros(6, 4), None), LinearLayer(torch.zeros(3, 5), None)])
    with pytest.raises(CheckpointError, match="layer 0 outputs 6 features but layer 1 expects 5"):
        proj.validate()
    bad_bias = Projector(layers=[LinearLayer(torch.zeros(6, 4), torch.zeros(5))])
    with pytest.raises(CheckpointError, match=r"bias shape \(5,\)"):
        bad_bias.validate()
    with pytest.raises(CheckpointError, match="unsupported projector activation"):
        Projector(layers=[LinearLayer(torch.zeros(6, 4), None)], activation="tanhh").validate()


def test_state_dict_requires_keys():
    with pytest.raises(ValueError, match="no checkpoint key names"):
        Projector(layers=[LinearLayer(torch.zeros(2, 2), None)]).state_dict()


def test_merger_forward_needs_whole_groups(make_merger):
    proj = load_projector(make_merger()[0])
    with pytest.raises(ValueError, match="multiple of 4"):
        proj(torch.zeros(6, VISION_DIM))
    out = proj(torch.randn(8, VISION_DIM, dtype=torch.float64))
    assert out.dtype == torch.float64 and out.shape == (2, TEXT_DIM)
