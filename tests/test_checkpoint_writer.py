"""write_projector: same-format round trips, bit-identity of everything else, atomicity, refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from projlens_defense.checkpoint import detect_format, load_projector, parse_header, write_projector
from projlens_defense.checkpoint import writer as writer_mod
from projlens_defense.errors import CheckpointError, UsageError

VISION_DIM, TEXT_DIM = 16, 24  # tiny dims used by the conftest builders


def _perturbed(proj, scale: float = 0.1, seed: int = 7):
    g = torch.Generator().manual_seed(seed)
    return proj.with_weights(
        [layer.weight + scale * torch.randn(layer.weight.shape, generator=g) for layer in proj.layers],
        [None if layer.bias is None else layer.bias - 0.5 for layer in proj.layers],
    )


def _raw(path: Path, key: str) -> bytes:
    h = parse_header(path)
    e = h.tensors[key]
    with open(path, "rb") as f:
        f.seek(h.data_start + e.begin)
        return f.read(e.nbytes)


def _assert_other_tensors_identical(src: Path, out: Path, projector_keys: set[str]) -> int:
    hs, ho = parse_header(src), parse_header(out)
    assert hs.raw == ho.raw  # header (and __metadata__) byte-identical
    n = 0
    for key in hs.tensors:
        if key not in projector_keys:
            assert _raw(src, key) == _raw(out, key), key
            n += 1
    return n


def _listing(d: Path) -> list[str]:
    return sorted(os.listdir(d))


@pytest.mark.parametrize("new_prefix", [False, True], ids=["old-keys", "new-keys"])
def test_hf_roundtrip_from_pretrained(make_hf_llava, digest, tmp_path, new_prefix):
    from transformers import LlavaForConditionalGeneration

    src, _ = make_hf_llava(new_prefix=new_prefix)
    before = digest(src)
    proj = load_projector(src)
    new = _perturbed(proj)
    out = write_projector(src, new, tmp_path / "repaired")
    assert out == tmp_path / "repaired"
    assert digest(src) == before  # input untouched

    model = LlavaForConditionalGeneration.from_pretrained(out)
    mmp = model.model.multi_modal_projector
    for layer, lin in zip(new.layers, [mmp.linear_1, mmp.linear_2], strict=True):
        assert torch.equal(lin.weight.detach(), layer.weight) and torch.equal(lin.bias.detach(), layer.bias)
    x = torch.randn(3, VISION_DIM)
    with torch.no_grad():
        torch.testing.assert_close(mmp(x), new(x), atol=1e-5, rtol=0)

    after = digest(out)
    assert set(after) == set(before)
    assert {k for k in after if after[k] != before[k]} == {"model.safetensors"}
    n = _assert_other_tensors_identical(
        src / "model.safetensors", out / "model.safetensors", set(new.state_dict())
    )
    assert n > 30
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert detect_format(out).format == "hf-llava"


def test_hf_sharded_roundtrip_rewrites_only_projector_shards(make_hf_llava, digest, tmp_path):
    from transformers import LlavaForConditionalGeneration

    src, _ = make_hf_llava(sharded=True)
    before = digest(src)
    info = detect_format(src)
    new = _perturbed(load_projector(info))
    out = write_projector(src, new, tmp_path / "out")
    assert digest(src) == before
    after = digest(out)
    changed = {k for k in after if after[k] != before[k]}
    assert changed == {f.name for f in info.files}
    assert after["model.safetensors.index.json"] == before["model.safetensors.index.json"]
    for f in info.files:
        _assert_other_tensors_identical(f, out / f.name, set(new.state_dict()))
    model = LlavaForConditionalGeneration.from_pretrained(out)
    assert torch.equal(model.model.multi_modal_projector.linear_2.weight.detach(), new.layers[1].weight)


def test_bf16_checkpoint_keeps_dtype(make_hf_llava, tmp_path):
    src, _ = make_hf_llava(dtype=torch.bfloat16)
    proj = load_projector(src)
    out = write_projector(src, _perturbed(proj), tmp_path / "out")
    h = parse_header(out / "model.safetensors")
    assert h.tensors["multi_modal_projector.linear_1.weight"].dtype == "BF16"
    reread = load_projector(out)
    assert reread.dtypes == proj.dtypes
    expected = _perturbed(proj).layers[0].weight.to(torch.bfloat16).float()
    assert torch.equal(reread.layers[0].weight, expected)


def test_mm_projector_bin_roundtrip_loads_into_sequential(make_mm_projector, digest, tmp_path):
    src, _ = make_mm_projector(dtype=torch.float16, with_config=True)
    before = digest(src.parent)
    new = _perturbed(load_projector(src))
    out = write_projector(src, new, tmp_path / "mm_projector.bin")
    assert digest(src.parent) == before

    # exactly what the original LLaVA code does with it
    weights = torch.load(out, map_location="cpu", weights_only=True)
    assert list(weights) == list(torch.load(src, weights_only=True))
    assert all(v.dtype == torch.float16 for v in weights.values())
    seq = nn.Sequential(nn.Linear(VISION_DIM, TEXT_DIM), nn.GELU(), nn.Linear(TEXT_DIM, TEXT_DIM)).half()
    seq.load_state_dict({k.split("mm_projector.")[1]: v for k, v in weights.items()})
    assert torch.equal(seq[2].weight, new.layers[1].weight.half())


def test_mm_projector_dir_roundtrip(make_mm_projector, digest, tmp_path):
    src, _ = make_mm_projector(fmt="bin", with_config=True)
    new = _perturbed(load_projector(src.parent))
    out = write_projector(src.parent, new, tmp_path / "outdir")
    assert _listing(out) == ["config.json", "mm_projector.bin"]
    assert (out / "config.json").read_bytes() == (src.parent / "config.json").read_bytes()
    assert torch.equal(load_projector(out).layers[0].weight, new.layers[0].weight)


@pytest.mark.parametrize("rms", [False, True])
def test_single_safetensors_merger_roundtrip(make_merger, tmp_path, rms):
    src, merger = make_merger(rms=rms)
    proj = load_projector(src)
    new = _perturbed(proj)
    out = write_projector(src, new, tmp_path / "merger_fixed.safetensors")
    assert detect_format(out).format == "qwen2-vl-merger"
    ln_keys = {k for k in proj.state_dict() if "ln_q" in k}
    for k in ln_keys:
        assert _raw(src, k) == _raw(out, k)
    reread = load_projector(out)
    x = torch.randn(8, VISION_DIM)
    torch.testing.assert_close(reread(x), new(x), atol=0, rtol=0)
    with safe_open(str(out), "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_existing_output_refused_without_force(make_hf_llava, tmp_path):
    src, _ = make_hf_llava()
    new = _perturbed(load_projector(src))
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    with pytest.raises(UsageError, match="already exists"):
        write_projector(src, new, out)
    assert _listing(out) == ["old.txt"]
    write_projector(src, new, out, force=True)
    assert "old.txt" not in _listing(out) and (out / "model.safetensors").exists()
    assert not [n for n in _listing(tmp_path) if n.startswith(".out")]  # no temp or backup left


def test_force_replaces_existing_file(make_mm_projector, tmp_path):
    src, _ = make_mm_projector()
    new = _perturbed(load_projector(src))
    out = tmp_path / "p.bin"
    out.write_bytes(b"old")
    with pytest.raises(UsageError, match="already exists"):
        write_projector(src, new, out)
    write_projector(src, new, out, force=True)
    assert torch.equal(load_projector(out).layers[0].weight, new.layers[0].weight)


def test_output_inside_or_equal_to_source_refused(make_hf_llava, tmp_path, digest):
    src, _ = make_hf_llava()
    before = digest(src)
    new = load_projector(src)
    with pytest.raises(UsageError, match="must not be the source"):
        write_projector(src, new, src, force=True)
    with pytest.raises(UsageError, match="must not be the source"):
        write_projector(src, new, src / "sub")
    with pytest.raises(UsageError, match="contains the source"):
        write_projector(src, new, src.parent, force=True)
    with pytest.raises(UsageError, match="parent directory .* does not exist"):
        write_projector(src, new, tmp_path / "a" / "b")
    assert digest(src) == before


def test_output_must_keep_file_type(make_mm_projector, tmp_path):
    src, _ = make_mm_projector()
    with pytest.raises(UsageError, match=r"file type \(\.bin\)"):
        write_projector(src, load_projector(src), tmp_path / "p.safetensors")


@pytest.mark.parametrize("stage", ["_patch_safetensors", "_verify", "_commit"])
def test_failure_mid_write_leaves_nothing(make_hf_llava, tmp_path, digest, monkeypatch, stage):
    src, _ = make_hf_llava(sharded=stage == "_verify")
    before = digest(src)
    new = _perturbed(load_projector(src))
    work = tmp_path / "work"
    work.mkdir()
    real = getattr(writer_mod, stage)

    def boom(*args, **kwargs):
        if stage == "_patch_safetensors":
            real(*args, **kwargs)  # the file is half-built when we fail
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(writer_mod, stage, boom)
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_projector(src, new, work / "out")
    assert _listing(work) == []
    assert digest(src) == before


def test_failure_with_force_keeps_old_output(make_mm_projector, tmp_path, monkeypatch):
    src, _ = make_mm_projector()
    new = _perturbed(load_projector(src))
    out = tmp_path / "out.bin"
    out.write_bytes(b"previous")
    monkeypatch.setattr(writer_mod, "_verify", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left")))
    with pytest.raises(CheckpointError, match="cannot write output: No space left"):
        write_projector(src, new, out, force=True)
    assert out.read_bytes() == b"previous"
    assert sorted(os.listdir(tmp_path)) == sorted(["out.bin", src.parent.name])


def test_unwritable_output_dir_is_a_clear_error(make_hf_llava, tmp_path, monkeypatch):
    src, _ = make_hf_llava()
    new = load_projector(src)

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(writer_mod.os, "mkdir", denied)
    with pytest.raises(CheckpointError, match="cannot write output: Permission denied") as e:
        write_projector(src, new, tmp_path / "out")
    assert "\n" not in str(e.value)


# Runs the CLI in a child process. As root (CI) the child first drops CAP_DAC_OVERRIDE,
# CAP_DAC_READ_SEARCH and CAP_FOWNER from its capability bounding set, so that after exec it is
# root without the power to ignore permission bits: a 0555 directory it owns is read-only to it, as
# to any user. Needs CAP_SETPCAP (which root has, in Docker's default set too); exit 97 if refused.
_WITHOUT_DAC_OVERRIDE = """
import ctypes, os, sys
if os.geteuid() == 0:
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2, 3):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            print(f"cannot drop capability {cap}: errno {ctypes.get_errno()}", file=sys.stderr)
            sys.exit(97)
os.execv(sys.executable, [sys.executable, "-m", "projlens_defense", *sys.argv[1:]])
"""


def _cli_without_dac_override(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-c", _WITHOUT_DAC_OVERRIDE, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=120,
    )
    if r.returncode == 97:
        pytest.skip(f"running as root and cannot drop CAP_DAC_OVERRIDE here: {r.stderr.strip()}")
    return r


def test_read_only_output_dir(make_mm_projector, tmp_path, digest):
    """`sanitize --out` into a read-only directory: exit 2 with one line naming the output and the
    OS error, no traceback, nothing written there, the input unchanged. Runs as root too (see above)."""
    src, _ = make_mm_projector(seed=0)
    ref, _ = make_mm_projector(seed=1)
    before = digest(src)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.geteuid() != 0:  # the library call too (root in this process would ignore the mode)
            with pytest.raises(CheckpointError, match="Permission denied") as e:
                write_projector(src, load_projector(src), ro / "p.bin")
            assert "\n" not in str(e.value)
        out = ro / "p.bin"
        r = _cli_without_dac_override(
            "sanitize",
            str(src),
            "--reference",
            str(ref),
            "--method",
            "restore",
            "--out",
            str(out),
            cwd=tmp_path,
        )
        assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
        assert "Traceback" not in r.stdout + r.stderr
        assert r.stderr.strip().splitlines() == [f"error: {out}: cannot write output: Permission denied"], (
            r.stderr
        )
        assert os.listdir(ro) == []  # no output, no temporary sibling
    finally:
        ro.chmod(0o755)
    assert digest(src) == before


def test_output_parent_is_a_regular_file(make_mm_projector, tmp_path, digest):
    """An output path under a regular file (unwritable whoever runs it, root included): usage error
    (exit 4), one line naming the output, no traceback; the file and the input are unchanged."""
    from click.testing import CliRunner

    from projlens_defense.cli import main

    src, _ = make_mm_projector(seed=0)
    ref, _ = make_mm_projector(seed=1)
    before = digest(src)
    blocker = tmp_path / "not-a-dir"
    blocker.write_bytes(b"keep me")
    out = blocker / "p.bin"
    with pytest.raises(UsageError, match="parent directory"):
        write_projector(src, load_projector(src), out)
    res = CliRunner().invoke(
        main, ["sanitize", str(src), "--reference", str(ref), "--method", "restore", "--out", str(out)]
    )
    assert res.exit_code == 4, res.output
    assert isinstance(res.exception, SystemExit) and "Traceback" not in res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {out}: ") and "parent directory" in lines[0], (
        res.stderr
    )
    assert blocker.read_bytes() == b"keep me"
    assert sorted(os.listdir(tmp_path)) == sorted([src.parent.name, ref.parent.name, blocker.name])
    assert digest(src) == before


def test_projector_from_another_checkpoint_refused(make_hf_llava, make_mm_projector, tmp_path):
    src, _ = make_hf_llava()
    other = load_projector(make_mm_projector()[0])
    with pytest.raises(UsageError, match="does not match"):
        write_projector(src, other, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_nan_projector_is_not_written(make_hf_llava, tmp_path):
    src, _ = make_hf_llava()
    proj = load_projector(src)
    w = proj.layers[0].weight.clone()
    w[1, 1] = float("inf")
    with pytest.raises(CheckpointError, match="linear_1: weight has 1 NaN/inf"):
        write_projector(src, proj.with_weights([w, proj.layers[1].weight]), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_symlink_escaping_source_dir_is_not_copied(make_hf_llava, tmp_path):
    src, _ = make_hf_llava()
    secret = tmp_path / "secret.txt"
    secret.write_text("private")
    (src / "notes.txt").symlink_to(secret)
    with pytest.raises(CheckpointError, match="resolves outside the checkpoint directory"):
        write_projector(src, load_projector(src), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert json.loads((src / "config.json").read_text())["model_type"] == "llava"


def test_output_permissions_follow_umask(make_hf_llava, make_mm_projector, tmp_path):
    umask = os.umask(0o022)
    try:
        src, _ = make_hf_llava()
        out = write_projector(src, load_projector(src), tmp_path / "out")
        assert out.stat().st_mode & 0o777 == 0o755  # not mkdtemp's 0700
        assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o644
        msrc, _ = make_mm_projector()
        fout = write_projector(msrc, load_projector(msrc), tmp_path / "p.bin")
        assert fout.stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(umask)


def test_staged_write_in_background_equals_the_plain_write(make_hf_llava, digest, tmp_path):
    """The copy sanitize starts before the method computes gives the same bytes as write_projector."""
    from projlens_defense.checkpoint import StagedWrite

    src, _ = make_hf_llava(sharded=True)
    before = digest(src)
    new = _perturbed(load_projector(src))
    staged = StagedWrite(src, tmp_path / "staged", link=True)
    assert staged.tmp is not None and staged.tmp.parent == tmp_path  # the hidden sibling exists from the start
    assert staged.finish(new) == tmp_path / "staged"
    plain = write_projector(src, new, tmp_path / "plain")
    assert digest(tmp_path / "staged") == digest(plain)
    assert digest(src) == before
    info = detect_format(src)
    shared = [f.name for f in (tmp_path / "staged").iterdir()
              if os.stat(f).st_ino == os.stat(src / f.name).st_ino]
    assert shared and not set(shared) & {f.name for f in info.files}  # --link shares only unchanged files
    assert not [n for n in _listing(tmp_path) if n.startswith(".")]  # no staging left


def test_staged_write_aborted_leaves_nothing(make_hf_llava, digest, tmp_path):
    """A repair that fails (or removes nothing) after the copy started leaves no output and no staging."""
    from projlens_defense.checkpoint import StagedWrite

    src, _ = make_hf_llava()
    before = digest(src)
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(ValueError, match="method failed"), StagedWrite(src, work / "out"):
        raise ValueError("method failed")
    assert _listing(work) == []
    assert digest(src) == before
    (work / "taken").mkdir()
    with pytest.raises(UsageError, match="already exists"):  # refused before any copying
        StagedWrite(src, work / "taken")
    assert _listing(work) == ["taken"]


def test_staged_write_copy_error_surfaces_at_finish(make_hf_llava, tmp_path, monkeypatch):
    """An error of the background copy is raised by finish in the caller's thread, and cleans up."""
    from projlens_defense.checkpoint import StagedWrite

    src, _ = make_hf_llava()
    new = _perturbed(load_projector(src))
    monkeypatch.setattr(writer_mod, "_copy_file",
                        lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    work = tmp_path / "work"
    work.mkdir()
    staged = StagedWrite(src, work / "out")
    with pytest.raises(CheckpointError, match="No space left"):
        staged.finish(new)
    assert _listing(work) == []
