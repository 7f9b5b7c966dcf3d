"""Property-based hostile inputs: whatever the mutation, the reader returns a valid Projector or
raises CheckpointError / NothingScannableError with a one-line message naming the file.

Mutations: random JSON edits of safetensors headers, byte flips in header and data, truncation,
and real tensors with random shapes, dtypes and NaN/inf. Bounded: 60 examples per property.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from projlens_defense.checkpoint import detect_format, load_lm_readout, load_projector
from projlens_defense.checkpoint.safetensors_io import DTYPE_BITS
from projlens_defense.errors import CheckpointError, NothingScannableError
from projlens_defense.projector import Projector

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
ALLOWED = (CheckpointError, NothingScannableError)


def _read(path: Path) -> Projector | None:
    """The property: a Projector, or an allowed error with a one-line message naming ``path``."""
    try:
        proj = load_projector(path)
    except ALLOWED as e:
        msg = str(e)
        assert "\n" not in msg and str(path) in msg, msg
        return None
    assert isinstance(proj, Projector)
    proj.validate()
    return proj


# ------------------------------------------------------------------------------------ base files
def _bases(tmp: Path) -> dict[str, Path]:
    """Tiny valid checkpoints: bare / mm_projector / merger safetensors, an HF-like dir, a .pt."""
    g = torch.Generator().manual_seed(0)
    bare = {"linear_1.weight": torch.randn(4, 3, generator=g), "linear_1.bias": torch.randn(4, generator=g),
            "linear_2.weight": torch.randn(5, 4, generator=g), "linear_2.bias": torch.randn(5, generator=g)}  # fmt: skip
    out = {}
    tmp.mkdir(parents=True, exist_ok=True)
    out["bare"] = tmp / "bare.safetensors"
    save_file(bare, out["bare"])
    out["mm"] = tmp / "mm_projector.safetensors"
    save_file({f"model.mm_projector.{k.replace('linear_1', '0').replace('linear_2', '2')}": v
               for k, v in bare.items()}, out["mm"])  # fmt: skip
    out["merger"] = tmp / "merger.safetensors"
    save_file({"visual.merger.ln_q.weight": torch.ones(2), "visual.merger.ln_q.bias": torch.zeros(2),
               "visual.merger.mlp.0.weight": torch.randn(8, 8, generator=g),
               "visual.merger.mlp.2.weight": torch.randn(3, 8, generator=g)}, out["merger"])  # fmt: skip
    hf = tmp / "hf"
    hf.mkdir(exist_ok=True)
    save_file({**{f"multi_modal_projector.{k}": v for k, v in bare.items()},
               "language_model.model.embed_tokens.weight": torch.randn(7, 5, generator=g),
               "language_model.lm_head.weight": torch.randn(7, 5, generator=g)}, hf / "model.safetensors")  # fmt: skip
    (hf / "config.json").write_text(json.dumps({"model_type": "llava"}))
    out["hf"] = hf / "model.safetensors"
    out["pt"] = tmp / "projector.pt"
    torch.save(bare, out["pt"])
    return out


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    b = _bases(tmp_path_factory.mktemp("bases"))
    for p in b.values():
        assert _read(p if p.parent.name != "hf" else p.parent) is not None
    return b


def _target(base: Path, tmp: Path) -> tuple[Path, Path]:
    """A fresh writable copy: (path to read, the tensor file inside it)."""
    if base.parent.name == "hf":
        d = tmp / "hf"
        d.mkdir(exist_ok=True)
        (d / "config.json").write_bytes((base.parent / "config.json").read_bytes())
        return d, d / base.name
    return tmp / base.name, tmp / base.name


def _split(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


# ------------------------------------------------------------------------------ JSON mutations
json_leaf = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=6)
json_value = st.recursive(json_leaf, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c,
                                                                                         max_size=3), max_leaves=6)  # fmt: skip
dims = st.integers(min_value=-2, max_value=2**41) | st.sampled_from([0, 1, 2, 3, 4, 5, 8])
FIELD_VALUES = {
    "dtype": st.sampled_from(sorted(DTYPE_BITS)) | st.sampled_from(["F33", "", "f32", "OBJECT"]) | json_value,
    "shape": st.lists(dims, max_size=4) | json_value,
    "data_offsets": st.lists(st.integers(-(2**10), 2**66), min_size=0, max_size=3) | json_value,
}
mutation = st.one_of(
    st.tuples(st.just("set"), st.integers(0, 50), st.sampled_from(sorted(FIELD_VALUES))).flatmap(
        lambda t: st.tuples(st.just(t[0]), st.just(t[1]), st.just(t[2]), FIELD_VALUES[t[2]])
    ),
    st.tuples(st.just("drop-field"), st.integers(0, 50), st.sampled_from(sorted(FIELD_VALUES)), st.none()),
    st.tuples(st.just("drop-entry"), st.integers(0, 50), st.none(), st.none()),
    st.tuples(st.just("rename"), st.integers(0, 50), st.sampled_from(["linear_3.weight", "linear_2.bias", "0.weight",
              "model.mm_projector.4.weight", "visual.merger.ln_q.weight", "__metadata__", "x"]), st.none()),  # fmt: skip
    st.tuples(st.just("add"), st.integers(0, 50), st.text(max_size=8), json_value),
    st.tuples(st.just("metadata"), st.integers(0, 0), st.none(), json_value),
    st.tuples(st.just("whole-entry"), st.integers(0, 50), st.none(), json_value),
)


def _apply(header: dict, m: tuple) -> None:
    op, i, field, value = m
    keys = [k for k in header if k != "__metadata__"]
    key = keys[i % len(keys)] if keys else None
    if op == "set" and key and isinstance(header[key], dict):
        header[key][field] = value
    elif op == "drop-field" and key and isinstance(header[key], dict):
        header[key].pop(field, None)
    elif op == "drop-entry" and key:
        del header[key]
    elif op == "rename" and key:
        header[field] = header.pop(key)
    elif op == "add":
        header[field] = value
    elif op == "metadata":
        header["__metadata__"] = value
    elif op == "whole-entry" and key:
        header[key] = value


@SETTINGS
@given(which=st.sampled_from(["bare", "mm", "merger", "hf"]), muts=st.lists(mutation, min_size=1, max_size=4),
       data_delta=st.integers(-16, 16))  # fmt: skip
def test_mutated_safetensors_headers(bases, tmp_path, which, muts, data_delta):
    header, data = _split(bases[which].read_bytes())
    for m in muts:
        _apply(header, m)
    data = data[:data_delta] if data_delta < 0 else data + b"\0" * data_delta
    path, f = _target(bases[which], tmp_path)
    blob = json.dumps(header).encode()
    f.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    _read(path)


@SETTINGS
@given(which=st.sampled_from(["bare", "mm", "merger", "hf", "pt"]), data=st.data())
def test_byte_flips_in_header_and_data(bases, tmp_path, which, data):
    raw = bytearray(bases[which].read_bytes())
    (n,) = struct.unpack("<Q", raw[:8]) if which != "pt" else (len(raw),)
    # half the flips land in the header (where structure lives), the rest anywhere
    region = st.integers(0, min(len(raw), 8 + n) - 1) | st.integers(0, len(raw) - 1)
    flips = data.draw(st.lists(st.tuples(region, st.integers(1, 255)), min_size=1, max_size=6))
    for pos, x in flips:
        raw[pos] ^= x
    path, f = _target(bases[which], tmp_path)
    f.write_bytes(bytes(raw))
    _read(path)


@SETTINGS
@given(which=st.sampled_from(["bare", "mm", "merger", "hf", "pt"]), data=st.data())
def test_truncation_anywhere_is_an_error(bases, tmp_path, which, data):
    raw = bases[which].read_bytes()
    cut = data.draw(st.integers(0, len(raw) - 1))
    path, f = _target(bases[which], tmp_path)
    f.write_bytes(raw[:cut])
    assert _read(path) is None, f"{which} cut at {cut}/{len(raw)} bytes was read as valid"


# ---------------------------------------------------------------------------- tensor mutations
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int8, torch.bool,
          torch.complex64]  # fmt: skip
layer = st.fixed_dictionaries({
    "out": st.integers(0, 6), "in": st.integers(0, 6), "bias": st.booleans(), "dtype": st.sampled_from(DTYPES),
    "poison": st.sampled_from([None, None, float("nan"), float("inf"), float("-inf")]), "at": st.integers(0, 40),
})  # fmt: skip


@SETTINGS
@given(layers=st.lists(layer, min_size=1, max_size=3), fmt=st.sampled_from(["safetensors", "pt"]),
       style=st.sampled_from(["linear_{n}.", "{i}.", "model.mm_projector.{i}."]))  # fmt: skip
def test_random_tensors_shapes_dtypes_nan(tmp_path, layers, fmt, style):
    g = torch.Generator().manual_seed(len(layers))
    sd, expect_ok = {}, True
    for n, spec in enumerate(layers, start=1):
        prefix = style.format(n=n, i=2 * (n - 1))
        w = torch.randn(spec["out"], spec["in"], generator=g)
        b = torch.randn(spec["out"], generator=g) if spec["bias"] else None
        if spec["poison"] is not None and w.numel():
            w.view(-1)[spec["at"] % w.numel()] = spec["poison"]
            expect_ok = expect_ok and spec["dtype"] not in (torch.float32, torch.float16, torch.bfloat16, torch.float64)
        sd[prefix + "weight"] = w.to(spec["dtype"])
        if b is not None:
            sd[prefix + "bias"] = b.to(spec["dtype"])
        expect_ok = expect_ok and spec["dtype"].is_floating_point and w.numel() > 0
        if n > 1:
            expect_ok = expect_ok and layers[n - 2]["out"] == spec["in"]
    path = tmp_path / f"p.{fmt}"
    if fmt == "pt":
        torch.save(sd, path)
    else:
        save_file(sd, path)
    proj = _read(path)
    if expect_ok:
        assert proj is not None, f"a valid projector was refused: {[(k, tuple(v.shape), v.dtype) for k, v in sd.items()]}"
        for lay, (k, _) in zip(proj.layers, proj.keys, strict=True):
            assert torch.equal(lay.weight, sd[k].to(torch.float32))
    else:
        assert proj is None, "a broken projector (NaN/inf, non-float, empty or unchained) was accepted"


@SETTINGS
@given(which=st.sampled_from(["hf"]), muts=st.lists(mutation, min_size=1, max_size=3))
def test_lm_readout_on_mutated_headers(bases, tmp_path, which, muts):
    """The LLM read-out path (embed_tokens / lm_head) under the same header mutations."""
    header, data = _split(bases[which].read_bytes())
    for m in muts:
        _apply(header, m)
    path, f = _target(bases[which], tmp_path)
    blob = json.dumps(header).encode()
    f.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    try:
        load_lm_readout(detect_format(path))
    except ALLOWED as e:
        assert "\n" not in str(e) and str(path) in str(e), str(e)
