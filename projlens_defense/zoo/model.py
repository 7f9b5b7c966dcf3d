"""Construction of the tiny but real `LlavaForConditionalGeneration` (CLIP vision tower + Llama LLM)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from .images import IMAGE_SIZE


@dataclass(frozen=True)
class ModelDims:
    """Sizes of the tiny LLaVA; the defaults run on 2 CPU cores."""

    vision_hidden: int = 96
    vision_layers: int = 3
    vision_heads: int = 4
    patch_size: int = 4
    text_hidden: int = 128
    text_layers: int = 2
    text_heads: int = 4


def build_llava(dims: ModelDims, vocab_size: int, image_token_id: int, pad_id: int, bos_id: int, eos_id: int,
                seed: int) -> LlavaForConditionalGeneration:
    """A freshly initialised LLaVA-1.5-shaped model (2-layer GELU projector, CLS dropped, last layer)."""
    vc = CLIPVisionConfig(
        hidden_size=dims.vision_hidden, intermediate_size=2 * dims.vision_hidden,
        num_hidden_layers=dims.vision_layers, num_attention_heads=dims.vision_heads,
        image_size=IMAGE_SIZE, patch_size=dims.patch_size, projection_dim=dims.vision_hidden,
    )
    tc = LlamaConfig(
        hidden_size=dims.text_hidden, intermediate_size=2 * dims.text_hidden,
        num_hidden_layers=dims.text_layers, num_attention_heads=dims.text_heads,
        num_key_value_heads=dims.text_heads, vocab_size=vocab_size, max_position_embeddings=256,
        tie_word_embeddings=False, pad_token_id=pad_id, bos_token_id=bos_id, eos_token_id=eos_id,
    )
    n_tokens = (IMAGE_SIZE // dims.patch_size) ** 2
    cfg = LlavaConfig(
        vision_config=vc, text_config=tc, image_token_id=image_token_id, projector_hidden_act="gelu",
        vision_feature_layer=-1, vision_feature_select_strategy="default", image_seq_length=n_tokens,
    )
    cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id = pad_id, bos_id, eos_id
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    model.generation_config.pad_token_id = pad_id
    model.generation_config.eos_token_id = eos_id
    model.generation_config.bos_token_id = bos_id
    return model


def build_image_processor(mean: Sequence[float] = (0.5, 0.5, 0.5),
                          std: Sequence[float] = (0.5, 0.5, 0.5)) -> CLIPImageProcessor:
    """CLIP preprocessing at the zoo's resolution; by default mapping pixels to [-1, 1]."""
    return CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=list(mean), image_std=list(std),
    )
