"""Pieces shared by the tests that build tiny LLaVA checkpoints with a planted target token."""

from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB = 50


def tokenizer_json(vocab_size: int = VOCAB) -> dict:
    """A word-level tokenizer.json whose tokens are ``<pad> <s> </s> tok3 ... tok{vocab_size-1}``."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"tok{i}": i for i in range(3, vocab_size)}}
    return {"model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<pad>"}, "added_tokens": []}


def save_with_tokenizer(model: torch.nn.Module, d: Path) -> Path:
    """``save_pretrained`` plus the tokenizer the logit lens reads token names from."""
    model.save_pretrained(d)
    (d / "tokenizer.json").write_text(json.dumps(tokenizer_json()))
    return d


def attention_direction(model: torch.nn.Module, token: int) -> torch.Tensor:
    """The projector-output direction that raises ``token``'s logit most through the OV circuit:
    (g * OV)^T @ lm_head[token] (what a backdoor targeting that token would learn)."""
    lm = model.model.language_model
    ov = sum(layer.self_attn.o_proj.weight @ layer.self_attn.v_proj.weight * layer.input_layernorm.weight[None]
             for layer in lm.layers)
    w = (lm.norm.weight[:, None] * ov).T @ model.lm_head.weight[token]
    return (w / w.norm()).detach()
