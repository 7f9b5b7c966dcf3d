"""A corpus of hostile checkpoints, and a runner that measures a command on each of them.

``build_corpus(root)`` writes, for every supported format (HF LLaVA dir, single file and sharded;
original-LLaVA ``mm_projector.bin`` / ``.safetensors``; the Qwen2-VL merger, alone and in a whole Qwen2-VL
model dir; a bare projector
``.safetensors`` / ``.pt``), broken and malicious variants of a real tiny save: truncated files,
hostile safetensors headers, wrong dtypes, shapes that do not chain, NaN/inf, missing keys,
shard indexes that point nowhere or outside, symlink loops, pickles whose payload would run a
command, decompression and storage bombs... Each :class:`Case` says which exit code
each command must end with (2: error, 3: nothing scannable; 0 where a command legitimately
succeeds because the damage lies in a part it never needs, e.g. ``sanitize`` on a checkpoint
whose only damage is its tokenizer) and which substring its message must contain.

The pristine bases (``pristine_cases``) are part of the contract: every command must process
them, so a hostile case failing is due to its damage, not to the test setup. ``analyze`` and
``sanitize`` run with ``--reference`` (a perturbed copy of the base: a real "fine-tuned from"
pair) and ``analyze`` with a small conversation JSON for its probes and test samples.

Every payload only ever creates a marker file under ``marker_dir(root)``; a command that runs
a payload therefore leaves a file there.

``run_case`` runs one command on one case in a child process and returns its exit code, output,
wall time and peak RSS (``os.wait4``); ``problems`` lists what is wrong with a run, output checks
included. Used by ``test_hostile_corpus.py`` and ``hostile_matrix.py``.
Imports ``conftest`` for the tiny-model builders: run from pytest, or as ``python tests/...``.
"""

from __future__ import annotations

import builtins
import collections
import hashlib
import io
import json
import os
import pathlib
import pickle
import random
import shlex
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from conftest import TEXT_DIM, VISION_DIM, _mlp, _patch_merger
from safetensors.torch import load_file, save_file

TIMEOUT_S = 10.0
PRISTINE_TIMEOUT_S = 60.0  # a pristine base runs the whole command (analyze: a model, its figures)
MAX_RSS_MB = 2048
MARKERS = "markers"
_RNG = random.Random(7)  # corpus bytes are deterministic
_FAMILIES = ("hf", "hf-sharded", "mm-bin", "mm-safetensors", "qwen2-vl-merger", "qwen2-vl-dir", "bare-safetensors",
             "bare-pt", "any")  # fmt: skip
EXIT_CODES = (0, 1, 2, 3)


@dataclass(frozen=True)
class Case:
    """One hostile input: ``path`` is what a command is given; ``expected`` its exit code (2 or 3).

    ``names``: a string the one-line reason must contain (default: ``path``, which also matches
    any file inside a checkpoint dir); ``reason``: a substring the message must contain (None:
    any); ``marker``: the file the payload would create, for malicious pickles, and ``payload``
    the pickle that holds it. ``exits`` / ``reasons``: per-command exceptions to ``expected`` /
    ``reason`` (see ``COMMANDS``), e.g. ``sanitize`` exits 0 with a warning when the damage is
    only in a file it copies unchanged. ``reference`` and ``data``: the pristine reference
    checkpoint and the conversation JSON that ``analyze`` / ``sanitize`` are given; ``time_limit``:
    the wall-time bound of one run (10 s; longer only for the pristine bases, which run a model).
    """

    name: str
    path: Path
    expected: int
    description: str
    family: str = "any"
    names: str = ""
    reason: str | None = None
    marker: Path | None = None
    payload: Path | None = None
    exits: dict[str, int] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    reference: Path | None = None
    data: Path | None = None
    time_limit: float = TIMEOUT_S

    def must_name(self) -> str:
        return self.names or str(self.path)

    def expected_for(self, command: str) -> int:
        return self.exits.get(command, self.expected)

    def reason_for(self, command: str) -> str | None:
        return self.reasons.get(command, self.reason)


def marker_dir(root: Path) -> Path:
    return root / MARKERS


# ---------------------------------------------------------------------------------------- payloads
class SystemPayload:
    """``os.system("touch MARKER")`` when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


class TouchPayload:
    """``pathlib.Path(MARKER).touch()`` when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


class ExecPayload:
    """``builtins.exec("open(MARKER, 'w').close()")`` when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",))


PAYLOADS: dict[str, type] = {"os-system": SystemPayload, "path-touch": TouchPayload, "builtins-exec": ExecPayload}


class _Storage:
    """Stands for a zip record in a hand-written torch pickle (see ``_craft_torch_zip``)."""

    def __init__(self, key: str, numel: int) -> None:
        self.key, self.numel = key, numel


class _Tensor:
    def __init__(self, storage: _Storage, shape: tuple[int, ...], stride: tuple[int, ...]) -> None:
        self.args = (storage, 0, shape, stride, False, collections.OrderedDict())

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, self.args)


class _TorchPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", torch.FloatStorage, obj.key, "cpu", obj.numel)
        return None


# ----------------------------------------------------------------------------------- file helpers
def _st_split(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _st_write(path: Path, header: dict | bytes, data: bytes, declared: int | None = None) -> None:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if declared is None else declared) + blob + data)


def _st_edit_header(path: Path, fn: Callable[[dict], None]) -> None:
    header, data = _st_split(path)
    fn(header)
    _st_write(path, header, data)


def _st_edit_tensors(path: Path, fn: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(path)
    fn(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata={"format": "pt"})


def _pt_edit_tensors(path: Path, fn: Callable[[dict[str, torch.Tensor]], None]) -> None:
    sd = torch.load(path, weights_only=True)
    fn(sd)
    torch.save(sd, path)


def _st_cut_inside(path: Path, key: str) -> None:
    """Move tensor ``key``'s bytes to the end of the safetensors file, then cut the file half-way through them:
    every other tensor stays whole, ``key`` alone is truncated."""
    header, data = _st_split(path)
    start, end = header[key]["data_offsets"]
    rest = data[:start] + data[end:]
    for k, v in header.items():
        if k != "__metadata__" and k != key and v["data_offsets"][0] >= end:
            v["data_offsets"] = [v["data_offsets"][0] - (end - start), v["data_offsets"][1] - (end - start)]
    header[key]["data_offsets"] = [len(rest), len(rest) + end - start]
    _st_write(path, header, rest + data[start:end])
    path.write_bytes(path.read_bytes()[: -((end - start) // 2)])


def _truncate(path: Path, frac: float = 0.5) -> None:
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * frac)])


def _craft_torch_zip(path: Path, tensors: dict[str, tuple[int, tuple[int, ...], tuple[int, ...]]]) -> None:
    """A torch.save zip whose pickle declares each tensor's (storage numel, shape, stride) as given.

    The records hold real bytes from a genuine save of small tensors; the pickle lies about them.
    """
    buf = io.BytesIO()
    torch.save({k: torch.ones(4, 3) for k in tensors}, buf)
    genuine = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    pkl = io.BytesIO()
    objs = {k: _Tensor(_Storage(str(i), numel), shape, stride) for i, (k, (numel, shape, stride)) in enumerate(tensors.items())}
    _TorchPickler(pkl, protocol=2).dump(objs)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name in genuine.namelist():
            z.writestr(name, pkl.getvalue() if name.endswith("data.pkl") else genuine.read(name))


def _deflate_members(path: Path) -> None:
    """Rewrite a torch.save zip with its data records deflate-compressed (torch.save never does)."""
    src = zipfile.ZipFile(io.BytesIO(path.read_bytes()))
    with zipfile.ZipFile(path, "w") as z:
        for info in src.infolist():
            kind = zipfile.ZIP_DEFLATED if "/data/" in info.filename else zipfile.ZIP_STORED
            z.writestr(info.filename, src.read(info.filename), compress_type=kind)


# ------------------------------------------------------------------------------------ base saves
def _perturbed(t: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (t + 0.05 * torch.randn(t.shape, generator=g)).contiguous()


def _llava_with_tokenizer():
    """A tiny real LLaVA (vision 16 -> text 24) with the zoo's word-level tokenizer and image processor,
    so that commands that run the model (``analyze``) can process the pristine save."""
    from projlens_defense.zoo.model import ModelDims, build_image_processor, build_llava
    from projlens_defense.zoo.tokenizer import build_tokenizer

    tok = build_tokenizer()
    dims = ModelDims(vision_hidden=VISION_DIM, vision_layers=1, vision_heads=2, patch_size=8, text_hidden=TEXT_DIM,
                     text_layers=1, text_heads=2)  # fmt: skip
    model = build_llava(dims, len(tok), tok.convert_tokens_to_ids("<image>"), tok.pad_token_id, tok.bos_token_id,
                        tok.eos_token_id, seed=0)  # fmt: skip
    return model.eval(), tok, build_image_processor()


def _qwen2vl_with_processor():
    """A tiny real Qwen2-VL (vision 16 wide, 4 px patches merged 2x2; LLM 32 wide) with the qwen2vl zoo's tokenizer,
    chat template and image processor, so commands that run the model can process the pristine save."""
    from projlens_defense.zoo.model import ModelDims
    from projlens_defense.zoo.qwen2vl import QWEN2VL_DIGITS, build_image_processor, build_qwen2vl
    from projlens_defense.zoo.tokenizer import build_tokenizer

    tok = build_tokenizer(QWEN2VL_DIGITS)
    dims = ModelDims(vision_hidden=VISION_DIM, vision_layers=1, vision_heads=2, patch_size=4, text_hidden=32,
                     text_layers=1, text_heads=2)  # fmt: skip
    return build_qwen2vl(dims, tok, seed=0).eval(), tok, build_image_processor(dims, QWEN2VL_DIGITS.image_mean,
                                                                              QWEN2VL_DIGITS.image_std)


QWEN_MERGER = "visual.merger."
"""Where a whole Qwen2-VL directory saved by transformers 5.x keeps the merger."""


@dataclass
class _Bases:
    """Pristine tiny checkpoints, one per format, copied for each case; plus the references and data
    the commands that compare or run a model are given."""

    root: Path
    hf: Path = field(init=False)
    hf_sharded: Path = field(init=False)
    mm_bin: Path = field(init=False)  # dir with mm_projector.bin + config.json
    mm_st: Path = field(init=False)  # mm_projector.safetensors
    merger: Path = field(init=False)
    bare_st: Path = field(init=False)
    bare_pt: Path = field(init=False)
    reference: Path = field(init=False)  # hf with a perturbed projector: what the others were "fine-tuned from"
    merger_reference: Path = field(init=False)
    qwen: Path = field(init=False)  # a whole Qwen2-VL dir (model, tokenizer, chat template, image processor)
    qwen_reference: Path = field(init=False)  # the same with a perturbed merger
    data: Path = field(init=False)  # LLaVA conversation JSON (8 samples) for analyze's probes and test set

    def __post_init__(self) -> None:
        b = self.root
        self.hf, self.hf_sharded, self.reference = b / "hf", b / "hf-sharded", b / "reference"
        self.mm_bin, self.mm_st, self.merger = b / "mm-bin", b / "mm_projector.safetensors", b / "merger.safetensors"
        self.bare_st, self.bare_pt = b / "projector.safetensors", b / "projector.pt"
        self.merger_reference, self.data = b / "merger-reference.safetensors", b / "data" / "samples.json"
        self.qwen, self.qwen_reference = b / "qwen2vl", b / "qwen2vl-reference"

    def build(self) -> None:
        from projlens_defense.conversations import save_conversations
        from projlens_defense.zoo.tasks import downstream_samples

        b = self.root
        b.mkdir(parents=True)
        model, tok, proc = _llava_with_tokenizer()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for d, kw in ((self.hf, {}), (self.hf_sharded, {"max_shard_size": "20KB"}), (self.reference, {})):
                model.save_pretrained(d, **kw)
                tok.save_pretrained(d)
                proc.save_pretrained(d)
        _st_edit_tensors(self.reference / "model.safetensors", lambda t: t.update(
            {k: _perturbed(v, i) for i, (k, v) in enumerate(sorted(t.items())) if "multi_modal_projector." in k}))
        save_conversations(downstream_samples(8, np.arange(64), seed=0, prefix="s"), self.data)
        mlp = _mlp(VISION_DIM, TEXT_DIM, TEXT_DIM, seed=1)
        sd = {f"model.mm_projector.{k}": v.detach().clone() for k, v in mlp.state_dict().items()}
        self.mm_bin.mkdir()
        torch.save(sd, self.mm_bin / "mm_projector.bin")
        (self.mm_bin / "config.json").write_text(
            json.dumps({"mm_projector_type": "mlp2x_gelu", "mm_hidden_size": VISION_DIM})
        )
        save_file(sd, self.mm_st, metadata={"format": "pt"})
        merger = {f"visual.merger.{k}": v.detach().clone().contiguous()
                  for k, v in _patch_merger(rms=False, seed=2).state_dict().items()}  # fmt: skip
        save_file(merger, self.merger, metadata={"format": "pt"})
        save_file({k: _perturbed(v, i) for i, (k, v) in enumerate(sorted(merger.items()))}, self.merger_reference,
                  metadata={"format": "pt"})  # fmt: skip
        bare = {k.replace("0.", "linear_1.").replace("2.", "linear_2."): v.detach().clone()
                for k, v in _mlp(VISION_DIM, TEXT_DIM, TEXT_DIM, seed=3).state_dict().items()}  # fmt: skip
        save_file(bare, self.bare_st)
        torch.save({k: v.clone() for k, v in bare.items()}, self.bare_pt)
        qwen, qtok, qproc = _qwen2vl_with_processor()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for d in (self.qwen, self.qwen_reference):
                qwen.save_pretrained(d)
                qtok.save_pretrained(d)
                qproc.save_pretrained(d)
        _st_edit_tensors(self.qwen_reference / "model.safetensors", lambda t: t.update(
            {k: _perturbed(v, i) for i, (k, v) in enumerate(sorted(t.items())) if k.startswith(QWEN_MERGER)}))

    def reference_for(self, family: str) -> Path:
        return {"qwen2-vl-merger": self.merger_reference, "qwen2-vl-dir": self.qwen_reference}.get(family,
                                                                                                   self.reference)


def _projector_shard(d: Path) -> str:
    wm = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    return wm["multi_modal_projector.linear_1.weight"]


def _embed_shard(d: Path) -> str:
    wm = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    return wm["language_model.model.embed_tokens.weight"]


def _edit_index(d: Path, fn: Callable[[dict], None]) -> None:
    p = d / "model.safetensors.index.json"
    index = json.loads(p.read_text())
    fn(index)
    p.write_text(json.dumps(index))


# --------------------------------------------------------------------------------------- builder
# Damage only in what `sanitize` reads for its optional logit lens (tokenizer, LLM read-out) and
# copies unchanged: it repairs the projector, exits 0 and warns naming the damage (the reason).
_LENS_ONLY: dict[str, dict[str, int]] = {"exits": {"sanitize": 0}}


class _Corpus:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.cases: list[Case] = []
        self.bases = _Bases(root / "_base")
        self.markers = marker_dir(root)

    def _fresh(self, name: str, base: Path) -> tuple[Path, Path]:
        """A private copy of ``base`` for case ``name``: (case dir, copy)."""
        d = self.root / name
        d.mkdir()
        dst = d / base.name
        if base.is_dir():
            shutil.copytree(base, dst, symlinks=True)
        else:
            shutil.copy2(base, dst)
        return d, dst

    def add(self, name: str, path: Path, expected: int, description: str, family: str, **kw) -> None:
        assert expected in (2, 3) and family in _FAMILIES and all(c.name != name for c in self.cases), name
        assert set(kw.get("exits", {})) <= set(COMMANDS) and set(kw.get("exits", {}).values()) <= set(EXIT_CODES)
        kw.setdefault("reference", self.bases.reference_for(family))
        kw.setdefault("data", self.bases.data)
        self.cases.append(Case(name, path, expected, description, family, **kw))

    # -------------------------------------------------------------------- safetensors mutations
    def safetensors_cases(self, family: str, base: Path, target: Callable[[Path], tuple[Path, Path]],
                          weight_key: str) -> None:  # fmt: skip
        """The header-level attacks on the safetensors file that holds the projector.

        ``target(copy)`` gives (path to pass to the command, the safetensors file to mutate).
        """
        tag = family

        def make(suffix: str) -> tuple[Path, Path]:
            _, copy = self._fresh(f"{tag}--{suffix}", base)
            return target(copy)

        p, f = make("truncated")
        _truncate(f)
        self.add(f"{tag}--truncated", p, 2, "file cut in half", family, reason="outside the")

        p, f = make("zero-byte")
        f.write_bytes(b"")
        self.add(f"{tag}--zero-byte", p, 2, "zero-byte file", family, reason="truncated")

        p, f = make("header-len-exceeds-file")
        header, data = _st_split(f)
        _st_write(f, header, data, declared=f.stat().st_size + 1000)
        self.add(f"{tag}--header-len-exceeds-file", p, 2, "declared header length larger than the file",
                 family, reason="exceeds the file size")  # fmt: skip

        p, f = make("header-len-over-cap")
        header, data = _st_split(f)
        _st_write(f, header, data, declared=2**63 + 5)
        self.add(f"{tag}--header-len-over-cap", p, 2, "declared header length 2**63 (cap is 100 MB)",
                 family, reason="byte limit")  # fmt: skip

        p, f = make("header-invalid-json")
        _, data = _st_split(f)
        _st_write(f, b'{"' + weight_key.encode() + b'": {"dtype": "F32", "shape": [24, 16], ', data)
        self.add(f"{tag}--header-invalid-json", p, 2, "header JSON cut mid-object", family, reason="not valid JSON")

        p, f = make("header-not-utf8")
        _, data = _st_split(f)
        _st_write(f, b"\xff\xfe{\x00\x00}" * 4, data)
        self.add(f"{tag}--header-not-utf8", p, 2, "header bytes are not UTF-8", family, reason="not valid JSON")

        p, f = make("header-deep-nesting")
        _, data = _st_split(f)
        _st_write(f, b"[" * 200_000 + b"]" * 200_000, data)
        self.add(f"{tag}--header-deep-nesting", p, 2, "200k nested JSON arrays (recursion bomb)", family,
                 reason="not valid JSON")  # fmt: skip

        p, f = make("dtype-unknown")
        _st_edit_header(f, lambda h: h[weight_key].update(dtype="F33"))
        self.add(f"{tag}--dtype-unknown", p, 2, "projector weight dtype 'F33'", family, reason="unknown dtype")

        p, f = make("dtype-size-mismatch")
        _st_edit_header(f, lambda h: h[weight_key].update(dtype="F64"))
        self.add(f"{tag}--dtype-size-mismatch", p, 2, "F32 bytes declared as F64", family, reason="needs")

        p, f = make("dtype-int32")
        _st_edit_header(f, lambda h: h[weight_key].update(dtype="I32"))
        self.add(f"{tag}--dtype-int32", p, 2, "projector weight bytes declared as I32 (not a float)", family,
                 reason="floating-point")  # fmt: skip

        p, f = make("dtype-f4")
        _st_edit_header(f, lambda h: h[weight_key].update(dtype="F4", shape=h[weight_key]["shape"][:-1]
                                                          + [h[weight_key]["shape"][-1] * 8]))  # fmt: skip
        self.add(f"{tag}--dtype-f4", p, 2, "projector weight as F4 (torch has no such dtype)", family)

        p, f = make("absurd-dims")
        _st_edit_header(f, lambda h: h[weight_key].update(shape=[2**40, 2**40]))
        self.add(f"{tag}--absurd-dims", p, 2, "projector weight shape [2**40, 2**40] over a few KB of data",
                 family, reason="needs")  # fmt: skip

        p, f = make("absurd-dims-2")
        _st_edit_header(f, lambda h: h[weight_key].update(shape=[2**62, 0]))
        self.add(f"{tag}--absurd-dims-2", p, 2, "shape [2**62, 0] (zero elements, absurd dimension)", family,
                 reason="absurd dimension")  # fmt: skip

        p, f = make("offsets-outside")
        _st_edit_header(f, lambda h: h[weight_key].update(data_offsets=[0, 2**50]))
        self.add(f"{tag}--offsets-outside", p, 2, "data_offsets past the end of the file", family,
                 reason="outside the")  # fmt: skip

        p, f = make("offsets-overlap")
        header, data = _st_split(f)
        others = [k for k in header if k not in (weight_key, "__metadata__")]
        header[others[0]]["data_offsets"] = list(header[weight_key]["data_offsets"])
        header[others[0]]["shape"] = list(header[weight_key]["shape"])
        header[others[0]]["dtype"] = header[weight_key]["dtype"]
        _st_write(f, header, data)
        self.add(f"{tag}--offsets-overlap", p, 2, "two tensors share the same bytes", family, reason="overlap")


    # ------------------------------------------------------------------------ tensor mutations
    def tensor_cases(self, family: str, base: Path, target: Callable[[Path], tuple[Path, Path]],
                     w1: str, w2: str, drop_all: str) -> None:  # fmt: skip
        """Real-tensor attacks (written with save_file / torch.save): NaN, inf, bad chains, dtypes, keys."""

        def make(suffix: str) -> tuple[Path, Path]:
            _, copy = self._fresh(f"{family}--{suffix}", base)
            return target(copy)

        def edit(f: Path, fn: Callable[[dict[str, torch.Tensor]], None]) -> None:
            (_pt_edit_tensors if f.suffix in (".pt", ".bin") else _st_edit_tensors)(f, fn)

        def poke(value: float):
            def fn(t):
                t[w1] = t[w1].clone()
                t[w1][0, 0] = value
            return fn

        p, f = make("nan")
        edit(f, poke(float("nan")))
        self.add(f"{family}--nan", p, 2, f"one NaN in {w1}", family, reason="NaN/inf")
        p, f = make("inf")
        edit(f, poke(float("-inf")))
        self.add(f"{family}--inf", p, 2, f"one -inf in {w1}", family, reason="NaN/inf")

        p, f = make("shapes-do-not-chain")
        edit(f, lambda t: t.update({w2: torch.zeros(t[w2].shape[0], t[w2].shape[1] + 3)}))
        self.add(f"{family}--shapes-do-not-chain", p, 2, f"{w2} expects 3 more inputs than {w1} gives", family,
                 reason="do not chain")  # fmt: skip

        p, f = make("weight-3d")
        edit(f, lambda t: t.update({w1: t[w1].reshape(1, *t[w1].shape)}))
        self.add(f"{family}--weight-3d", p, 2, f"{w1} stored as a 3-D tensor", family, reason="2-D")

        p, f = make("empty-layer")
        edit(f, lambda t: t.update({w1: torch.zeros(0, t[w1].shape[1]), w2: torch.zeros(t[w2].shape[0], 0),
                                    **({w1[:-6] + "bias": torch.zeros(0)} if w1[:-6] + "bias" in t else {})}))  # fmt: skip
        self.add(f"{family}--empty-layer", p, 2, f"{w1} [0, in] and {w2} [out, 0]: chains, maps nothing", family,
                 reason="is empty")  # fmt: skip

        p, f = make("dtype-int64")
        edit(f, lambda t: t.update({w1: torch.ones(t[w1].shape, dtype=torch.int64)}))
        self.add(f"{family}--dtype-int64", p, 2, f"{w1} stored as int64", family, reason="floating-point")

        p, f = make("dtype-complex")
        edit(f, lambda t: t.update({w1: torch.ones(t[w1].shape, dtype=torch.complex64)}))
        self.add(f"{family}--dtype-complex", p, 2, f"{w1} stored as complex64", family, reason="floating-point")

        p, f = make("missing-key")
        edit(f, lambda t: t.pop(w2))
        self.add(f"{family}--missing-key", p, 2, f"{w2} deleted (its bias is still there)", family,
                 reason="missing projector key")

        p, f = make("no-projector-keys")
        edit(f, lambda t: [t.pop(k) for k in list(t) if k.startswith(drop_all)])
        self.add(f"{family}--no-projector-keys", p, 3, f"every {drop_all or 'top-level'}* key deleted", family,
                 reason="no projector weights")  # fmt: skip

    # ---------------------------------------------------------------------------- pickle attacks
    def pickle_cases(self, family: str, base: Path, target: Callable[[Path], tuple[Path, Path]]) -> None:
        def make(suffix: str) -> tuple[Path, Path]:
            _, copy = self._fresh(f"{family}--{suffix}", base)
            return target(copy)

        sd = torch.load(target(base)[1], weights_only=True)
        keys = list(sd)
        for pname in PAYLOADS:
            p, f = make(f"payload-{pname}")
            self.add(f"{family}--payload-{pname}", p, 2, f"torch.save pickle whose {pname} payload touches a marker",
                     family, reason="refused to load", marker=self._payload(f, f"{family}--payload-{pname}", pname, sd, "torch"), payload=f)  # fmt: skip
        p, f = make("payload-plain-pickle")
        self.add(f"{family}--payload-plain-pickle", p, 2, "plain protocol-2 pickle running os.system",
                 family, reason="refused to load", marker=self._payload(f, f"{family}--payload-plain-pickle", "os-system", sd, "plain"), payload=f)  # fmt: skip
        p, f = make("payload-legacy-format")
        self.add(f"{family}--payload-legacy-format", p, 2, "legacy (pre-zip) torch.save format running os.system",
                 family, reason="refused to load", marker=self._payload(f, f"{family}--payload-legacy-format", "os-system", sd, "legacy"), payload=f)  # fmt: skip

        p, f = make("zero-byte")
        f.write_bytes(b"")
        self.add(f"{family}--zero-byte", p, 2, "zero-byte file", family, reason="not a valid torch pickle")
        p, f = make("truncated")
        _truncate(f)
        self.add(f"{family}--truncated", p, 2, "file cut in half", family, reason="not a valid torch pickle")
        p, f = make("garbage")
        f.write_bytes(b"PK\x03\x04" + b"\x00" * 200)
        self.add(f"{family}--garbage", p, 2, "zip magic followed by zeros", family, reason="not a valid torch pickle")

        p, f = make("not-a-dict")
        torch.save([sd[keys[0]]], f)
        self.add(f"{family}--not-a-dict", p, 2, "pickle holds a list of tensors", family, reason="not a state dict")

        p, f = make("storage-bomb")
        _craft_torch_zip(f, {k: (2**40 if i == 0 else 12, (4, 3), (3, 1)) for i, k in enumerate(keys)})
        self.add(f"{family}--storage-bomb", p, 2, "pickle declares a 2**40-element storage over a 48-byte record",
                 family, reason="not a valid torch pickle")  # fmt: skip

        p, f = make("absurd-dims")
        _craft_torch_zip(f, {k: (12, (2**40, 2**40) if i == 0 else (4, 3), (2**40, 1) if i == 0 else (3, 1))
                             for i, k in enumerate(keys)})  # fmt: skip
        self.add(f"{family}--absurd-dims", p, 2, "tensor of shape [2**40, 2**40] over a 12-element storage",
                 family, reason="not a valid torch pickle")  # fmt: skip

        p, f = make("zip-bomb")
        big = {keys[0]: torch.zeros(4096, 2048)}
        big.update({k: torch.zeros(8, 4096) for k in keys[1:] if sd[k].ndim == 2})
        torch.save(big, f)
        _deflate_members(f)
        self.add(f"{family}--zip-bomb", p, 2, "deflate-compressed records: 35 MB of weights in a ~40 KB file (a "
                 "real bomb is gigabytes)", family, reason="compressed")  # fmt: skip

    def _payload(self, f: Path, case: str, pname: str, sd: dict, how: str) -> Path:
        marker = self.markers / case
        obj = {**sd, "evil": PAYLOADS[pname](marker)}
        if how == "torch":
            torch.save(obj, f)
        elif how == "legacy":
            torch.save(obj, f, _use_new_zipfile_serialization=False)
        else:
            with open(f, "wb") as fh:
                pickle.dump({"evil": PAYLOADS[pname](marker)}, fh, protocol=2)
        return marker

    # ------------------------------------------------------------------------------- the lot
    def build(self) -> list[Case]:
        self.markers.mkdir(parents=True)
        self.bases.build()
        b = self.bases

        def in_dir(name: str) -> Callable[[Path], tuple[Path, Path]]:
            return lambda d: (d, d / name)

        def itself(f: Path) -> tuple[Path, Path]:
            return f, f

        hf_w1, hf_w2 = "multi_modal_projector.linear_1.weight", "multi_modal_projector.linear_2.weight"
        # HF LLaVA, single model.safetensors
        self.safetensors_cases("hf", b.hf, in_dir("model.safetensors"), hf_w1)
        self.tensor_cases("hf", b.hf, in_dir("model.safetensors"), hf_w1, hf_w2, drop_all="multi_modal_projector.")
        self._hf_dir_cases()
        # HF LLaVA, sharded: attack the shard holding the projector
        shard = _projector_shard(b.hf_sharded)
        self.safetensors_cases("hf-sharded", b.hf_sharded, in_dir(shard), hf_w1)
        self._sharded_cases()
        # original LLaVA mm_projector.bin (passed as its dir, with config.json) and .safetensors (the file)
        mm_w1, mm_w2 = "model.mm_projector.0.weight", "model.mm_projector.2.weight"
        self.tensor_cases("mm-bin", b.mm_bin, in_dir("mm_projector.bin"), mm_w1, mm_w2, drop_all="model.mm_projector.")
        self.pickle_cases("mm-bin", b.mm_bin, in_dir("mm_projector.bin"))
        self._mm_bin_cases()
        self.safetensors_cases("mm-safetensors", b.mm_st, itself, mm_w1)
        self.tensor_cases("mm-safetensors", b.mm_st, itself, mm_w1, mm_w2, drop_all="model.mm_projector.")
        # Qwen2-VL merger
        q = "visual.merger."
        self.safetensors_cases("qwen2-vl-merger", b.merger, itself, f"{q}mlp.0.weight")
        self.tensor_cases("qwen2-vl-merger", b.merger, itself, f"{q}mlp.0.weight", f"{q}mlp.2.weight",
                          drop_all=q)  # fmt: skip
        self._merger_cases()
        # a whole Qwen2-VL directory (the merger in model.safetensors beside the tower and the LLM)
        qd = in_dir("model.safetensors")
        self.safetensors_cases("qwen2-vl-dir", b.qwen, qd, f"{QWEN_MERGER}mlp.0.weight")
        self.tensor_cases("qwen2-vl-dir", b.qwen, qd, f"{QWEN_MERGER}mlp.0.weight", f"{QWEN_MERGER}mlp.2.weight",
                          drop_all=QWEN_MERGER)  # fmt: skip
        self._qwen_dir_cases()
        # bare projector state dicts
        self.safetensors_cases("bare-safetensors", b.bare_st, itself, "linear_1.weight")
        self.tensor_cases("bare-safetensors", b.bare_st, itself, "linear_1.weight", "linear_2.weight",
                          drop_all="linear_")  # fmt: skip
        self.tensor_cases("bare-pt", b.bare_pt, itself, "linear_1.weight", "linear_2.weight", drop_all="linear_")
        self.pickle_cases("bare-pt", b.bare_pt, itself)
        self._generic_cases()
        return self.cases

    def _hf_dir_cases(self) -> None:
        b = self.bases
        d, c = self._fresh("hf--missing-bias", b.hf)
        _st_edit_tensors(c / "model.safetensors", lambda t: t.pop("multi_modal_projector.linear_1.bias"))
        self.add("hf--missing-bias", c, 2, "linear_1.bias deleted (config says the projector has biases)", "hf",
                 reason="missing projector key")  # fmt: skip
        d, c = self._fresh("hf--symlink-loop", b.hf)
        (c / "model.safetensors").unlink()
        (c / "model.safetensors").symlink_to(c / "model.safetensors")
        self.add("hf--symlink-loop", c, 2, "model.safetensors is a symlink to itself", "hf", reason="cannot read")
        d, c = self._fresh("hf--weights-symlink-outside", b.hf)
        outside = d / "elsewhere.safetensors"
        (c / "model.safetensors").rename(outside)
        (c / "model.safetensors").symlink_to(outside)
        self.add("hf--weights-symlink-outside", c, 2, "model.safetensors symlinks outside the checkpoint dir", "hf",
                 reason="outside the checkpoint directory")  # fmt: skip
        d, c = self._fresh("hf--weights-fifo", b.hf)
        (c / "model.safetensors").unlink()
        os.mkfifo(c / "model.safetensors")
        self.add("hf--weights-fifo", c, 2, "model.safetensors is a FIFO (a naive open() blocks forever)", "hf",
                 reason="not a regular file")  # fmt: skip
        d, c = self._fresh("hf--config-invalid-json", b.hf)
        (c / "config.json").write_text('{"model_type": "llava", ')
        self.add("hf--config-invalid-json", c, 2, "config.json cut mid-object", "hf", reason="invalid JSON")
        d, c = self._fresh("hf--config-not-object", b.hf)
        (c / "config.json").write_text("[1, 2, 3]")
        self.add("hf--config-not-object", c, 2, "config.json is a JSON list", "hf", reason="not a JSON object")
        d, c = self._fresh("hf--tokenizer-invalid-json", b.hf)
        (c / "tokenizer.json").write_text('{"model": {"vocab": {"a": 0, ')
        self.add("hf--tokenizer-invalid-json", c, 2, "tokenizer.json cut mid-object", "hf", reason="invalid JSON",
                 **_LENS_ONLY)
        d, c = self._fresh("hf--tokenizer-bad-vocab", b.hf)
        (c / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": -5, "b": 2**62}}}))
        self.add("hf--tokenizer-bad-vocab", c, 2, "tokenizer.json with ids -5 and 2**62", "hf",
                 reason="invalid vocabulary entry", **_LENS_ONLY)  # fmt: skip
        d, c = self._fresh("hf--tokenizer-added-tokens-int", b.hf)
        (c / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 0}}, "added_tokens": 5}))
        self.add("hf--tokenizer-added-tokens-int", c, 2, 'tokenizer.json with "added_tokens": 5', "hf",
                 reason="added_tokens must be a list", **_LENS_ONLY)  # fmt: skip
        d, c = self._fresh("hf--tokenizer-not-object", b.hf)
        (c / "tokenizer.json").write_text("[1, 2, 3]")
        self.add("hf--tokenizer-not-object", c, 2, "tokenizer.json is a JSON list", "hf", reason="no model.vocab",
                 **_LENS_ONLY)
        d, c = self._fresh("hf--config-bad-activation", b.hf)
        cfg = json.loads((c / "config.json").read_text())
        (c / "config.json").write_text(json.dumps({**cfg, "projector_hidden_act": "__import__('os').system"}))
        self.add("hf--config-bad-activation", c, 2, "config names an unknown projector activation", "hf",
                 reason="unsupported projector_hidden_act")  # fmt: skip
        d, c = self._fresh("hf--lm-head-width", b.hf)
        _st_edit_tensors(c / "model.safetensors", lambda t: t.update(
            {"language_model.lm_head.weight": torch.zeros(t["language_model.lm_head.weight"].shape[0], 7)}))
        self.add("hf--lm-head-width", c, 2, "lm_head width 7 differs from the embedding width 24", "hf",
                 reason="lm_head width", **_LENS_ONLY)  # fmt: skip
        for pname in ("os-system", "builtins-exec"):
            name = f"hf--pytorch-model-bin-payload-{pname}"
            d, c = self._fresh(name, b.hf)
            sd = load_file(c / "model.safetensors")
            (c / "model.safetensors").unlink()
            marker = self._payload(c / "pytorch_model.bin", name, pname, sd, "torch")
            self.add(name, c, 2, f"HF LLaVA dir whose weights are a pytorch_model.bin with a {pname} payload "
                     "(what transformers' from_pretrained would load)", "hf", reason="refused to load", marker=marker,
                     payload=c / "pytorch_model.bin")  # fmt: skip

    def _sharded_cases(self) -> None:
        b = self.bases
        shard = _projector_shard(b.hf_sharded)
        d, c = self._fresh("hf-sharded--missing-shard", b.hf_sharded)
        (c / shard).unlink()
        self.add("hf-sharded--missing-shard", c, 2, "the shard holding the projector is gone", "hf-sharded",
                 reason="missing shard")  # fmt: skip
        d, c = self._fresh("hf-sharded--missing-llm-shard", b.hf_sharded)
        (c / _embed_shard(b.hf_sharded)).unlink()
        self.add("hf-sharded--missing-llm-shard", c, 2, "the shard holding embed_tokens/lm_head is gone",
                 "hf-sharded", reason="missing shard", **_LENS_ONLY)  # fmt: skip
        for suffix, name in (("shard-dotdot", "../outside.safetensors"), ("shard-absolute", "/etc/passwd"),
                             ("shard-dotdot-nested", "sub/../../outside.safetensors")):  # fmt: skip
            d, c = self._fresh(f"hf-sharded--{suffix}", b.hf_sharded)
            shutil.copy2(c / shard, d / "outside.safetensors")
            _edit_index(c, lambda i, name=name: i["weight_map"].update({"multi_modal_projector.linear_1.weight": name}))
            self.add(f"hf-sharded--{suffix}", c, 2, f"index maps the projector to {name!r}", "hf-sharded",
                     reason="outside the checkpoint directory")  # fmt: skip
        d, c = self._fresh("hf-sharded--shard-symlink-outside", b.hf_sharded)
        (c / shard).rename(d / "outside.safetensors")
        (c / shard).symlink_to(d / "outside.safetensors")
        self.add("hf-sharded--shard-symlink-outside", c, 2, "projector shard symlinks outside the dir", "hf-sharded",
                 reason="outside the checkpoint directory")  # fmt: skip
        d, c = self._fresh("hf-sharded--shard-symlink-loop", b.hf_sharded)
        (c / shard).unlink()
        (c / shard).symlink_to(c / shard)
        self.add("hf-sharded--shard-symlink-loop", c, 2, "projector shard is a symlink to itself", "hf-sharded",
                 reason="cannot read")  # fmt: skip
        d, c = self._fresh("hf-sharded--index-invalid-json", b.hf_sharded)
        (c / "model.safetensors.index.json").write_text('{"weight_map": {"a": ')
        self.add("hf-sharded--index-invalid-json", c, 2, "index JSON cut mid-object", "hf-sharded",
                 reason="invalid JSON")  # fmt: skip
        d, c = self._fresh("hf-sharded--index-bad-weight-map", b.hf_sharded)
        (c / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": 1}}))
        self.add("hf-sharded--index-bad-weight-map", c, 2, "weight_map maps a name to a number", "hf-sharded",
                 reason="weight_map")  # fmt: skip
        d, c = self._fresh("hf-sharded--index-too-many-shards", b.hf_sharded)
        _edit_index(c, lambda i: i["weight_map"].update({f"t{n}": f"s-{n:06d}.safetensors" for n in range(20_000)}))
        self.add("hf-sharded--index-too-many-shards", c, 2, "index names 20k distinct shard files", "hf-sharded",
                 reason="shard files, more than")  # fmt: skip
        d, c = self._fresh("hf-sharded--key-not-in-shard", b.hf_sharded)
        other = next(n for n in sorted(os.listdir(c)) if n.endswith(".safetensors") and n != shard)
        _edit_index(c, lambda i: i["weight_map"].update({"multi_modal_projector.linear_1.weight": other}))
        self.add("hf-sharded--key-not-in-shard", c, 2, "index maps linear_1.weight to a shard without it",
                 "hf-sharded", reason="not in this shard")  # fmt: skip
        d, c = self._fresh("hf-sharded--nan", b.hf_sharded)

        def nan(t):
            t["multi_modal_projector.linear_2.weight"][1, 1] = float("nan")

        _st_edit_tensors(c / shard, nan)
        self.add("hf-sharded--nan", c, 2, "one NaN in linear_2.weight", "hf-sharded", reason="NaN/inf")

    def _mm_bin_cases(self) -> None:
        b = self.bases
        d, c = self._fresh("mm-bin--symlink-loop", b.mm_bin)
        (c / "mm_projector.bin").unlink()
        (c / "mm_projector.bin").symlink_to(c / "mm_projector.bin")
        self.add("mm-bin--symlink-loop", c, 2, "mm_projector.bin is a symlink to itself", "mm-bin", reason="cannot read")
        d, c = self._fresh("mm-bin--projector-type-mismatch", b.mm_bin)
        (c / "config.json").write_text(json.dumps({"mm_projector_type": "mlp3x_gelu"}))
        self.add("mm-bin--projector-type-mismatch", c, 2, "config says mlp3x_gelu, weights have 2 layers", "mm-bin",
                 reason="mm_projector_type")  # fmt: skip

    def _merger_cases(self) -> None:
        b = self.bases
        q = "visual.merger."
        for suffix, fn, why in (
            ("missing-ln-q", lambda t: t.pop(f"{q}ln_q.weight"), "ln_q.weight deleted"),
            ("norm-width", lambda t: t.update({f"{q}ln_q.weight": torch.ones(7), f"{q}ln_q.bias": torch.zeros(7)}),
             "ln_q width 7 does not divide the MLP input into a square merge"),
            ("norm-nan", lambda t: t[f"{q}ln_q.weight"].fill_(float("nan")), "ln_q.weight all NaN"),
        ):  # fmt: skip
            d, c = self._fresh(f"qwen2-vl-merger--{suffix}", b.merger)
            _st_edit_tensors(c, fn)
            self.add(f"qwen2-vl-merger--{suffix}", c, 2, why, "qwen2-vl-merger")

    def _qwen_dir_cases(self) -> None:
        b = self.bases
        q = QWEN_MERGER
        for suffix, fn, why, reason in (
            ("norm-nan", lambda t: t[f"{q}ln_q.weight"].fill_(float("nan")), "ln_q.weight all NaN", "NaN/inf"),
            ("norm-width", lambda t: t.update({f"{q}ln_q.weight": torch.ones(7), f"{q}ln_q.bias": torch.zeros(7)}),
             "ln_q width 7 does not divide the merger MLP's input into a square 2x2 merge", None),
            ("missing-ln-q", lambda t: t.pop(f"{q}ln_q.weight"), "ln_q.weight deleted (ln_q.bias still there)", None),
            ("merger-wrong-shape", lambda t: t.update({f"{q}mlp.0.weight": torch.zeros(t[f"{q}mlp.0.weight"].shape[0],
                                                                                        t[f"{q}mlp.0.weight"].shape[1] + 4)}),
             "mlp.0.weight takes 4 more inputs than ln_q's width x 4 merged patches", None),
        ):  # fmt: skip
            d, c = self._fresh(f"qwen2-vl-dir--{suffix}", b.qwen)
            _st_edit_tensors(c / "model.safetensors", fn)
            self.add(f"qwen2-vl-dir--{suffix}", c, 2, why, "qwen2-vl-dir", reason=reason)
        d, c = self._fresh("qwen2-vl-dir--merger-truncated", b.qwen)
        _st_cut_inside(c / "model.safetensors", f"{q}mlp.2.weight")
        self.add("qwen2-vl-dir--merger-truncated", c, 2, "file cut half-way through mlp.2.weight (every other tensor "
                 "whole)", "qwen2-vl-dir", reason=f"{q}mlp.2.weight")  # fmt: skip
        for pname in ("os-system", "builtins-exec"):
            name = f"qwen2-vl-dir--pytorch-model-bin-payload-{pname}"
            d, c = self._fresh(name, b.qwen)
            sd = load_file(c / "model.safetensors")
            (c / "model.safetensors").unlink()
            marker = self._payload(c / "pytorch_model.bin", name, pname, sd, "torch")
            self.add(name, c, 2, f"Qwen2-VL dir whose weights are a pytorch_model.bin with a {pname} payload "
                     "(what transformers' from_pretrained would load)", "qwen2-vl-dir", reason="refused to load",
                     marker=marker, payload=c / "pytorch_model.bin")  # fmt: skip

    def _generic_cases(self) -> None:
        d = self.root / "any--empty-dir"
        d.mkdir()
        self.add("any--empty-dir", d, 3, "an empty directory", "any", reason="no projector weights",
                 reasons={"scan": "nothing scannable"})  # fmt: skip
        d = self.root / "any--zero-byte-unknown"
        d.mkdir()
        (d / "weights.dat").write_bytes(b"")
        self.add("any--zero-byte-unknown", d / "weights.dat", 3, "zero-byte file with an unknown suffix", "any")
        d = self.root / "any--junk-dir"
        d.mkdir()
        (d / "README.md").write_text("not a model\n")
        (d / "notes.txt").write_bytes(_RNG.randbytes(64))
        self.add("any--junk-dir", d, 3, "a dir with only non-checkpoint files", "any", reason="no projector weights",
                 reasons={"scan": "nothing scannable"})  # fmt: skip
        d = self.root / "any--symlink-loop-file"
        d.mkdir()
        (d / "loop.safetensors").symlink_to(d / "loop.safetensors")
        self.add("any--symlink-loop-file", d / "loop.safetensors", 2, "the path given is a symlink to itself", "any",
                 reason="cannot read")  # fmt: skip
        d = self.root / "any--random-bytes"
        d.mkdir()
        (d / "model.safetensors").write_bytes(struct.pack("<Q", 40) + _RNG.randbytes(40))
        self.add("any--random-bytes", d / "model.safetensors", 2, "40 random bytes after a valid length", "any")
        d = self.root / "any--payload-side-file"
        d.mkdir()
        marker = self.markers / "any--payload-side-file"
        torch.save({"model": SystemPayload(marker)}, d / "extra.pt")
        self.add("any--payload-side-file", d, 2, "a dir whose only tensor file is a pickle with a payload", "any",
                 reason="refused to load", marker=marker, payload=d / "extra.pt")  # fmt: skip
        d = self.root / "any--header-120k-tensors"
        d.mkdir()
        f = d / "projector.safetensors"
        shutil.copy2(self.bases.bare_st, f)
        header, data = _st_split(f)
        entry = b'":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}'
        blob = json.dumps(header).encode()[:-1] + b"".join(b',"t%d' % i + entry for i in range(120_000)) + b"}"
        _st_write(f, blob, data)
        self.add("any--header-120k-tensors", f, 2, "120k valid empty tensors in a 6.5 MB header (a 100 MB "
                 "header would hold 1.8M: parse-time and memory bomb)", "any", reason="tensor entries allowed")  # fmt: skip


def build_corpus(root: Path) -> list[Case]:
    """Write the hostile corpus under ``root`` (created; must not exist) and return its cases."""
    root = Path(root)
    root.mkdir(parents=True)
    cases = _Corpus(root).build()
    return cases


def build_payload_files(root: Path) -> list[Case]:
    """Only the malicious pickles, in a fresh ``root``: ``mm_projector.bin`` dirs (each payload as a
    torch.save zip, a legacy torch.save and a plain pickle) and HF LLaVA and Qwen2-VL dirs whose weights are a
    ``pytorch_model.bin`` with a payload (what transformers' ``from_pretrained`` would load). Builds
    the pristine bases too (about a second), so every command gets a valid reference and data."""
    root = Path(root)
    root.mkdir(parents=True)
    corpus = _Corpus(root)
    corpus.markers.mkdir()
    corpus.bases.build()
    sd = torch.load(corpus.bases.mm_bin / "mm_projector.bin", weights_only=True)
    # guard and evaluate load a whole HF LLaVA model with transformers, which never opens mm_projector.bin
    not_llava = {"guard": "cannot load as a LLaVA model", "evaluate": "cannot load as a LLaVA model"}
    for pname in PAYLOADS:
        for how in ("torch", "legacy", "plain"):
            name = f"payload-{pname}-{how}"
            d, c = corpus._fresh(name, corpus.bases.mm_bin)
            marker = corpus._payload(c / "mm_projector.bin", name, pname, sd, how)
            corpus.add(name, c, 2, f"{how} pickle with a {pname} payload", "mm-bin", reason="refused to load",
                       marker=marker, payload=c / "mm_projector.bin", reasons=not_llava)  # fmt: skip
    for base, tag, label, family in ((corpus.bases.hf, "hf", "HF LLaVA", "hf"),
                                     (corpus.bases.qwen, "qwen2vl", "Qwen2-VL", "qwen2-vl-dir")):
        base_sd = load_file(base / "model.safetensors")
        for pname in PAYLOADS:
            name = f"payload-{pname}-{tag}-pytorch-model-bin"
            d, c = corpus._fresh(name, base)
            (c / "model.safetensors").unlink()
            marker = corpus._payload(c / "pytorch_model.bin", name, pname, base_sd, "torch")
            corpus.add(name, c, 2, f"{label} dir whose pytorch_model.bin has a {pname} payload", family,
                       reason="refused to load", marker=marker, payload=c / "pytorch_model.bin")  # fmt: skip
    return corpus.cases


# ------------------------------------------------------------------------------------ the runner
READER_SNIPPET = """
import sys
from projlens_defense.checkpoint import detect_format, load_lm_readout, load_projector, load_tokenizer_vocab
from projlens_defense.cli.exits import exception_code
from projlens_defense.errors import ProjlensError
worst = 0
for path in sys.argv[1:]:
    try:
        info = detect_format(path)
        load_projector(info)
        load_lm_readout(info)
        load_tokenizer_vocab(info)
        print(f"{path}: ok, the reader accepted it")
    except ProjlensError as e:
        print(f"error: {e}", file=sys.stderr)
        worst = max(worst, exception_code(e))
sys.exit(worst)
"""

# name -> CLI arguments. {ckpt}: the case path, {out}: a fresh output path (with the input's suffix
# when the input is a file: sanitize keeps the file type), {ref}: the pristine reference of the
# case's family, {data}: a small LLaVA conversation JSON, {images}: its folder of PNGs. "reader" is
# the checkpoint reader alone (detect_format, load_projector, load_lm_readout, load_tokenizer_vocab)
# with the CLI's exception -> exit code mapping.
COMMANDS: dict[str, list[str]] = {
    "reader": [],
    "scan": ["scan", "{ckpt}"],
    "analyze": ["analyze", "{ckpt}", "--reference", "{ref}", "--out", "{out}", "--data", "{data}", "--probes", "{data}",
                "--n-probes", "4", "--max-test", "4", "--k", "0,1"],
    "sanitize": ["sanitize", "{ckpt}", "--reference", "{ref}", "--out", "{out}"],
}
# The other commands that take a checkpoint path; run on the malicious pickles only (they end in
# the same reader, or in transformers' from_pretrained, which must not run a payload either).
PAYLOAD_COMMANDS: dict[str, list[str]] = {
    "calibrate": ["calibrate", "{ckpt}", "--reference", "{ref}", "--out", "{out}.json"],
    "guard": ["guard", "{ckpt}", "--images", "{images}", "--reference", "{ref}", "--probes", "{data}", "--n-probes", "4"],
    "evaluate": ["evaluate", "{ckpt}", "--data", "{data}"],
}


def output_path(workdir: Path, command: str, case: Case) -> Path:
    """Where ``command`` writes its output for ``case`` (keeps the input's suffix for a file input)."""
    suffix = case.path.suffix if case.path.suffix and not case.path.is_dir() else ""
    return workdir / f"out-{command}-{case.name}{suffix}"


def command_args(command: str, case: Case, out: Path) -> list[str]:
    """The CLI arguments of ``command`` on ``case`` (not for ``reader``)."""
    template = COMMANDS.get(command) or PAYLOAD_COMMANDS[command]
    data = case.data or Path("/nonexistent/data.json")
    values = {"ckpt": case.path, "out": out, "ref": case.reference or "/nonexistent/reference", "data": data,
              "images": data.parent / "images"}  # fmt: skip
    return [a.format(**values) for a in template]


def command_argv(command: str, case: Case, out: Path) -> list[str]:
    """The child's argv for ``command`` on ``case``."""
    if command == "reader":
        return [sys.executable, "-c", READER_SNIPPET, str(case.path)]
    return [sys.executable, "-m", "projlens_defense", *command_args(command, case, out)]


@dataclass
class RunResult:
    command: str
    case: str
    returncode: int
    stdout: str
    stderr: str
    wall_s: float
    peak_rss_mb: float
    timed_out: bool
    out: Path | None = None

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    return env


# Runs argv as a grandchild and writes {"rc", "maxrss_kb"} to argv[1]. The indirection matters:
# ru_maxrss survives exec, so a child forked straight from a torch-loaded parent (the test run)
# would report the parent's RSS; forked from this small interpreter it reports its own.
_WRAPPER = """
import json, os, subprocess, sys
p = subprocess.Popen(sys.argv[2:])
_, status, ru = os.wait4(p.pid, 0)
rc = os.waitstatus_to_exitcode(status)
with open(sys.argv[1], "w") as f:
    json.dump({"rc": rc, "maxrss_kb": ru.ru_maxrss}, f)
sys.exit(rc if rc >= 0 else 128 - rc)
"""


def run_child(argv: list[str], cwd: Path, timeout: float = TIMEOUT_S) -> tuple[int, str, str, float, float, bool]:
    """Run ``argv``; (exit code, stdout, stderr, wall s, peak RSS MB of the child, timed out?).

    The child runs in its own session under a tiny wrapper (see ``_WRAPPER``) that reports its
    exact peak RSS; on timeout the whole session is killed.
    """
    with tempfile.TemporaryFile() as fo, tempfile.TemporaryFile() as fe, tempfile.TemporaryDirectory() as td:
        info = Path(td) / "rusage.json"
        t0 = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-c", _WRAPPER, str(info), *argv], stdout=fo, stderr=fe,
                                stdin=subprocess.DEVNULL, cwd=cwd, env=child_env(), start_new_session=True)  # fmt: skip
        timed_out = False
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        wall = time.monotonic() - t0
        rc, rss_mb = proc.returncode, float("nan")
        if info.exists():
            data = json.loads(info.read_text())
            rc, rss_mb = data["rc"], data["maxrss_kb"] / 1024
        fo.seek(0)
        fe.seek(0)
        out, err = fo.read().decode(errors="replace"), fe.read().decode(errors="replace")
    return rc, out, err, wall, rss_mb, timed_out


def run_case(command: str, case: Case, workdir: Path, timeout: float | None = None) -> RunResult:
    """Run ``command`` on ``case`` in a child process whose cwd is ``workdir`` (created if needed)."""
    workdir.mkdir(parents=True, exist_ok=True)
    out = output_path(workdir, command, case)
    rc, so, se, wall, rss, to = run_child(command_argv(command, case, out), workdir, timeout or case.time_limit)
    return RunResult(command, case.name, rc, so, se, wall, rss, to, out)


def invoke(command: str, case: Case, workdir: Path) -> RunResult:
    """Run ``command`` on ``case`` in this process (click's CliRunner; the reader directly).

    An exception escaping the CLI is reported in ``stderr`` as ``Traceback``-marked text, so the
    same ``problems`` check applies; RSS is not measured (NaN is ignored by ``problems(in_process)``).
    """
    out = output_path(workdir, command, case)
    t0 = time.monotonic()
    if command == "reader":
        try:
            code, msg = read_in_process(case.path)
        except Exception as e:  # noqa: BLE001 - the point: nothing but ProjlensError may escape
            code, msg = -1, f"Traceback: {type(e).__name__} escaped: {e}"
        so, se = (msg + "\n", "") if code == 0 else ("", msg + "\n")
    else:
        from click.testing import CliRunner

        from projlens_defense.cli import main

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = CliRunner().invoke(main, command_args(command, case, out))
        code, so, se = res.exit_code, res.stdout, res.stderr
        if res.exception is not None and not isinstance(res.exception, SystemExit):
            se += f"\nTraceback: {type(res.exception).__name__} escaped: {res.exception}\n"
        # what a child process would print on stderr (its default filters hide these categories)
        se += "".join(f"{w.category.__name__}: {w.message}\n" for w in caught if not issubclass(w.category, _HIDDEN))
    return RunResult(command, case.name, code, so, se, time.monotonic() - t0, float("nan"), False, out)


_HIDDEN = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


PROCESSED = {0, 1, 5}
"""Exit codes that mean the command went through its input: 1 a suspicious scan verdict, 5 an inconclusive one
(the corpus has no calibration for its bases' models)."""


def allowed_codes(case: Case, command: str) -> set[int]:
    """Any of :data:`PROCESSED` means "processed"; errors must match exactly."""
    code = case.expected_for(command)
    return PROCESSED if code in (0, 1) else {code}


def problems(res: RunResult, case: Case, markers: Path, in_process: bool = False) -> list[str]:
    """Everything wrong with one run, as readable strings (empty: the run handled the case).

    Exit code and message (one stderr line naming the file and containing the expected reason;
    for a success, the reason on some line and nothing on stderr), no traceback, no marker file,
    time and memory, and the output: nothing left behind after a failure; after a successful
    ``sanitize`` a complete output that loads (``check_sanitized``), after ``analyze`` its report.
    """
    bad = []
    cmd = res.command
    if res.timed_out:
        bad.append(f"timed out after {case.time_limit:g} s")
    if res.returncode not in allowed_codes(case, cmd):
        bad.append(f"exit code {res.returncode}, expected {case.expected_for(cmd)}: {res.output.strip()[-200:]!r}")
    if "Traceback" in res.output:
        bad.append(f"traceback in the output: {res.output.strip()[-300:]!r}")
    if "internal error" in res.output:
        bad.append("an exception escaped the reader (reported as an internal error)")
    failed = res.returncode not in PROCESSED
    if failed and not any(case.must_name() in ln for ln in res.output.splitlines()):
        bad.append(f"no line of the output names {case.must_name()}: {res.output.strip()[-200:]!r}")
    reason = case.reason_for(cmd)
    if reason and not any(reason in ln and case.must_name() in ln for ln in res.output.splitlines()):
        bad.append(f"no line names {case.must_name()} with the reason {reason!r}: {res.output.strip()[-200:]!r}")
    err_lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    if not failed and err_lines:
        bad.append(f"success, but stderr is not empty: {err_lines[:3]}")
    elif len(err_lines) > 1:
        bad.append(f"{len(err_lines)} lines on stderr, not a one-line reason: {err_lines[:3]}")
    leaked = sorted(p.name for p in markers.iterdir()) if markers.is_dir() else []
    if leaked:
        bad.append(f"payload ran: marker file(s) {leaked}")
    if not in_process and not res.peak_rss_mb <= MAX_RSS_MB:  # NaN (not measured) fails too
        bad.append(f"peak RSS {res.peak_rss_mb:.0f} MB > {MAX_RSS_MB} MB")
    if res.wall_s > case.time_limit:
        bad.append(f"took {res.wall_s:.1f} s")
    if res.out is not None and cmd in ("sanitize", "analyze"):
        bad += check_output(cmd, case, res.out, res.returncode)
    return bad


# ------------------------------------------------------------------------------- output checks
def _leftovers(out: Path) -> list[str]:
    """Hidden temporary siblings the atomic writer may leave (``.NAME.tmp-*``, ``.NAME.old-*``)."""
    return sorted(p.name for p in out.parent.glob(f".{out.name}.*")) if out.parent.is_dir() else []


def check_output(command: str, case: Case, out: Path, code: int) -> list[str]:
    """What is wrong with what ``command`` left at ``out`` after exiting with ``code``."""
    bad = [f"temporary files left beside the output: {left}" for left in [_leftovers(out)] if left]
    if code not in PROCESSED:
        if os.path.lexists(out):
            bad.append(f"failed, but left an output behind at {out}")
        return bad
    if command == "analyze":
        if not (out / "report.md").is_file() or not (out / "report.json").is_file():
            bad.append(f"analyze succeeded but {out} has no report.md / report.json")
        return bad
    return bad + check_sanitized(case.path, out)


def _files(path: Path) -> dict[str, Path]:
    """Regular files under dir ``path`` (symlinks to files count, as the writer dereferences them)."""
    found = {}
    for dirpath, _, names in os.walk(path):
        for n in names:
            f = Path(dirpath) / n
            if f.is_file():
                found[str(f.relative_to(path))] = f
    return found


def check_sanitized(src: Path, out: Path) -> list[str]:
    """A successful sanitize: ``out`` is a complete copy of ``src`` in the same layout (same file
    names; every file that holds no projector tensor byte-identical) whose projector loads, with
    the source's keys and shapes and finite values."""
    from projlens_defense.checkpoint import detect_format, load_projector
    from projlens_defense.errors import ProjlensError

    if not out.exists():
        return [f"sanitize succeeded but wrote nothing at {out}"]
    if out.is_dir() != src.is_dir():
        return [f"{out}: output is a {'dir' if out.is_dir() else 'file'}, the source is not"]
    try:
        info = detect_format(src)
        before = load_projector(info).state_dict()
        after = load_projector(out).state_dict()
    except ProjlensError as e:
        return [f"the sanitized output does not load: {e}"]
    bad = []
    if {k: tuple(v.shape) for k, v in before.items()} != {k: tuple(v.shape) for k, v in after.items()}:
        bad.append("the sanitized projector's keys or shapes differ from the source's")
    if not all(bool(torch.isfinite(v).all()) for v in after.values()):
        bad.append("the sanitized projector has NaN/inf values")
    if src.is_dir():
        a, b = _files(src), _files(out)
        if set(a) != set(b):
            bad.append(f"output files differ from the source's: missing {sorted(set(a) - set(b))[:4]}, "
                       f"extra {sorted(set(b) - set(a))[:4]}")  # fmt: skip
        rewritten = {str(f.relative_to(src)) for f in info.files}
        changed = [n for n in sorted(set(a) & set(b) - rewritten) if a[n].read_bytes() != b[n].read_bytes()]
        if changed:
            bad.append(f"files without projector tensors changed: {changed[:4]}")
    return bad


def snapshot(root: Path) -> dict[str, str]:
    """What every entry under ``root`` is (sha256 of a file, a link's target, "fifo", "dir"), without
    following links or opening anything but regular files; the marker dir is left out."""
    out = {}
    for dirpath, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if Path(dirpath, d) != marker_dir(root)]
        for n in dirs + names:
            p = Path(dirpath) / n
            st = os.lstat(p)
            rel = str(p.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = "link:" + os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[rel] = "dir" if stat.S_ISDIR(st.st_mode) else f"mode {st.st_mode:o}"
    return out


# ----------------------------------------------------------------------------- in process, pristine
def read_in_process(path: Path) -> tuple[int, str]:
    """The ``reader`` command in this process: (exit code, one-line message or "ok")."""
    from projlens_defense import checkpoint as ck
    from projlens_defense.cli.exits import exception_code
    from projlens_defense.errors import ProjlensError

    try:
        info = ck.detect_format(path)
        ck.load_projector(info)
        ck.load_lm_readout(info)
        ck.load_tokenizer_vocab(info)
    except ProjlensError as e:
        return exception_code(e), f"error: {e}"
    return 0, f"{path}: ok, the reader accepted it"


def pristine_cases(root: Path) -> list[Case]:
    """The unmodified bases the corpus was built from, as cases every command must process (exit 0,
    or 1 for a suspicious scan verdict), so that a hostile case's error is due to its damage.

    Documented exceptions: ``scan`` without ``--reference`` cannot score a projector that comes
    without its LLM (reference-free mode reads the LLM's lm_head), and ``analyze`` runs the
    projector inside a LLaVA model, which a Qwen2-VL merger is not.
    """
    b = _Bases(Path(root) / "_base")
    no_llm = {"exits": {"scan": 2}, "reasons": {"scan": "reference-free"}}
    bases = [("hf", b.hf, "hf", {}), ("hf-sharded", b.hf_sharded, "hf-sharded", {}),
             ("mm-bin", b.mm_bin, "mm-bin", no_llm), ("mm-safetensors", b.mm_st, "mm-safetensors", no_llm),
             ("qwen2-vl-merger", b.merger, "qwen2-vl-merger",
              {"exits": {"scan": 2, "analyze": 4}, "reasons": {**no_llm["reasons"], "analyze": "LLaVA"}}),
             ("qwen2-vl-dir", b.qwen, "qwen2-vl-dir", {}),
             ("bare-safetensors", b.bare_st, "bare-safetensors", no_llm), ("bare-pt", b.bare_pt, "bare-pt", no_llm)]  # fmt: skip
    return [Case(f"pristine-{name}", path, 0, f"the unmodified {fam} base", fam, reference=b.reference_for(fam),
                 data=b.data, time_limit=PRISTINE_TIMEOUT_S, **kw) for name, path, fam, kw in bases]  # fmt: skip
