"""Issue 17 (real-size models): --device/--dtype, bfloat16 evaluation, fast copies and `sanitize --link`."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from projlens_defense.attacks.finetune import AttackConfig, run_attack
from projlens_defense.checkpoint import detect_format, load_projector, write_projector
from projlens_defense.checkpoint import writer as writer_mod
from projlens_defense.cli import main
from projlens_defense.errors import UsageError
from projlens_defense.runtime import LlavaRuntime, resolve_placement

NO_GPU = not torch.cuda.is_available()


@pytest.fixture(scope="module")
def attacked(micro_zoo, tmp_path_factory) -> Path:
    """A badnets projector fine-tune of the micro zoo (no metrics: the tests evaluate it themselves)."""
    out = tmp_path_factory.mktemp("real_size") / "badnets"
    run_attack(AttackConfig(variant="badnets", poison_rate=0.2, seed=0), micro_zoo.reference, micro_zoo.train_data,
               None, out, progress=False)
    return out


def _perturbed(proj, scale: float = 0.1):
    g = torch.Generator().manual_seed(3)
    return proj.with_weights([layer.weight + scale * torch.randn(layer.weight.shape, generator=g)
                              for layer in proj.layers])


def _files(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- device / dtype
@pytest.mark.skipif(not NO_GPU, reason="checks the CPU-only resolution")
def test_auto_placement_is_cpu_float32_without_a_gpu():
    assert resolve_placement("auto", "auto") == (torch.device("cpu"), torch.float32)
    assert resolve_placement(None, None) == (torch.device("cpu"), torch.float32)
    assert resolve_placement("cpu", "bfloat16") == (torch.device("cpu"), torch.bfloat16)
    with pytest.raises(UsageError, match="no CUDA GPU"):
        resolve_placement("cuda", "auto")
    with pytest.raises(UsageError, match="not a torch device"):
        resolve_placement("gpu-please", "auto")
    with pytest.raises(UsageError, match="not supported"):
        resolve_placement("cpu", "int8")


@pytest.mark.skipif(not NO_GPU, reason="checks the CPU-only refusal")
def test_cli_refuses_a_missing_gpu_in_one_line(micro_zoo, attacked):
    r = CliRunner().invoke(main, ["evaluate", str(attacked), "--zoo", "micro", "--device", "cuda"])
    assert r.exit_code == 4
    assert "no CUDA GPU" in r.output and "Traceback" not in r.output


def test_auto_loads_exactly_what_the_float32_cpu_default_loads(micro_zoo):
    a = LlavaRuntime.from_pretrained(micro_zoo.reference)
    b = LlavaRuntime.from_pretrained(micro_zoo.reference, device="auto" if NO_GPU else "cpu",
                                     dtype="auto" if NO_GPU else "float32")
    assert b.device == torch.device("cpu") and b.dtype == torch.float32
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_bfloat16_evaluation_agrees_with_float32(micro_zoo, attacked):
    from projlens_defense.attacks.variants import get_variant
    from projlens_defense.conversations import load_conversations
    from projlens_defense.metrics import attack_success_rate, clean_accuracy

    samples = load_conversations(micro_zoo.test_data)[:120]
    variant = get_variant("badnets")
    eligible = [i for i, s in enumerate(samples) if variant.behaviour.eligible(s)]
    trig = [variant.triggered_image(samples[i], 10_000, i) for i in eligible]
    out = {}
    for dt in ("float32", "bfloat16"):
        rt = LlavaRuntime.from_pretrained(attacked, device="cpu", dtype=dt)
        assert rt.dtype == getattr(torch, dt) and rt.projector.linear_1.weight.dtype == getattr(torch, dt)
        clean_f = rt.vision_features([s.image for s in samples], batch_size=64)
        assert clean_f.dtype == torch.float32 and clean_f.device.type == "cpu"
        trig_f = rt.vision_features(trig, batch_size=64)
        out[dt] = (rt.answer(clean_f, [s.question for s in samples], batch_size=64),
                   rt.answer(trig_f, [samples[i].question for i in eligible], batch_size=64))
    (c32, t32), (c16, t16) = out["float32"], out["bfloat16"]
    agree = sum(a == b for a, b in zip(c32 + t32, c16 + t16, strict=True)) / len(c32 + t32)
    assert agree >= 0.95, agree
    truth = [s.answer for s in samples]
    assert abs(clean_accuracy(c32, truth) - clean_accuracy(c16, truth)) <= 0.02
    target = variant.behaviour.target
    assert attack_success_rate(t32, target) > 0.5  # the backdoor works, so the ASR comparison means something
    assert abs(attack_success_rate(t32, target) - attack_success_rate(t16, target)) <= 0.02


def test_cli_evaluate_takes_device_dtype_and_batch_size(micro_zoo, attacked, tmp_path):
    data = tmp_path / "test.json"  # a small slice of the test set, images beside the original
    recs = json.loads(micro_zoo.test_data.read_text())[:40]
    for r in recs:
        r["image"] = str((micro_zoo.test_data.parent / r["image"]).resolve())
    data.write_text(json.dumps(recs))
    res = {}
    for dt in ("float32", "bfloat16"):
        r = CliRunner().invoke(main, ["evaluate", str(attacked), "--data", str(data), "--device", "cpu", "--dtype", dt,
                                      "--batch-size", "16", "--format", "json"])
        assert r.exit_code == 0, r.output
        res[dt] = json.loads(r.output[r.output.index("{"):])
        assert res[dt]["dtype"] == dt and res[dt]["device"] == "cpu"
    assert abs(res["float32"]["clean_accuracy"] - res["bfloat16"]["clean_accuracy"]) <= 0.05
    assert res["float32"]["n_triggered"] == res["bfloat16"]["n_triggered"] > 0


@pytest.mark.parametrize("cmd", ["evaluate", "attack", "analyze", "guard", "sanitize"])
def test_every_model_command_has_device_and_dtype(cmd):
    r = CliRunner().invoke(main, [cmd, "--help"])
    assert r.exit_code == 0
    assert "--device" in r.output and "--dtype" in r.output
    assert ("--batch-size" in r.output) == (cmd == "evaluate")


# ----------------------------------------------------------------------------- copies and --link
def test_sanitize_link_shares_unchanged_files_only(micro_zoo, attacked, tmp_path, digest):
    before = digest(attacked)
    out = tmp_path / "repaired"
    r = CliRunner().invoke(main, ["sanitize", str(attacked), "--method", "subspace", "--param", "rank=1",
                                  "--reference", str(micro_zoo.reference), "--link", "--out", str(out),
                                  "--format", "json"])
    assert r.exit_code == 0, r.output
    rec = json.loads(r.output[r.output.index("{"):])
    assert not any("--link" in w for w in rec["warnings"])
    info = detect_format(attacked)
    proj_files = {str(f.relative_to(attacked)) for f in info.files}
    src, dst = _files(attacked), _files(out)
    assert src.keys() == dst.keys() and proj_files
    for name, p in src.items():
        shared = os.stat(p).st_ino == os.stat(dst[name]).st_ino
        assert shared == (name not in proj_files), name
    assert digest(attacked) == before  # the input is unchanged
    rt = LlavaRuntime.from_pretrained(out)
    assert not torch.equal(rt.projector.linear_2.weight, load_projector(attacked).layers[1].weight)


def test_link_falls_back_to_a_copy_and_says_so(make_hf_llava, tmp_path, digest, monkeypatch):
    src, _ = make_hf_llava(sharded=True)
    before = digest(src)

    def no_link(*a, **k):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(writer_mod.os, "link", no_link)
    warnings: list[str] = []
    out = write_projector(src, _perturbed(load_projector(src)), tmp_path / "out", link=True, warnings=warnings)
    assert len(warnings) == 1 and "copied instead of hard-linked" in warnings[0] and "cross-device" in warnings[0]
    after = digest(out)
    changed = {k for k in after if after[k] != before[k]}
    assert changed == {str(f.relative_to(src)) for f in detect_format(src).files}
    assert digest(src) == before
    assert all(os.stat(p).st_ino != os.stat(out / n).st_ino for n, p in _files(src).items())


def test_copy_path_is_byte_identical_with_and_without_the_kernel(make_hf_llava, tmp_path, digest, monkeypatch):
    from transformers import LlavaForConditionalGeneration

    src, _ = make_hf_llava(sharded=True)
    before = digest(src)
    proj_files = {str(f.relative_to(src)) for f in detect_format(src).files}
    new = _perturbed(load_projector(src))
    outs = [write_projector(src, new, tmp_path / "fast")]

    def refuse(*a, **k):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(writer_mod.os, "copy_file_range", refuse)
    monkeypatch.setattr(writer_mod, "_reflink", lambda fi, fo: False)
    outs.append(write_projector(src, new, tmp_path / "userspace"))
    assert digest(src) == before
    for out in outs:
        after = digest(out)
        assert after.keys() == before.keys()
        assert {k for k in after if after[k] != before[k]} == proj_files  # all the others byte-identical
        assert all(os.stat(p).st_ino != os.stat(out / n).st_ino for n, p in _files(src).items())
        LlavaForConditionalGeneration.from_pretrained(out)
    assert digest(outs[0]) == digest(outs[1])


def test_sparse_files_copy_byte_identical_and_stay_sparse(tmp_path):
    src = tmp_path / "sparse.bin"
    with open(src, "wb") as f:
        f.write(b"head" * 1000)
        f.seek(64 << 20)
        f.write(b"middle" * 1000)
        f.seek(160 << 20)
        f.write(b"tail")
        f.truncate(200 << 20)  # ends in a hole
    dst = tmp_path / "copy.bin"
    writer_mod._copy_file(src, dst)
    assert src.read_bytes() == dst.read_bytes()
    assert os.stat(dst).st_blocks <= os.stat(src).st_blocks + 64  # the holes were not written out
    empty = tmp_path / "empty"
    empty.touch()
    writer_mod._copy_file(empty, tmp_path / "empty2")
    assert (tmp_path / "empty2").read_bytes() == b""


def test_link_refuses_symlinks_leaving_the_checkpoint(make_hf_llava, tmp_path, digest):
    from projlens_defense.errors import CheckpointError

    src, _ = make_hf_llava()
    secret = tmp_path / "secret.txt"
    secret.write_text("outside")
    (src / "notes.txt").symlink_to(secret)
    with pytest.raises(CheckpointError, match="resolves outside the checkpoint"):
        write_projector(src, _perturbed(load_projector(src)), tmp_path / "out", link=True)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_link_follows_a_symlink_inside_the_checkpoint_to_its_file(make_hf_llava, tmp_path):
    src, _ = make_hf_llava()
    (src / "blob.json").write_text("{}")
    (src / "alias.json").symlink_to("blob.json")
    out = write_projector(src, _perturbed(load_projector(src)), tmp_path / "out", link=True)
    assert not (out / "alias.json").is_symlink()
    assert os.stat(out / "alias.json").st_ino == os.stat(src / "blob.json").st_ino
