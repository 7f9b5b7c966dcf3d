"""Where a checkpoint's tensors live: one safetensors file, a sharded set, or a torch pickle.

A :class:`TensorContainer` answers "which keys exist, with which shape and dtype" from headers
only, reads single tensors on demand and counts the tensor bytes it read. Paths inside a
checkpoint directory are confined to it (a shard name cannot point elsewhere).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from projlens_defense.checkpoint.pickle_io import load_pickle, tensor_dict
from projlens_defense.checkpoint.safetensors_io import (
    LazyReader,
    SafetensorsHeader,
    open_regular_file,
    parse_header,
)
from projlens_defense.errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
MAX_JSON_BYTES = 100 * 1024 * 1024
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
MAX_SHARDS = 10_000  # distinct shard files an index may name (real ones: a few hundred at most)
MAX_INDEX_ENTRIES = 1_000_000  # tensors an index may list (real ones: ~100k at most); ~4 us each to check


def stat_path(path: Path) -> os.stat_result:
    """``os.stat`` with a one-line CheckpointError (missing, permission denied, symlink loop...)."""
    try:
        return os.stat(path)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None


def allowed_roots(root: Path) -> list[str]:
    """Real paths files of checkpoint dir ``root`` may resolve into.

    The dir itself, plus, for a Hugging Face hub cache snapshot (``models--x/snapshots/<rev>``),
    the repo's ``blobs`` dir that the snapshot's symlinks point into.
    """
    roots = [os.path.realpath(root)]
    if root.parent.name == "snapshots":
        blobs = root.parent.parent / "blobs"
        if blobs.is_dir():
            roots.append(os.path.realpath(blobs))
    return roots


def inside(root: Path, name: str, what: str = "file") -> Path:
    """``root/name`` after refusing absolute names, ``..`` and anything resolving outside root."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise CheckpointError(f"{root}: invalid {what} name {name!r}")
    p = Path(name)
    if p.is_absolute() or name.startswith(("/", "\\")) or ".." in p.parts or ".." in name.split("\\"):
        raise CheckpointError(
            f"{root}: refusing {what} name {name!r}: it points outside the checkpoint directory"
        )
    full = root / p
    real = os.path.realpath(full)
    if not any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in allowed_roots(root)):
        raise CheckpointError(
            f"{root}: refusing {what} {name!r}: it resolves outside the checkpoint directory"
        )
    return full


def read_json(path: Path, limit: int = MAX_JSON_BYTES) -> Any:
    """Parse a small JSON file (never executes anything); one-line CheckpointError on failure."""
    fh, size = open_regular_file(path)
    with fh:
        if size > limit:
            raise CheckpointError(f"{path}: {size} bytes, larger than the {limit} byte limit for JSON files")
        try:
            raw = fh.read(limit + 1)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise CheckpointError(f"{path}: invalid JSON ({reason})") from None


@dataclass(frozen=True)
class TensorMeta:
    """Shape and dtype of a stored tensor, known without reading its data."""

    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name, or str(torch dtype) for pickles


class TensorContainer:
    """Tensors of one checkpoint, read lazily; ``bytes_read`` counts tensor bytes read so far."""

    def __init__(self, kind: str, files: list[Path], root: Path | None) -> None:
        self.kind = kind  # "safetensors" | "sharded-safetensors" | "pickle"
        self.files = files
        self.root = root
        self.bytes_read = 0
        self.weight_map: dict[str, Path] = {}
        self._headers: dict[Path, SafetensorsHeader] = {}
        self.pickle_obj: object = None
        self.pickle_tensors: dict[str, torch.Tensor] = {}
        self.pickle_nest: str | None = None
        self.index_path: Path | None = None
        self.is_main = False  # the HF model weights of a dir (index or model.safetensors)

    # ------------------------------------------------------------ builders
    @classmethod
    def from_safetensors(cls, path: Path, root: Path | None = None) -> TensorContainer:
        c = cls("safetensors", [path], root)
        header = parse_header(path)
        c._headers[path] = header
        c.weight_map = dict.fromkeys(header.tensors, path)
        return c

    @classmethod
    def from_index(cls, root: Path) -> TensorContainer:
        index_path = inside(root, INDEX_NAME)
        index = read_json(index_path)
        wmap = index.get("weight_map") if isinstance(index, dict) else None
        if isinstance(wmap, dict) and len(wmap) > MAX_INDEX_ENTRIES:
            raise CheckpointError(
                f"{index_path}: the index lists {len(wmap)} tensors, more than the {MAX_INDEX_ENTRIES} allowed"
            )
        if not isinstance(wmap, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in wmap.items()
        ):
            raise CheckpointError(
                f"{index_path}: invalid index: 'weight_map' must map tensor names to shard files"
            )
        names = set(wmap.values())
        if len(names) > MAX_SHARDS:  # each name costs a realpath(): 20k names took seconds
            raise CheckpointError(
                f"{index_path}: the index names {len(names)} shard files, more than the {MAX_SHARDS} allowed"
            )
        shard_paths: dict[str, Path] = {}
        for name in sorted(names):
            shard_paths[name] = inside(root, name, "shard")
        c = cls("sharded-safetensors", list(shard_paths.values()), root)
        c.index_path = index_path
        c.weight_map = {k: shard_paths[v] for k, v in wmap.items()}
        return c

    @classmethod
    def from_pickle(cls, path: Path, root: Path | None = None) -> TensorContainer:
        c = cls("pickle", [path], root)
        c.pickle_obj = load_pickle(path)
        c.pickle_tensors, c.pickle_nest = tensor_dict(path, c.pickle_obj)
        c.bytes_read = stat_path(path).st_size  # a pickle is always read whole
        return c

    # ------------------------------------------------------------- queries
    def keys(self) -> set[str]:
        return set(self.pickle_tensors) if self.kind == "pickle" else set(self.weight_map)

    def header(self, path: Path) -> SafetensorsHeader:
        """The validated header of shard ``path`` (parsed once, on first use)."""
        h = self._headers.get(path)
        if h is None:
            if not os.path.lexists(path):
                where = f"{self.index_path}: " if self.index_path else ""
                raise CheckpointError(f"{where}missing shard {path.name!r} (expected at {path})")
            h = self._headers[path] = parse_header(path)
        return h

    def file_of(self, key: str) -> Path:
        if self.kind == "pickle":
            return self.files[0]
        try:
            return self.weight_map[key]
        except KeyError:
            raise CheckpointError(
                f"{self.files[0] if self.files else self.root}: tensor {key!r} not found"
            ) from None

    def meta(self, key: str) -> TensorMeta:
        if self.kind == "pickle":
            t = self.pickle_tensors[key]
            return TensorMeta(tuple(t.shape), str(t.dtype))
        path = self.file_of(key)
        entry = self.header(path).tensors.get(key)
        if entry is None:
            raise CheckpointError(f"{path}: tensor {key!r} listed in the index is not in this shard")
        return TensorMeta(entry.shape, entry.dtype)

    def read(self, key: str) -> torch.Tensor:
        """One tensor in its stored dtype, reading only its bytes."""
        if self.kind == "pickle":
            try:
                return self.pickle_tensors[key]
            except KeyError:
                raise CheckpointError(f"{self.files[0]}: tensor {key!r} not found") from None
        path = self.file_of(key)
        self.meta(key)  # validates header + presence
        reader = LazyReader(path, self.header(path))
        tensor = reader.get(key)
        self.bytes_read += reader.bytes_read
        return tensor
