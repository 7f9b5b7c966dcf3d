"""Hardened, lazy safetensors access.

The header is parsed and checked by hand before ``safe_open`` ever sees the file, so a hostile
file cannot make us allocate a huge buffer, read past its end or hang; then only the tensors a
caller asks for are read.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from projlens_defense.errors import CheckpointError

MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_NDIM = 32
MAX_TENSORS = 100_000  # per file; real checkpoints hold a few thousand, parsing costs ~30 us and ~1 KB each
MAX_DIM = 1 << 40

# safetensors dtype name -> (bits per element, torch dtype or None if torch lacks it)
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}  # fmt: skip


@dataclass(frozen=True)
class TensorEntry:
    """One tensor's header entry; ``begin``/``end`` are offsets into the data section."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass
class SafetensorsHeader:
    """A validated header: the tensors, the ``__metadata__`` dict and where the data starts."""

    path: Path
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str] | None
    data_start: int
    file_size: int
    header_len: int = 0
    raw: bytes = field(default=b"", repr=False)


def _fail(path: Path | str, reason: str) -> CheckpointError:
    return CheckpointError(f"{path}: {reason}")


def open_regular_file(path: Path) -> tuple[Any, int]:
    """Open ``path`` for binary reading after checking it is a regular file; return (fh, size).

    Refusing FIFOs, devices and directories keeps a read from blocking forever or never ending.
    """
    try:
        st = os.stat(path)
    except OSError as e:
        raise _fail(path, f"cannot read: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise _fail(path, "not a regular file")
    try:
        fh = open(path, "rb")  # noqa: SIM115 - caller closes
    except OSError as e:
        raise _fail(path, f"cannot read: {e.strerror or e}") from None
    return fh, st.st_size


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def parse_header(path: Path | str) -> SafetensorsHeader:
    """Read and validate a safetensors header without trusting any number in it."""
    path = Path(path)
    fh, size = open_regular_file(path)
    with fh:
        try:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise _fail(path, f"truncated: {size} bytes, too short for a safetensors header")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_BYTES:
                raise _fail(
                    path, f"declared header length {n} bytes exceeds the {MAX_HEADER_BYTES} byte limit"
                )
            if 8 + n > size:
                raise _fail(path, f"truncated: declared header length {n} exceeds the file size {size}")
            raw = fh.read(n)
        except OSError as e:
            raise _fail(path, f"cannot read: {e.strerror or e}") from None
    if len(raw) != n:
        raise _fail(path, "truncated while reading the header")
    objects = raw.count(b"{")  # >= the number of tensor entries (each is an object); bounds parse time
    if objects > MAX_TENSORS + 2:
        raise _fail(path, f"header has {objects} JSON objects, more than the {MAX_TENSORS} tensor entries allowed")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise _fail(path, f"not a safetensors file: header is not valid JSON ({reason})") from None
    if not isinstance(header, dict):
        raise _fail(path, "not a safetensors file: header is not a JSON object")

    data_start = 8 + n
    data_len = size - data_start
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise _fail(path, "invalid __metadata__: must map strings to strings")

    tensors: dict[str, TensorEntry] = {}
    for name, entry in header.items():
        tensors[name] = _check_entry(path, name, entry, data_len)
    spans = sorted((t.begin, t.end, k) for k, t in tensors.items() if t.end > t.begin)
    for (_, prev_end, prev), (begin, _, cur) in zip(spans, spans[1:], strict=False):
        if begin < prev_end:
            raise _fail(path, f"tensors {prev!r} and {cur!r} overlap in the data section")
    return SafetensorsHeader(path, tensors, metadata, data_start, size, n, raw)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_entry(path: Path, name: str, entry: Any, data_len: int) -> TensorEntry:
    if not isinstance(entry, dict):
        raise _fail(path, f"tensor {name!r}: header entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise _fail(path, f"tensor {name!r}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or len(shape) > MAX_NDIM or not all(_is_int(d) and d >= 0 for d in shape):
        raise _fail(
            path, f"tensor {name!r}: shape must be a list of non-negative integers, got {shape!r}"[:300]
        )
    if any(d > MAX_DIM for d in shape):
        raise _fail(path, f"tensor {name!r}: absurd dimension in shape {shape}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise _fail(path, f"tensor {name!r}: data_offsets must be two integers, got {offsets!r}"[:300])
    begin, end = offsets
    if not 0 <= begin <= end <= data_len:
        raise _fail(
            path,
            f"tensor {name!r}: data_offsets [{begin}, {end}] fall outside the {data_len}-byte data section "
            "(truncated file?)",
        )
    numel = 1
    for d in shape:
        numel *= d
    bits = numel * DTYPE_BITS[dtype]
    if bits % 8 or bits // 8 != end - begin:
        raise _fail(
            path,
            f"tensor {name!r}: shape {shape} of {dtype} needs {bits / 8:g} bytes but data_offsets "
            f"span {end - begin}",
        )
    return TensorEntry(dtype, tuple(shape), begin, end)


class LazyReader:
    """Reads single tensors from one validated safetensors file and counts the bytes read."""

    def __init__(self, path: Path | str, header: SafetensorsHeader | None = None) -> None:
        self.path = Path(path)
        self.header = header or parse_header(self.path)
        self.bytes_read = 0

    def keys(self) -> list[str]:
        return list(self.header.tensors)

    def __contains__(self, key: str) -> bool:
        return key in self.header.tensors

    def get(self, key: str) -> torch.Tensor:
        """The tensor ``key`` (original dtype), read with ``safe_open(...).get_tensor``."""
        entry = self.header.tensors.get(key)
        if entry is None:
            raise _fail(self.path, f"tensor {key!r} not found")
        try:
            from safetensors import safe_open

            with safe_open(str(self.path), framework="pt", device="cpu") as f:
                tensor = f.get_tensor(key)
        except Exception as e:  # safetensors raises SafetensorError/OSError/RuntimeError/TypeError
            reason = (str(e).splitlines() or [type(e).__name__])[0][:300]
            raise _fail(self.path, f"cannot read tensor {key!r}: {reason}") from None
        if tuple(tensor.shape) != entry.shape:
            raise _fail(self.path, f"tensor {key!r} changed while reading (shape {tuple(tensor.shape)})")
        self.bytes_read += entry.nbytes
        return tensor

    def raw_bytes(self, key: str) -> bytes:
        """The exact stored bytes of ``key``; used to verify bit-identity."""
        entry = self.header.tensors[key]
        fh, _ = open_regular_file(self.path)
        with fh:
            fh.seek(self.header.data_start + entry.begin)
            data = fh.read(entry.nbytes)
        if len(data) != entry.nbytes:
            raise _fail(self.path, f"truncated while reading tensor {key!r}")
        return data


TORCH_TO_ST: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}  # fmt: skip
for _name, _st in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("uint16", "U16"),
                   ("uint32", "U32"), ("uint64", "U64")):  # fmt: skip
    if hasattr(torch, _name):
        TORCH_TO_ST[getattr(torch, _name)] = _st
