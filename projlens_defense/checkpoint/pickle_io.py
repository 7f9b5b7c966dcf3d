"""Torch pickles, opened only with ``torch.load(weights_only=True)``.

A pickle can name any Python callable; ``weights_only`` restricts it to tensors and plain
containers, and every refusal or corruption becomes a one-line CheckpointError.
"""

from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from pathlib import Path

import torch

from projlens_defense.checkpoint.safetensors_io import open_regular_file
from projlens_defense.errors import CheckpointError

_GLOBAL_RE = re.compile(r"GLOBAL\s+([\w.]+)")
_NESTED_KEYS = ("state_dict", "model", "module")


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[0] if lines else type(e).__name__)[:300]


def _check_zip(path: Path, fh, size: int) -> None:
    """Refuse a torch zip whose records are compressed or claim more bytes than the file holds.

    ``torch.save`` stores records uncompressed, but ``torch.load`` inflates deflated ones: a
    few-MB file could otherwise decompress to gigabytes of "weights".
    """
    try:
        if fh.read(4) != b"PK\x03\x04":  # torch's own zip test; legacy pickles are bounded by the file size
            return
        with zipfile.ZipFile(fh) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as e:
        raise CheckpointError(f"{path}: not a valid torch pickle (bad zip archive: {_first_line(e)})") from None
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(
                f"{path}: refused to load: zip record {info.filename!r} is compressed (torch.save never "
                "compresses; it could be a decompression bomb)"
            )
        if info.file_size > size:
            raise CheckpointError(
                f"{path}: refused to load: zip record {info.filename!r} claims {info.file_size} bytes, "
                f"more than the file's {size}"
            )


def load_pickle(path: Path | str) -> object:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with one-line errors."""
    path = Path(path)
    fh, size = open_regular_file(path)  # refuses FIFOs/devices/missing paths before torch opens it
    with fh:
        _check_zip(path, fh, size)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "weights only" not in msg.lower() and "weightsunpickler" not in msg.lower():
            raise CheckpointError(f"{path}: not a valid torch pickle ({_first_line(e)})") from None
        m = _GLOBAL_RE.search(msg)
        if m:
            raise CheckpointError(
                f"{path}: refused to load: the pickle references a forbidden global ({m.group(1)}), "
                "it may try to run code"
            ) from None
        detail = next((ln.strip() for ln in msg.splitlines() if ln.strip().startswith("Unsupported")), "")
        raise CheckpointError(
            f"{path}: refused to load: the pickle uses a construct not allowed for weights"
            + (f" ({detail[:200]})" if detail else "")
        ) from None
    except Exception as e:  # RuntimeError (bad zip), EOFError (truncated), ValueError, OSError...
        raise CheckpointError(
            f"{path}: not a valid torch pickle ({type(e).__name__}: {_first_line(e)})"
        ) from None


def tensor_dict(path: Path | str, obj: object) -> tuple[dict[str, torch.Tensor], str | None]:
    """The str->Tensor entries of a loaded pickle, and the nesting key they sat under (or None).

    Non-tensor entries are ignored; a dict holding its tensors under ``state_dict``/``model``/
    ``module`` is unwrapped.
    """
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: the pickle holds a {type(obj).__name__}, not a state dict")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if tensors:
        return tensors, None
    for key in _NESTED_KEYS:
        inner = obj.get(key)
        if isinstance(inner, dict):
            tensors = {k: v for k, v in inner.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
            if tensors:
                return tensors, key
    return {}, None
