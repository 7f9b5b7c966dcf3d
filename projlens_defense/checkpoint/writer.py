"""Write a repaired projector back in the source checkpoint's own format, atomically.

Everything is built in a hidden temporary sibling of the output and renamed into place at the
end, so a failure never leaves a half-written checkpoint; the source is only ever read.
Safetensors files are copied and only the projector tensors' byte ranges are overwritten, so the
header, ``__metadata__`` and every other tensor stay bit-identical.
"""

from __future__ import annotations

import os
import pickle
import shutil
import stat
import sys
import uuid
from pathlib import Path

import torch

from projlens_defense.checkpoint.container import allowed_roots, stat_path
from projlens_defense.checkpoint.pickle_io import load_pickle
from projlens_defense.checkpoint.reader import CheckpointInfo, detect_format, load_projector
from projlens_defense.checkpoint.safetensors_io import TORCH_TO_ST, open_regular_file, parse_header
from projlens_defense.errors import CheckpointError, ProjlensError, UsageError
from projlens_defense.projector import Projector

_CHUNK = 16 * 1024 * 1024


def _is_within(child: str, parent: str) -> bool:
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def _check_paths(src: Path, out: Path, force: bool) -> None:
    rs, ro = os.path.realpath(src), os.path.realpath(out)
    if _is_within(ro, rs):
        raise UsageError(f"{out}: the output must not be the source checkpoint or lie inside it ({src})")
    if os.path.lexists(out):
        if not force:
            raise UsageError(f"{out}: already exists; pass force=True (--force) to replace it")
        if _is_within(rs, ro):
            raise UsageError(f"{out}: refusing to replace it: it contains the source checkpoint {src}")
    parent = out.parent
    if not parent.is_dir():
        raise UsageError(f"{out}: parent directory {parent} does not exist")


def _check_projector(info: CheckpointInfo, new: dict[str, torch.Tensor], out: Path) -> None:
    c = info.tensors
    assert c is not None
    expected = set(info.projector_keys())
    if set(new) != expected:
        extra, missing = sorted(set(new) - expected), sorted(expected - set(new))
        raise UsageError(
            f"{out}: the projector does not match {info.path} (keys not in the source: {extra[:4]}, "
            f"source keys not provided: {missing[:4]}); was it read from another checkpoint?"
        )
    for key, t in new.items():
        meta = c.meta(key)
        if tuple(t.shape) != meta.shape:
            raise UsageError(f"{out}: {key} has shape {tuple(t.shape)} but the source has {meta.shape}")
        stored = str(t.dtype) if c.kind == "pickle" else TORCH_TO_ST.get(t.dtype)
        if stored != meta.dtype:
            raise UsageError(f"{out}: {key} has dtype {t.dtype} but the source stores {meta.dtype}")


def _copy_file(src: Path, dst: Path) -> None:
    fh, _ = open_regular_file(src)
    with fh, open(dst, "xb") as fo:
        shutil.copyfileobj(fh, fo, _CHUNK)
        fo.flush()
        os.fsync(fo.fileno())


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _patch_safetensors(src: Path, dst: Path, new: dict[str, torch.Tensor]) -> None:
    """Copy ``src`` to ``dst`` and overwrite the byte ranges of the tensors in ``new``."""
    if sys.byteorder != "little":
        raise CheckpointError(f"{dst}: writing safetensors needs a little-endian machine")
    header = parse_header(src)
    _copy_file(src, dst)
    with open(dst, "r+b") as fo:
        for key, t in new.items():
            entry = header.tensors[key]
            data = _tensor_bytes(t)
            if len(data) != entry.nbytes:
                raise CheckpointError(f"{src}: {key}: {len(data)} new bytes for a {entry.nbytes}-byte slot")
            fo.seek(header.data_start + entry.begin)
            fo.write(data)
        fo.flush()
        os.fsync(fo.fileno())


def _write_pickle(src: Path, dst: Path, new: dict[str, torch.Tensor]) -> None:
    """Re-save the source pickle's dict with the projector entries replaced (keys, order kept)."""
    obj = load_pickle(src)
    target = obj
    if isinstance(obj, dict) and not any(k in obj for k in new):
        for nest in ("state_dict", "model", "module"):
            if isinstance(obj.get(nest), dict):
                target = obj[nest]
                break
    if not isinstance(target, dict):
        raise CheckpointError(f"{src}: the pickle is not a state dict")
    for key, t in new.items():
        target[key] = t
    with open(dst, "xb") as fo:
        try:
            torch.save(obj, fo)
        except (RuntimeError, pickle.PicklingError) as e:  # torch reports a failed write as RuntimeError
            raise CheckpointError(
                f"{dst}: cannot write: {str(e).splitlines()[0] if str(e) else e!r}"
            ) from None
        fo.flush()
        os.fsync(fo.fileno())


def _write_file(info: CheckpointInfo, src_file: Path, dst: Path, new: dict[str, torch.Tensor]) -> None:
    mine = {k: v for k, v in new.items() if info.tensors is not None and info.tensors.file_of(k) == src_file}
    if info.container == "pickle":
        _write_pickle(src_file, dst, mine)
    else:
        _patch_safetensors(src_file, dst, mine)


def _copy_tree(src: Path, dst: Path, roots: list[str], seen: set[str], skip: set[Path]) -> None:
    """Copy every file of checkpoint dir ``src`` but those in ``skip`` into ``dst``.

    Symlinks are dereferenced (HF cache snapshots are symlinks into ``blobs``) but must resolve
    inside the checkpoint; FIFOs, devices and symlinked directories are refused.
    """
    try:
        entries = sorted(os.scandir(src), key=lambda e: e.name)
    except OSError as e:
        raise CheckpointError(f"{src}: cannot list directory: {e.strerror or e}") from None
    for e in entries:
        path = Path(e.path)
        real = os.path.realpath(path)
        if not any(_is_within(real, r) for r in roots):
            raise CheckpointError(f"{path}: refusing to copy: it resolves outside the checkpoint directory")
        st = stat_path(path)
        if stat.S_ISDIR(st.st_mode):
            if e.is_symlink() or real in seen:
                raise CheckpointError(f"{path}: refusing to copy a symlinked or repeated directory")
            seen.add(real)
            os.mkdir(dst / e.name)
            _copy_tree(path, dst / e.name, roots, seen, skip)
        elif stat.S_ISREG(st.st_mode):
            if path not in skip:
                _copy_file(path, dst / e.name)
        else:
            raise CheckpointError(f"{path}: refusing to copy: not a regular file or directory")


def _verify(tmp: Path, new: dict[str, torch.Tensor], out: Path) -> None:
    written = load_projector(tmp).state_dict()
    bad = [k for k, t in new.items() if k not in written or not torch.equal(written[k], t)]
    if bad or set(written) != set(new):
        raise CheckpointError(
            f"{out}: verification failed: written projector differs ({(bad or ['keys'])[0]})"
        )


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except OSError:
            pass


def _commit(tmp: Path, out: Path, force: bool) -> None:
    if not os.path.lexists(out):
        os.rename(tmp, out)  # fails rather than merges if a dir appeared meanwhile
        return
    if not force:
        raise UsageError(f"{out}: already exists; pass force=True (--force) to replace it")
    if tmp.is_file() and out.is_file() and not out.is_symlink():
        os.replace(tmp, out)
        return
    backup = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(out, backup)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(backup, out)
        raise
    _remove(backup)


def _temp_sibling(out: Path, suffix: str = "") -> Path:
    """A fresh hidden name beside ``out`` (same dir, so the final rename is atomic)."""
    return out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:12]}{suffix}"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_projector(
    src: str | os.PathLike[str], projector: Projector, out: str | os.PathLike[str], force: bool = False
) -> Path:
    """Write ``src`` with its projector replaced by ``projector`` to ``out``, in src's format.

    A checkpoint dir is copied whole and only the file(s) holding projector tensors are
    rewritten; a single file stays a single file of the same kind (safetensors or torch pickle).
    The write is atomic (temporary sibling + rename) and verified by reading it back. Refuses an
    existing ``out`` unless ``force``, and any ``out`` that is, or lies inside, the source.
    """
    src_p, out_p = Path(src), Path(out)
    info = detect_format(src_p)
    projector.validate()
    new = projector.state_dict()
    _check_projector(info, new, out_p)
    _check_paths(src_p, out_p, force)
    is_dir = info.root is not None
    if not is_dir and src_p.suffix and out_p.suffix.lower() != src_p.suffix.lower():
        raise UsageError(f"{out_p}: the output must keep the source's file type ({src_p.suffix})")

    parent = out_p.parent
    tmp: Path | None = None
    try:
        if is_dir:
            made = _temp_sibling(out_p)
            os.mkdir(made)  # honours the umask, unlike mkdtemp's 0700
            tmp = made
            root = info.root
            assert root is not None
            _copy_tree(root, tmp, allowed_roots(root), {os.path.realpath(root)}, set(info.files))
            for f in info.files:
                _write_file(info, f, tmp / f.relative_to(root), new)
        else:
            tmp = _temp_sibling(out_p, src_p.suffix)  # the writers create it exclusively ("xb")
            _write_file(info, info.files[0], tmp, new)
        _verify(tmp, new, out_p)
        _commit(tmp, out_p, force)
        tmp = None
        _fsync_dir(parent)
    except ProjlensError:
        raise
    except OSError as e:
        raise CheckpointError(f"{out_p}: cannot write output: {e.strerror or e}") from None
    finally:
        if tmp is not None:
            _remove(tmp)
    return out_p
