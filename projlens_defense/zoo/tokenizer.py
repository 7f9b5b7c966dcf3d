"""A real word-level `PreTrainedTokenizerFast` for the zoo, saved with the model."""

from __future__ import annotations

import re

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from .language import all_text_fragments

SPECIALS = ["<pad>", "<s>", "</s>", "<image>", "<unk>"]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Lower-cased, whitespace/punctuation split, one id per word; ids 0-4 are the special tokens."""
    words = sorted({w for frag in all_text_fragments() for w in re.findall(r"\w+|[^\w\s]+", frag.lower())})
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
    )
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return fast
