"""Format detection and readers on real saves of every layout, and refusal of hostile/broken inputs."""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from projlens_defense.checkpoint import (
    detect_format,
    load_lm_readout,
    load_projector,
    load_tokenizer_vocab,
    parse_header,
)
from projlens_defense.errors import CheckpointError, NothingScannableError, ProjlensError, UsageError

VISION_DIM, TEXT_DIM, VOCAB = 16, 24, 50  # tiny dims used by the conftest builders
PROJ_BYTES = 4 * (TEXT_DIM * VISION_DIM + TEXT_DIM + TEXT_DIM * TEXT_DIM + TEXT_DIM)


def _weights_equal(proj, linears) -> None:
    assert proj.num_layers == len(linears)
    for layer, lin in zip(proj.layers, linears, strict=True):
        assert torch.equal(layer.weight, lin.weight.detach().float())
        assert torch.equal(layer.bias, lin.bias.detach().float())


def _one_line_error(excinfo, path: Path) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and str(path) in msg, msg
    return msg


# ------------------------------------------------------------------------------------------ HF LLaVA
def test_hf_llava_single_file(make_hf_llava):
    d, model = make_hf_llava()
    info = detect_format(d)
    assert (info.format, info.container, info.prefix) == ("hf-llava", "safetensors", "multi_modal_projector.")
    assert info.files == [d / "model.safetensors"] and info.root == d
    assert info.layer_names == ["linear_1", "linear_2"]
    proj = load_projector(info)
    mmp = model.model.multi_modal_projector
    _weights_equal(proj, [mmp.linear_1, mmp.linear_2])
    assert proj.keys[0] == ("multi_modal_projector.linear_1.weight", "multi_modal_projector.linear_1.bias")
    # lazy: only the projector's bytes were read, a small part of the file
    assert info.bytes_read == PROJ_BYTES
    assert info.bytes_read < (d / "model.safetensors").stat().st_size / 4


def test_hf_llava_new_prefix(make_hf_llava):
    d, model = make_hf_llava(new_prefix=True)
    info = detect_format(d)
    assert info.prefix == "model.multi_modal_projector."
    proj = load_projector(d)
    x = torch.randn(5, VISION_DIM)
    with torch.no_grad():
        torch.testing.assert_close(proj(x), model.model.multi_modal_projector(x), atol=1e-5, rtol=0)
    lm = load_lm_readout(d)
    assert lm.embed_key == "model.language_model.embed_tokens.weight" and lm.lm_head_key == "lm_head.weight"
    assert torch.equal(lm.embed_tokens, model.model.language_model.embed_tokens.weight.detach())


def test_hf_llava_sharded(make_hf_llava):
    d, model = make_hf_llava(sharded=True)
    shards = sorted(d.glob("model-*.safetensors"))
    assert len(shards) >= 2
    info = detect_format(d)
    assert info.container == "sharded-safetensors" and info.format == "hf-llava"
    index = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    assert info.files == sorted({d / index[f"multi_modal_projector.linear_{i}.weight"] for i in (1, 2)})
    proj = load_projector(info)
    mmp = model.model.multi_modal_projector
    _weights_equal(proj, [mmp.linear_1, mmp.linear_2])
    assert info.bytes_read == PROJ_BYTES
    lm = load_lm_readout(d)
    assert torch.equal(lm.embed_tokens, model.model.language_model.embed_tokens.weight.detach())
    assert torch.equal(lm.lm_head, model.lm_head.weight.detach())
    assert lm.embed_tokens.shape == (VOCAB, TEXT_DIM) and not lm.tied


def test_llava_next_dir(make_hf_llava):
    d, model = make_hf_llava(next_=True)
    assert detect_format(d).format == "hf-llava"
    proj = load_projector(d)
    x = torch.randn(2, 4, VISION_DIM)
    with torch.no_grad():
        torch.testing.assert_close(proj(x), model.model.multi_modal_projector(x), atol=1e-5, rtol=0)


def test_hf_model_file_passed_directly(make_hf_llava):
    d, model = make_hf_llava()
    info = detect_format(d / "model.safetensors")
    assert info.format == "hf-llava" and info.root is None
    mmp = model.model.multi_modal_projector
    _weights_equal(load_projector(info), [mmp.linear_1, mmp.linear_2])
    assert torch.equal(load_lm_readout(d / "model.safetensors").lm_head, model.lm_head.weight.detach())


def test_hf_cache_snapshot_symlinks_are_followed(make_hf_llava, tmp_path):
    d, model = make_hf_llava()
    repo = tmp_path / "models--x--tiny"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    for f in d.iterdir():
        blob = repo / "blobs" / f"sha-{f.name}"
        blob.write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    proj = load_projector(snap)
    _weights_equal(
        proj, [model.model.multi_modal_projector.linear_1, model.model.multi_modal_projector.linear_2]
    )


# ---------------------------------------------------------------------------------- LM read-out
def test_lm_readout_old_keys_and_tied_embeddings(make_hf_llava):
    d, model = make_hf_llava()
    lm = load_lm_readout(d)
    assert lm.embed_key == "language_model.model.embed_tokens.weight"
    assert lm.lm_head_key == "language_model.lm_head.weight"
    assert torch.equal(lm.lm_head, model.lm_head.weight.detach())
    # drop lm_head, declare tied embeddings: the embedding serves as head
    tensors = load_file(d / "model.safetensors")
    del tensors["language_model.lm_head.weight"]
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    lm = load_lm_readout(d)
    assert lm.lm_head is None and lm.embed_tokens is not None
    cfg = json.loads((d / "config.json").read_text())
    cfg["text_config"]["tie_word_embeddings"] = True
    (d / "config.json").write_text(json.dumps(cfg))
    lm = load_lm_readout(d)
    assert lm.tied and lm.lm_head is lm.embed_tokens


def test_lm_readout_absent_for_projector_only(make_mm_projector):
    path, _ = make_mm_projector()
    lm = load_lm_readout(path.parent)
    assert lm.embed_tokens is None and lm.lm_head is None


# -------------------------------------------------------------------------------- original LLaVA
@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
@pytest.mark.parametrize("prefix", ["model.mm_projector.", "mm_projector."])
def test_llava_mm_projector(make_mm_projector, fmt, prefix):
    path, seq = make_mm_projector(fmt=fmt, prefix=prefix, with_config=True)
    for target in (path, path.parent):
        info = detect_format(target)
        assert (info.format, info.prefix, info.layer_names) == ("llava-mm-projector", prefix, ["0", "2"])
        assert info.container == ("pickle" if fmt == "bin" else "safetensors")
        proj = load_projector(info)
        _weights_equal(proj, [seq[0], seq[2]])
        assert proj.format == "llava-mm-projector" and proj.activation == "gelu"


def test_llava_single_linear_mm_projector(make_mm_projector):
    path, lin = make_mm_projector(kind="linear", with_config=True)
    info = detect_format(path)
    assert info.layer_names == [""]
    proj = load_projector(info)
    _weights_equal(proj, [lin])
    assert proj.keys == [("model.mm_projector.weight", "model.mm_projector.bias")]


def test_mm_projector_type_mismatch(make_mm_projector):
    path, _ = make_mm_projector(with_config=True)
    (path.parent / "config.json").write_text(json.dumps({"mm_projector_type": "mlp3x_gelu"}))
    with pytest.raises(CheckpointError, match="mlp3x_gelu.*3 Linear layers.*has 2") as e:
        load_projector(path.parent)
    _one_line_error(e, path.parent)


# ------------------------------------------------------------------------------------- Qwen2-VL
@pytest.mark.parametrize("prefix", ["visual.merger.", "model.visual.merger."])
def test_qwen2_vl_merger_file(make_merger, prefix):
    path, merger = make_merger(prefix=prefix)
    info = detect_format(path)
    assert (info.format, info.prefix, info.norm_name) == ("qwen2-vl-merger", prefix, "ln_q")
    assert info.layer_names == ["mlp.0", "mlp.2"]
    proj = load_projector(info)
    _weights_equal(proj, [merger.mlp[0], merger.mlp[2]])
    assert torch.equal(proj.pre_norm[0], merger.ln_q.weight.detach())


def test_qwen2_vl_hf_dir(make_qwen2_vl):
    d, model = make_qwen2_vl()
    info = detect_format(d)
    assert info.format == "qwen2-vl-merger" and info.prefix == "visual.merger."
    proj = load_projector(info)
    merger = model.model.visual.merger
    x = torch.randn(8, VISION_DIM)
    with torch.no_grad():
        torch.testing.assert_close(proj(x), merger(x), atol=1e-5, rtol=0)
    lm = load_lm_readout(d)
    assert lm.embed_key == "model.embed_tokens.weight" and lm.embed_tokens.shape == (VOCAB, TEXT_DIM)


def test_qwen2_vl_merge_size_must_match_config(make_qwen2_vl):
    d, _ = make_qwen2_vl()
    cfg = json.loads((d / "config.json").read_text())
    cfg["vision_config"]["spatial_merge_size"] = 4
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="spatial_merge_size 4 but the weights imply 2"):
        load_projector(d)


# ---------------------------------------------------------------------------------------- bare
@pytest.mark.parametrize("style", ["linear_n", "sequential"])
@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".bin"])
def test_bare_projector(tmp_path, style, suffix):
    torch.manual_seed(3)
    seq = torch.nn.Sequential(
        torch.nn.Linear(VISION_DIM, TEXT_DIM), torch.nn.GELU(), torch.nn.Linear(TEXT_DIM, 8)
    )
    sd = seq.state_dict()
    if style == "linear_n":
        sd = {k.replace("0.", "linear_1.").replace("2.", "linear_2."): v for k, v in sd.items()}
    path = tmp_path / f"proj{suffix}"
    if suffix == ".safetensors":
        save_file(sd, path)
    else:
        torch.save(sd, path)
    info = detect_format(path)
    assert info.format == "bare-projector" and info.prefix == ""
    proj = load_projector(info)
    assert (proj.in_dim, proj.hidden_dim, proj.out_dim) == (VISION_DIM, TEXT_DIM, 8)
    x = torch.randn(3, VISION_DIM)
    with torch.no_grad():
        torch.testing.assert_close(proj(x), seq(x), atol=1e-5, rtol=0)


def test_bare_pickle_nested_state_dict(tmp_path):
    lin = torch.nn.Linear(4, 3)
    path = tmp_path / "p.pt"
    torch.save({"state_dict": {"0.weight": lin.weight.data, "0.bias": lin.bias.data}, "epoch": 3}, path)
    proj = load_projector(path)
    assert proj.num_layers == 1 and torch.equal(proj.layers[0].weight, lin.weight.data)


# -------------------------------------------------------------------------------------- tokenizer
def test_tokenizer_vocab(make_hf_llava):
    from tokenizers import Tokenizer, models

    d, _ = make_hf_llava()
    assert load_tokenizer_vocab(d) is None
    vocab = {"<unk>": 0, "hello": 1, "world": 2, "Ġsure": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.add_special_tokens(["<image>"])
    tok.save(str(d / "tokenizer.json"))
    out = load_tokenizer_vocab(d)
    assert out == ["<unk>", "hello", "world", "Ġsure", "<image>"]
    assert load_tokenizer_vocab(d / "model.safetensors") == out


def test_tokenizer_vocab_unigram_and_bad_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text(
        json.dumps({"model": {"type": "Unigram", "vocab": [["a", 0.0], ["b", -1]]}})
    )
    assert load_tokenizer_vocab(tmp_path) == ["a", "b"]
    bpe = {"model": {"type": "BPE", "vocab": {"a": 0, "c": 2}}, "added_tokens": [{"id": 4, "content": "<s>"}]}
    (tmp_path / "tokenizer.json").write_text(json.dumps(bpe))
    assert load_tokenizer_vocab(tmp_path) == ["a", "", "c", "", "<s>"]
    (tmp_path / "tokenizer.json").write_text('{"model": ')
    with pytest.raises(CheckpointError, match="invalid JSON") as e:
        load_tokenizer_vocab(tmp_path)
    _one_line_error(e, tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 10**9}}}))
    with pytest.raises(CheckpointError, match="invalid vocabulary entry"):
        load_tokenizer_vocab(tmp_path)


# ------------------------------------------------------------------------------ hostile safetensors
def _raw_safetensors(path: Path, header: object, data: bytes = b"", declared: int | None = None) -> Path:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if declared is None else declared) + blob + data)
    return path


GOOD = {"linear_1.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}


@pytest.mark.parametrize(
    ("header", "data", "declared", "reason"),
    [
        (GOOD, b"\0" * 16, 2**40, "exceeds the 104857600 byte limit"),
        (GOOD, b"\0" * 16, 10_000, "declared header length 10000 exceeds the file size"),
        (b'{"a": [1, 2', b"", None, "header is not valid JSON"),
        (b"\xff\xfe\x00", b"", None, "header is not valid JSON"),
        (b"[1, 2, 3]", b"", None, "header is not a JSON object"),
        (b'{"a": {}, "a": {}}', b"", None, "duplicate key"),
        ({"w": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, None, "unknown dtype"),
        ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, None, "non-negative"),
        ({"w": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, b"\0" * 4, None, "non-negative"),
        ({"w": {"dtype": "F32", "shape": [2**50, 0], "data_offsets": [0, 0]}}, b"", None, "absurd dimension"),
        (
            {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}},
            b"\0" * 8,
            None,
            "outside the 8-byte",
        ),
        (
            {"w": {"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 16]}},
            b"\0" * 16,
            None,
            "needs",
        ),
        ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}, b"\0" * 4, None, "two integers"),
        ({"w": [1]}, b"", None, "not an object"),
        ({"__metadata__": {"format": 1}}, b"", None, "__metadata__"),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\0" * 12,
            None,
            "overlap",
        ),
    ],
)
def test_hostile_safetensors_headers(tmp_path, header, data, declared, reason):
    path = _raw_safetensors(tmp_path / "bad.safetensors", header, data, declared)
    with pytest.raises(CheckpointError, match=reason) as e:
        detect_format(path)
    _one_line_error(e, path)


def test_too_short_file(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="truncated") as e:
        parse_header(path)
    _one_line_error(e, path)


def test_truncated_hf_checkpoint(make_hf_llava):
    d, _ = make_hf_llava()
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated") as e:
        load_projector(d)
    _one_line_error(e, f)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=st.binary(max_size=200), n=st.integers(min_value=0, max_value=2**64 - 1))
def test_fuzzed_headers_only_raise_checkpoint_errors(tmp_path, blob, n):
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(struct.pack("<Q", n if n % 3 else len(blob)) + blob)
    try:
        parse_header(path)
    except CheckpointError as e:
        assert "\n" not in str(e)


# ------------------------------------------------------------------------------ missing / broken
def _edit_tensors(path: Path, fn) -> None:
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_no_projector_keys_is_nothing_scannable(make_hf_llava, tmp_path):
    d, _ = make_hf_llava()
    _edit_tensors(d / "model.safetensors", lambda t: [t.pop(k) for k in list(t) if "multi_modal" in k])
    with pytest.raises(NothingScannableError, match="no projector weights found") as e:
        detect_format(d)
    _one_line_error(e, d)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NothingScannableError):
        detect_format(empty)


def test_partially_missing_projector_keys(make_hf_llava):
    d, _ = make_hf_llava()
    _edit_tensors(d / "model.safetensors", lambda t: t.pop("multi_modal_projector.linear_2.weight"))
    with pytest.raises(
        CheckpointError, match="missing projector key 'multi_modal_projector.linear_2.weight'"
    ) as e:
        load_projector(d)
    _one_line_error(e, d)
    d2, _ = make_hf_llava()
    _edit_tensors(d2 / "model.safetensors", lambda t: t.pop("multi_modal_projector.linear_1.bias"))
    with pytest.raises(CheckpointError, match="missing projector key 'multi_modal_projector.linear_1.bias'"):
        load_projector(d2)


def test_nan_in_checkpoint_names_file_and_layer(make_hf_llava):
    d, _ = make_hf_llava()

    def poison(t):
        t["multi_modal_projector.linear_1.weight"][0, 0] = float("nan")

    _edit_tensors(d / "model.safetensors", poison)
    with pytest.raises(CheckpointError, match="multi_modal_projector.linear_1: weight has 1 NaN/inf") as e:
        load_projector(d)
    _one_line_error(e, d)


def test_shapes_that_do_not_chain(tmp_path):
    path = tmp_path / "p.safetensors"
    save_file(
        {"linear_1.weight": torch.zeros(TEXT_DIM, VISION_DIM), "linear_2.weight": torch.zeros(8, 20)}, path
    )
    with pytest.raises(
        CheckpointError, match="shapes do not chain: linear_1 outputs 24 features but linear_2 expects 20"
    ):
        load_projector(path)


def test_ambiguous_prefixes(make_hf_llava):
    d, _ = make_hf_llava()

    def dup(t):
        for k in [k for k in t if k.startswith("multi_modal_projector.")]:
            t["model." + k] = t[k].clone()

    _edit_tensors(d / "model.safetensors", dup)
    with pytest.raises(CheckpointError, match="ambiguous"):
        detect_format(d)


def test_several_candidate_files_is_usage_error(tmp_path):
    for name in ("a.safetensors", "b.safetensors"):
        save_file({"0.weight": torch.zeros(2, 2)}, tmp_path / name)
    with pytest.raises(UsageError, match="a.safetensors, b.safetensors"):
        detect_format(tmp_path)
    assert detect_format(tmp_path / "a.safetensors").format == "bare-projector"


# ------------------------------------------------------------------------------------ shards/paths
def _rewrite_index(d: Path, fn) -> None:
    index_path = d / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    fn(index["weight_map"])
    index_path.write_text(json.dumps(index))


def _proj_shard(d: Path) -> str:
    index = json.loads((d / "model.safetensors.index.json").read_text())
    return index["weight_map"]["multi_modal_projector.linear_1.weight"]


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("../outside.safetensors", "points outside the checkpoint directory"),
        ("sub/../../outside.safetensors", "points outside the checkpoint directory"),
        ("/etc/passwd", "points outside the checkpoint directory"),
    ],
)
def test_shard_names_outside_dir_are_refused(make_hf_llava, name, reason):
    d, _ = make_hf_llava(sharded=True)
    (d.parent / "outside.safetensors").write_bytes((d / _proj_shard(d)).read_bytes())
    _rewrite_index(d, lambda wm: wm.update({"multi_modal_projector.linear_1.weight": name}))
    with pytest.raises(CheckpointError, match=reason) as e:
        detect_format(d)
    _one_line_error(e, d)


def test_shard_symlink_outside_dir_is_refused(make_hf_llava):
    d, _ = make_hf_llava(sharded=True)
    shard = d / _proj_shard(d)
    outside = d.parent / "elsewhere.safetensors"
    shard.rename(outside)
    shard.symlink_to(outside)
    with pytest.raises(CheckpointError, match="resolves outside the checkpoint directory") as e:
        detect_format(d)
    _one_line_error(e, d)


def test_missing_shard_is_named(make_hf_llava):
    d, _ = make_hf_llava(sharded=True)
    name = _proj_shard(d)
    (d / name).unlink()
    with pytest.raises(CheckpointError, match=f"missing shard '{name}'") as e:
        load_projector(d)
    _one_line_error(e, d / "model.safetensors.index.json")


def test_bad_index_json(make_hf_llava):
    d, _ = make_hf_llava(sharded=True)
    (d / "model.safetensors.index.json").write_text('{"weight_map": [1]}')
    with pytest.raises(CheckpointError, match="weight_map"):
        detect_format(d)
    (d / "model.safetensors.index.json").write_text("{nope")
    with pytest.raises(CheckpointError, match="invalid JSON"):
        detect_format(d)


def test_symlink_loop_and_missing_path(tmp_path):
    loop = tmp_path / "loop.safetensors"
    loop.symlink_to(loop)
    with pytest.raises(CheckpointError, match="cannot read") as e:
        detect_format(loop)
    _one_line_error(e, loop)
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "model.safetensors").symlink_to(d / "model.safetensors")
    with pytest.raises(CheckpointError, match="cannot read|not a regular file"):
        detect_format(d)
    with pytest.raises(CheckpointError, match="No such file"):
        detect_format(tmp_path / "nope")


def test_fifo_is_refused_without_blocking(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    os.mkfifo(d / "model.safetensors")
    with pytest.raises(CheckpointError, match="not a regular file"):
        detect_format(d)
    os.mkfifo(tmp_path / "p.bin")
    with pytest.raises(CheckpointError, match="not a regular file"):
        detect_format(tmp_path / "p.bin")


# ---------------------------------------------------------------------------------------- pickles
class _SystemPayload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _TouchPayload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("payload", [_SystemPayload, _TouchPayload])
@pytest.mark.parametrize("via_dir", [False, True])
def test_malicious_pickle_is_refused_and_not_run(tmp_path, payload, via_dir):
    marker = tmp_path / "PWNED"
    d = tmp_path / "ckpt"
    d.mkdir()
    path = d / "mm_projector.bin"
    torch.save({"model.mm_projector.0.weight": torch.zeros(2, 2), "evil": payload(marker)}, path)
    with pytest.raises(
        CheckpointError, match="refused to load: the pickle references a forbidden global"
    ) as e:
        detect_format(d if via_dir else path)
    _one_line_error(e, path)
    assert not marker.exists()


def test_plain_pickle_with_payload_is_refused(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "mm_projector.bin"
    with open(path, "wb") as f:
        pickle.dump({"x": _SystemPayload(marker)}, f, protocol=2)
    with pytest.raises(CheckpointError, match="refused to load") as e:
        load_projector(path)
    _one_line_error(e, path)
    assert not marker.exists()


def test_truncated_and_non_dict_pickles(make_mm_projector, tmp_path):
    path, _ = make_mm_projector()
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="not a valid torch pickle") as e:
        detect_format(path)
    _one_line_error(e, path)
    lst = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], lst)
    with pytest.raises(CheckpointError, match="holds a list, not a state dict"):
        detect_format(lst)


def test_every_failure_is_a_projlens_error(tmp_path):
    junk = tmp_path / "junk.dat"
    junk.write_bytes(b"hello world, not a checkpoint")
    with pytest.raises(ProjlensError):
        detect_format(junk)


def test_trainer_side_files_do_not_stop_a_scan(tmp_path):
    marker = tmp_path / "PWNED"
    d = tmp_path / "run"
    d.mkdir()
    torch.save({"args": _SystemPayload(marker)}, d / "training_args.bin")
    torch.save({"x": _TouchPayload(marker)}, d / "extra.pt")
    save_file(
        {"linear_1.weight": torch.zeros(3, 2), "linear_2.weight": torch.zeros(4, 3)},
        d / "projector.safetensors",
    )
    info = detect_format(d)
    assert info.files == [d / "projector.safetensors"] and load_projector(info).out_dim == 4
    assert not marker.exists()
    (d / "projector.safetensors").unlink()
    with pytest.raises(CheckpointError, match="extra.pt: refused to load"):
        detect_format(d)  # the only candidate left is refused: its own error, not a generic one
    (d / "broken.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(NothingScannableError, match="unreadable: 2 file"):
        detect_format(d)
    assert not marker.exists()
