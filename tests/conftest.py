"""Shared fixtures. Checkpoint builders: tiny real checkpoints in every supported layout."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

VISION_DIM = 16
TEXT_DIM = 24
VOCAB = 50

# transformers' save_pretrained (5.x) still writes the legacy names; these give the current ones.
NEW_PREFIXES = (
    ("multi_modal_projector.", "model.multi_modal_projector."),
    ("vision_tower.", "model.vision_tower."),
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
)


def _tiny_llava(seed: int = 0, next_: bool = False, **kw: object) -> nn.Module:
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
    )

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=VISION_DIM,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=8,
        patch_size=4,
    )
    text = LlamaConfig(
        hidden_size=TEXT_DIM,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        vocab_size=VOCAB,
    )
    if next_:
        model = LlavaNextForConditionalGeneration(
            LlavaNextConfig(vision_config=vision, text_config=text, image_grid_pinpoints=[[8, 8]], **kw)
        )
    else:
        model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, **kw))
    with torch.no_grad():  # make biases non-trivial so bias bugs show up
        for p in model.parameters():
            if p.ndim == 1:
                p.normal_(0, 0.5)
    return model.eval()


def _rename_to_new_prefix(ckpt: Path) -> None:
    path = ckpt / "model.safetensors"
    tensors = load_file(path)
    out = {}
    for k, v in tensors.items():
        for old, new in NEW_PREFIXES:
            if k.startswith(old):
                k = new + k[len(old) :]
                break
        out[k] = v
    save_file(out, path, metadata={"format": "pt"})


@pytest.fixture
def tiny_llava() -> Callable[..., nn.Module]:
    """Factory: a tiny real LlavaForConditionalGeneration (vision 16 -> text 24, vocab 50)."""
    return _tiny_llava


@pytest.fixture
def make_hf_llava(tmp_path: Path) -> Callable[..., tuple[Path, nn.Module]]:
    """Factory: save a tiny LLaVA with save_pretrained; returns (dir, model).

    ``sharded`` uses a small max_shard_size; ``new_prefix`` renames keys to the current
    ``model.multi_modal_projector.*`` / ``model.language_model.*`` names; ``next_`` builds LLaVA-NeXT;
    ``dtype`` casts before saving.
    """
    counter = iter(range(1000))

    def make(
        sharded: bool = False,
        new_prefix: bool = False,
        next_: bool = False,
        seed: int = 0,
        dtype: torch.dtype | None = None,
        **cfg: object,
    ) -> tuple[Path, nn.Module]:
        model = _tiny_llava(seed, next_=next_, **cfg)
        if dtype is not None:
            model = model.to(dtype)
        d = tmp_path / f"hf{next(counter)}"
        model.save_pretrained(d, max_shard_size="20KB" if sharded else "5GB")
        if new_prefix:
            assert not sharded
            _rename_to_new_prefix(d)
        return d, model

    return make


def _mlp(in_dim: int, hidden: int, out: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out)).eval()


@pytest.fixture
def make_mm_projector(tmp_path: Path) -> Callable[..., tuple[Path, nn.Module]]:
    """Factory: an original-LLaVA ``mm_projector.bin`` / ``.safetensors`` (mlp2x_gelu or linear).

    Returns (path, module); the module is the nn.Sequential / nn.Linear the keys came from.
    """
    counter = iter(range(1000))

    def make(
        kind: str = "mlp2x_gelu",
        fmt: str = "bin",
        prefix: str = "model.mm_projector.",
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        with_config: bool = False,
    ) -> tuple[Path, nn.Module]:
        if kind == "linear":
            torch.manual_seed(seed)
            module: nn.Module = nn.Linear(VISION_DIM, TEXT_DIM)
        else:
            module = _mlp(VISION_DIM, TEXT_DIM, TEXT_DIM, seed)
        module = module.to(dtype)
        sd = {prefix + k: v.detach().clone() for k, v in module.state_dict().items()}
        d = tmp_path / f"mm{next(counter)}"
        d.mkdir()
        path = d / f"mm_projector.{fmt}"
        if fmt == "bin":
            torch.save(sd, path)
        else:
            save_file(sd, path, metadata={"format": "pt"})
        if with_config:
            (d / "config.json").write_text(
                json.dumps({"mm_projector_type": kind, "mm_hidden_size": VISION_DIM})
            )
        return path, module

    return make


def _patch_merger(rms: bool, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if rms:
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLPatchMerger

        merger = Qwen2_5_VLPatchMerger(dim=TEXT_DIM, context_dim=VISION_DIM, spatial_merge_size=2)
    else:
        from transformers.models.qwen2_vl.modeling_qwen2_vl import PatchMerger

        merger = PatchMerger(dim=TEXT_DIM, context_dim=VISION_DIM, spatial_merge_size=2)
    with torch.no_grad():
        for p in merger.parameters():
            if p.ndim == 1:
                p.normal_(0, 0.5)
    return merger.eval()


@pytest.fixture
def make_merger(tmp_path: Path) -> Callable[..., tuple[Path, nn.Module]]:
    """Factory: a Qwen2-VL (LayerNorm) or Qwen2.5-VL (RMSNorm) PatchMerger saved to one safetensors file."""
    counter = iter(range(1000))

    def make(prefix: str = "visual.merger.", rms: bool = False, seed: int = 0) -> tuple[Path, nn.Module]:
        merger = _patch_merger(rms, seed)
        sd = {prefix + k: v.detach().clone().contiguous() for k, v in merger.state_dict().items()}
        path = tmp_path / f"merger{next(counter)}.safetensors"
        save_file(sd, path, metadata={"format": "pt"})
        return path, merger

    return make


@pytest.fixture
def make_qwen2_vl(tmp_path: Path) -> Callable[..., tuple[Path, nn.Module]]:
    """Factory: a tiny real Qwen2VLForConditionalGeneration saved with save_pretrained."""

    def make(seed: int = 0) -> tuple[Path, nn.Module]:
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

        torch.manual_seed(seed)
        cfg = Qwen2VLConfig(
            vision_config=dict(
                depth=1, embed_dim=VISION_DIM, hidden_size=TEXT_DIM, num_heads=2, mlp_ratio=2, patch_size=2,
                spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
            ),
            text_config=dict(
                hidden_size=TEXT_DIM, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=2, vocab_size=VOCAB, bos_token_id=0, eos_token_id=1,
                rope_scaling={"type": "mrope", "mrope_section": [2, 2, 2]},
            ),
        )  # fmt: skip
        model = Qwen2VLForConditionalGeneration(cfg).eval()
        d = tmp_path / f"qwen{seed}"
        model.save_pretrained(d)
        return d, model

    return make


def tree_digest(path: Path) -> dict[str, str]:
    """sha256 of every file under ``path`` (or of the file itself), keyed by relative name."""
    if path.is_file():
        return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()}
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = Path(root) / f
            out[str(p.relative_to(path))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture
def digest() -> Callable[[Path], dict[str, str]]:
    """sha256 per file of a checkpoint file or dir, to prove an input was not modified."""
    return tree_digest


@pytest.fixture(scope="session")
def tiny_llava_factory() -> Callable[..., nn.Module]:
    """Session-scoped access to the tiny LLaVA builder, for module-scoped fixtures."""
    return _tiny_llava


# ----------------------------------------------------------------------------- the micro zoo
@pytest.fixture(scope="session")
def micro_zoo():
    """The seconds-scale zoo (real staged training), built once per machine in the user cache
    (or $PROJLENS_CACHE) and shared by every test that trains or evaluates."""
    from projlens_defense.zoo.build import ZooConfig, get_zoo

    return get_zoo(ZooConfig.micro(), progress=False)


@pytest.fixture(scope="session")
def micro_attacks(micro_zoo, tmp_path_factory):
    """A backdoored (badnets, 20% poison) and a benign projector fine-tune of the micro zoo's reference, each trained
    once per session: (dir holding ``backdoored/`` and ``benign/``, their attack records)."""
    from projlens_defense.attacks.finetune import AttackConfig, run_attack

    out = tmp_path_factory.mktemp("attacks")
    recs = {}
    for name, cfg in {
        "backdoored": AttackConfig(variant="badnets", poison_rate=0.2, seed=0),
        "benign": AttackConfig(variant=None, seed=0, eval_variant="badnets"),
    }.items():
        recs[name] = run_attack(cfg, micro_zoo.reference, micro_zoo.train_data, micro_zoo.test_data, out / name,
                                progress=False)
    return out, recs
