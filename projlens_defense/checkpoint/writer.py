"""Write a repaired projector back in the source checkpoint's own format, atomically.

Everything is built in a hidden temporary sibling of the output and renamed into place at the
end, so a failure never leaves a half-written checkpoint; the source is only ever read.
Safetensors files are copied and only the projector tensors' byte ranges are overwritten, so the
header, ``__metadata__`` and every other tensor stay bit-identical.

Copies take the fastest safe path the platform offers: a reflink (``FICLONE``: the copy shares the
source's blocks copy-on-write, on Btrfs, XFS, bcachefs...), else ``os.copy_file_range`` over the
source's data extents (in-kernel, holes stay holes), else a plain read/write loop. With ``link`` the
files that need no change are hard-linked instead (the output then shares them with the input).
"""

from __future__ import annotations

import errno
import os
import pickle
import shutil
import stat
import sys
import threading
import uuid
from pathlib import Path
from typing import BinaryIO

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
            raise UsageError(f"{out}: already exists; pass `force` to replace it")
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


_FICLONE = 0x40049409  # Linux ioctl: make dst share src's extents (copy-on-write)
_NO_OFFLOAD = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOTTY,
               errno.EPERM, errno.EBADF, errno.ETXTBSY}
"""errno values meaning "this fast path is not available here": fall back to the next one."""


def _reflink(fi: BinaryIO, fo: BinaryIO) -> bool:
    """Clone ``fi`` into the empty ``fo`` with ``FICLONE``; False where the filesystem cannot."""
    if not sys.platform.startswith("linux"):
        return False
    import fcntl

    try:
        fcntl.ioctl(fo.fileno(), _FICLONE, fi.fileno())
    except OSError as e:
        if e.errno in _NO_OFFLOAD:
            return False
        raise
    return True


def _data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """(start, end) of the file's data regions (``SEEK_DATA``/``SEEK_HOLE``); the whole file where unsupported."""
    if not (hasattr(os, "SEEK_DATA") and hasattr(os, "SEEK_HOLE")):
        return [(0, size)] if size else []
    out, pos = [], 0
    try:
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # only a hole from pos to the end
                    break
                raise
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            if end <= start:
                break
            out.append((start, end))
            pos = end
    except OSError:
        return [(0, size)] if size else []
    finally:
        os.lseek(fd, 0, os.SEEK_SET)
    return out


def _changed(src: Path) -> CheckpointError:
    return CheckpointError(f"{src}: the file changed while it was being copied")


class _Cancelled(Exception):
    """A staged copy was abandoned (the write it prepared will not happen)."""


def _check_cancel(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise _Cancelled


def _copy_range(fi: int, fo: int, start: int, end: int, src: Path, offload: list[bool],
                cancel: threading.Event | None = None) -> None:
    """Copy bytes [start, end) of ``fi`` to the same offsets of ``fo``: in the kernel while ``offload[0]``,
    else (or once the kernel refuses) through a userspace buffer. ``cancel`` is checked between chunks."""
    pos = start
    while pos < end and offload[0]:
        _check_cancel(cancel)
        try:
            n = os.copy_file_range(fi, fo, min(end - pos, 1 << 30), pos, pos)
        except OSError as e:
            if e.errno not in _NO_OFFLOAD:
                raise
            offload[0] = False
            break
        if n == 0:
            raise _changed(src)
        pos += n
    while pos < end:
        _check_cancel(cancel)
        buf = os.pread(fi, min(end - pos, _CHUNK), pos)
        if not buf:
            raise _changed(src)
        done = 0
        while done < len(buf):
            done += os.pwrite(fo, buf[done:] if done else buf, pos + done)
        pos += len(buf)


def _copy_file(src: Path, dst: Path, cancel: threading.Event | None = None) -> None:
    """Copy regular file ``src`` to the new file ``dst`` (created exclusively) and fsync it.

    Reflink where the filesystem shares extents, else ``os.copy_file_range`` over the data extents (holes
    of a sparse source stay holes: same bytes on read), else a read/write loop."""
    fh, _ = open_regular_file(src)
    with fh, open(dst, "xb") as fo:
        size = os.fstat(fh.fileno()).st_size
        if not _reflink(fh, fo):
            if hasattr(os, "copy_file_range"):
                offload = [True]
                for start, end in _data_extents(fh.fileno(), size):
                    _copy_range(fh.fileno(), fo.fileno(), start, end, src, offload, cancel)
                os.ftruncate(fo.fileno(), size)
            else:
                shutil.copyfileobj(fh, fo, _CHUNK)
        fo.flush()
        os.fsync(fo.fileno())


def _link_file(src: Path, real: str, st: os.stat_result, dst: Path) -> str | None:
    """Hard-link ``real`` (the checked real path of ``src``, whose stat is ``st``) as ``dst``.

    Returns None when linked, else why not (the caller copies instead): another filesystem, links not
    permitted, or the file changed under us (the link is removed again unless it is ``st``'s own inode)."""
    try:
        os.link(real, dst, follow_symlinks=False)
    except OSError as e:
        return e.strerror or str(e)
    try:
        lst = os.lstat(dst)
    except OSError as e:
        return e.strerror or str(e)
    if stat.S_ISREG(lst.st_mode) and (lst.st_dev, lst.st_ino) == (st.st_dev, st.st_ino):
        return None
    _remove(dst)
    return "the file changed while it was being linked"


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _patch_safetensors(src: Path, dst: Path, new: dict[str, torch.Tensor], copied: bool = False) -> None:
    """Copy ``src`` to ``dst`` (unless ``copied``: already done) and overwrite the byte ranges of the tensors
    in ``new``."""
    if sys.byteorder != "little":
        raise CheckpointError(f"{dst}: writing safetensors needs a little-endian machine")
    header = parse_header(src)
    if not copied:
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


def _write_file(info: CheckpointInfo, src_file: Path, dst: Path, new: dict[str, torch.Tensor],
                copied: bool = False) -> None:
    mine = {k: v for k, v in new.items() if info.tensors is not None and info.tensors.file_of(k) == src_file}
    if info.container == "pickle":
        _write_pickle(src_file, dst, mine)
    else:
        _patch_safetensors(src_file, dst, mine, copied)


def _copy_tree(src: Path, dst: Path, roots: list[str], seen: set[str], skip: set[Path],
               link: bool = False, not_linked: list[str] | None = None, cancel: threading.Event | None = None) -> None:
    """Copy every file of checkpoint dir ``src`` but those in ``skip`` into ``dst``.

    Symlinks are dereferenced (HF cache snapshots are symlinks into ``blobs``) but must resolve
    inside the checkpoint; FIFOs, devices and symlinked directories are refused. With ``link`` the
    files are hard-linked where possible; each one copied instead is added to ``not_linked`` with why.
    """
    try:
        entries = sorted(os.scandir(src), key=lambda e: e.name)
    except OSError as e:
        raise CheckpointError(f"{src}: cannot list directory: {e.strerror or e}") from None
    for e in entries:
        _check_cancel(cancel)
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
            _copy_tree(path, dst / e.name, roots, seen, skip, link, not_linked, cancel)
        elif stat.S_ISREG(st.st_mode):
            if path in skip:
                continue
            why = _link_file(path, real, st, dst / e.name) if link else "not asked to"
            if why is not None:
                if link and not_linked is not None:
                    not_linked.append(f"{path}: {why}")
                _copy_file(path, dst / e.name, cancel)
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
        raise UsageError(f"{out}: already exists; pass `force` to replace it")
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


class StagedWrite:
    """A checkpoint write that starts before the repaired projector exists.

    Opening one checks the output path (an existing ``out`` is refused unless ``force``, as is any ``out``
    inside the source) and, for a checkpoint directory, starts copying it into a hidden temporary sibling of
    ``out`` in a background thread (``background``): the files without projector tensors (hard-linked with
    ``link``) and the bytes of those with them, so the copy, which dominates on a multi-GB checkpoint,
    overlaps the caller's own work. :meth:`finish` then patches the projector tensors' byte ranges, verifies
    them by reading them back and renames the result into place; :meth:`abort` (also on leaving a ``with``
    block without finishing) stops the copy and removes it. The source is only ever read.
    """

    def __init__(self, src: str | os.PathLike[str], out: str | os.PathLike[str], force: bool = False,
                 link: bool = False, background: bool = True, info: CheckpointInfo | None = None) -> None:
        self.src, self.out, self.force, self.link = Path(src), Path(out), force, link
        self.info = info if info is not None else detect_format(self.src)
        _check_paths(self.src, self.out, force)
        if self.info.root is None and self.src.suffix and self.out.suffix.lower() != self.src.suffix.lower():
            raise UsageError(f"{self.out}: the output must keep the source's file type ({self.src.suffix})")
        self.tmp: Path | None = None
        self._not_linked: list[str] = []
        self._copied: set[Path] = set()
        self._error: BaseException | None = None
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None
        if self.info.root is not None:
            made = _temp_sibling(self.out)
            try:
                os.mkdir(made)  # honours the umask, unlike mkdtemp's 0700
            except OSError as e:
                raise CheckpointError(f"{self.out}: cannot write output: {e.strerror or e}") from None
            self.tmp = made
            if background:
                self._thread = threading.Thread(target=self._stage, name="projlens-staged-copy", daemon=True)
                self._thread.start()
            else:
                self._stage()

    def _stage(self) -> None:
        """Copy (or link) the checkpoint dir into the staging dir; errors are kept for :meth:`finish`."""
        info, tmp = self.info, self.tmp
        assert info.root is not None and tmp is not None
        try:
            root = info.root
            _copy_tree(root, tmp, allowed_roots(root), {os.path.realpath(root)}, set(info.files), self.link,
                       self._not_linked, self._cancel)
            if info.container != "pickle":  # a pickle is re-saved whole by finish
                for f in info.files:
                    _copy_file(f, tmp / f.relative_to(root), self._cancel)
                    self._copied.add(f)
        except BaseException as e:  # noqa: BLE001  (re-raised by finish, in the caller's thread)
            self._error = e

    def _join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def finish(self, projector: Projector, warnings: list[str] | None = None) -> Path:
        """Write ``projector`` into the staged copy and commit it atomically as ``out``; returns ``out``."""
        info, out_p = self.info, self.out
        try:
            projector.validate()
            new = projector.state_dict()
            _check_projector(info, new, out_p)
            self._join()
            if self._error is not None:
                raise self._error
            if info.root is not None:
                assert self.tmp is not None
                if self._not_linked and warnings is not None:
                    warnings.append(f"--link: {len(self._not_linked)} file(s) copied instead of hard-linked "
                                    f"(first: {self._not_linked[0]})")
                for f in info.files:
                    _write_file(info, f, self.tmp / f.relative_to(info.root), new, copied=f in self._copied)
            else:
                self.tmp = _temp_sibling(out_p, self.src.suffix)  # the writers create it exclusively ("xb")
                _write_file(info, info.files[0], self.tmp, new)
            _verify(self.tmp, new, out_p)
            _commit(self.tmp, out_p, self.force)
            self.tmp = None
            _fsync_dir(out_p.parent)
        except ProjlensError:
            raise
        except OSError as e:
            raise CheckpointError(f"{out_p}: cannot write output: {e.strerror or e}") from None
        finally:
            self.abort()
        return out_p

    def abort(self) -> None:
        """Stop the staged copy and remove it (nothing is written to ``out``)."""
        self._cancel.set()
        self._join()
        if self.tmp is not None:
            _remove(self.tmp)
            self.tmp = None

    def __enter__(self) -> StagedWrite:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()


def write_projector(
    src: str | os.PathLike[str], projector: Projector, out: str | os.PathLike[str], force: bool = False,
    link: bool = False, warnings: list[str] | None = None,
) -> Path:
    """Write ``src`` with its projector replaced by ``projector`` to ``out``, in src's format.

    A checkpoint dir is copied whole and only the file(s) holding projector tensors are
    rewritten; a single file stays a single file of the same kind (safetensors or torch pickle).
    The write is atomic (temporary sibling + rename) and verified by reading it back. Refuses an
    existing ``out`` unless ``force``, and any ``out`` that is, or lies inside, the source.

    ``link``: hard-link the files that need no change instead of copying them (a checkpoint dir only),
    so the output shares them with the input: editing one in place edits the other. Where a link is
    impossible (another filesystem, links not permitted) the file is copied and a line saying so is
    appended to ``warnings``. (:class:`StagedWrite` does the same with the copy started earlier.)
    """
    projector.validate()  # before any copying
    return StagedWrite(src, out, force, link, background=False).finish(projector, warnings)
