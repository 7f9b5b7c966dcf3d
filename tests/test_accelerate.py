"""Fine-tuning under 🤗 Accelerate: `python -m projlens_defense`, `accelerate launch ... attack` on CPU (one process:
bit-identical to the plain path; two gloo processes: slow), the in-process Accelerate loop, `bench --launcher accelerate`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from projlens_defense.attacks.finetune import AttackConfig, run_attack
from projlens_defense.eval.bench import Cell, attack_command
from projlens_defense.training import accelerate_requested
from projlens_defense.zoo.build import single_threaded

PROJ = "multi_modal_projector."
ATTACK = ["attack", "--zoo", "micro", "--variant", "badnets", "--poison-rate", "0.2", "--seed", "0", "--epochs", "1"]
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
          "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1"]


def _tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_") and k not in ("WORLD_SIZE", "RANK")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def _run(cmd: list[str], **env: str) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(**env), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r




@pytest.fixture(scope="module")
def plain_attack(micro_zoo, tmp_path_factory):
    """The reference: the same attack in this process, plain PyTorch loop, one thread (as the launched runs)."""
    out = tmp_path_factory.mktemp("acc") / "plain"
    with single_threaded():
        run_attack(AttackConfig(variant="badnets", poison_rate=0.2, seed=0, epochs=1), micro_zoo.reference,
                   micro_zoo.train_data, micro_zoo.test_data, out, progress=False)
    return out


def test_python_m_runs_the_cli():
    r = _run([sys.executable, "-m", "projlens_defense", "--help"])
    assert "attack" in r.stdout and "bench" in r.stdout and "Usage: projlens-defense" in r.stdout


def test_accelerate_detection(monkeypatch):
    for k in ("PROJLENS_ACCELERATE", "ACCELERATE_MIXED_PRECISION", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert not accelerate_requested()
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # what `accelerate launch` exports
    assert accelerate_requested()
    monkeypatch.setenv("PROJLENS_ACCELERATE", "0")
    assert not accelerate_requested()
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    monkeypatch.setenv("PROJLENS_ACCELERATE", "")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert accelerate_requested()


def test_accelerate_launch_one_process_is_bit_identical(micro_zoo, plain_attack, tmp_path):
    out = tmp_path / "acc1"
    r = _run([*LAUNCH, "--num_processes", "1", "--cpu", "-m", "projlens_defense", *ATTACK, "--out", str(out),
              "--format", "json"])
    rec = json.loads(r.stdout)
    assert rec["distributed"] == {"launcher": "accelerate", "num_processes": 1, "distributed_type": "NO",
                                  "mixed_precision": "no", "device": "cpu"}
    a, b = _tensors(plain_attack), _tensors(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert rec["metrics"] == json.loads((plain_attack / "attack.json").read_text())["metrics"]


@pytest.mark.parametrize("kind", ["lora", "external-projector"])
def test_in_process_accelerate_loop_matches_plain(micro_zoo, tmp_path, monkeypatch, kind):
    """The Accelerate loop itself (no launcher, one CPU process) on the other two callers' shapes: a LoRA-wrapped
    projector (attack --lora-rank) and an external projector module (the finetune/unlearn mitigations)."""
    from projlens_defense.checkpoint import load_projector
    from projlens_defense.conversations import load_conversations
    from projlens_defense.mitigations.base import CleanData
    from projlens_defense.mitigations.finetune import finetune_module
    from projlens_defense.projector import ProjectorModule
    from projlens_defense.runtime import LlavaRuntime

    results = []
    for flag in ("0", "1"):
        monkeypatch.setenv("PROJLENS_ACCELERATE", flag)
        with single_threaded():
            if kind == "lora":
                out = tmp_path / f"lora{flag}"
                run_attack(AttackConfig(variant="badnets", poison_rate=0.2, seed=0, lora_rank=4, epochs=1),
                           micro_zoo.reference, micro_zoo.train_data, None, out, progress=False)
                results.append({k: v for k, v in _tensors(out).items() if k.startswith(PROJ)})
            else:
                rt = LlavaRuntime.from_pretrained(micro_zoo.reference)
                clean = CleanData.from_samples(rt, load_conversations(micro_zoo.train_data), n=64, seed=0)
                module = ProjectorModule(load_projector(micro_zoo.reference))
                losses = finetune_module(module, clean, epochs=2, lr=1e-3, batch_size=16, seed=0)
                results.append({"losses": torch.tensor(losses), **dict(module.state_dict())})
    plain, acc = results
    assert plain.keys() == acc.keys() and all(torch.equal(plain[k], acc[k]) for k in plain)


def test_attack_command_for_a_cell():
    cell = Cell(None, 0.0, 3, "/m", "/d.json", "/t.json", epochs=2.0)
    cmd = attack_command(cell, Path("/ck"), "--config_file fsdp.yaml")
    assert cmd[1:5] == ["-m", "accelerate.commands.launch", "--config_file", "fsdp.yaml"]
    joined = " ".join(cmd)
    assert "-m projlens_defense attack --variant none --poison-rate 0.0 --seed 3 --model /m --data /d.json" in joined
    assert joined.endswith("--out /ck --force --format json --epochs 2.0")


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes(micro_zoo, plain_attack, tmp_path):
    """Two gloo processes (torchrun via `--multi_gpu`, ACCELERATE_USE_CPU=1): one checkpoint, written by the
    main process; the same recipe (the global batch split in two, token-weighted), so the same weights as the
    single-process run up to float round-off."""
    out = tmp_path / "acc2"
    r = _run([*LAUNCH, "--multi_gpu", "--num_processes", "2", "-m", "projlens_defense", *ATTACK, "--out", str(out),
              "--format", "json"], ACCELERATE_USE_CPU="1")
    rec = json.loads(r.stdout)  # only the main process prints
    assert rec["distributed"]["num_processes"] == 2 and rec["distributed"]["distributed_type"] == "MULTI_CPU"
    ref, two = _tensors(micro_zoo.reference), _tensors(out)
    changed = {k for k in ref if not torch.equal(ref[k], two[k])}
    assert changed and all(k.startswith(PROJ) for k in changed)
    one = _tensors(plain_attack)
    for k in changed:
        rel = ((two[k] - one[k]).norm() / (one[k] - ref[k]).norm()).item()
        assert rel < 1e-4, (k, rel)  # measured ~1e-6: summation order only
    plain = json.loads((plain_attack / "attack.json").read_text())["metrics"]
    assert abs(rec["metrics"]["asr"] - plain["asr"]) <= 0.01
    assert abs(rec["metrics"]["clean_accuracy"] - plain["clean_accuracy"]) <= 0.01


@pytest.mark.slow
def test_bench_launcher_accelerate(micro_zoo, tmp_path):
    from click.testing import CliRunner

    from projlens_defense.cli import main

    args = ["bench", "--preset", "tiny", "--variants", "badnets", "--poison-rates", "0.2", "--seeds", "0", "--epochs",
            "1", "--detectors", "logit-lens", "--mitigations", "none", "--launcher", "accelerate", "--launch-args",
            " ".join([*LAUNCH[3:], "--num_processes", "1", "--cpu"]), "--out", str(tmp_path / "b")]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    recs = [json.loads(x) for x in (tmp_path / "b" / "results.jsonl").read_text().splitlines()]
    assert len(recs) == 2
    for rec in recs:
        assert rec["launcher"] == "accelerate" and rec["attack_distributed"]["launcher"] == "accelerate"
    bd = next(x for x in recs if not x["benign"])
    assert bd["metrics"]["badnets"]["asr"] > 0.3
