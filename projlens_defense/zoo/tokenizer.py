"""A real word-level `PreTrainedTokenizerFast` for a zoo domain, saved with the model."""

from __future__ import annotations

import re

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from .digits import DIGITS
from .domain import Domain

SPECIALS = list(DIGITS.language.specials)


def build_tokenizer(domain: Domain = DIGITS) -> PreTrainedTokenizerFast:
    """Lower-cased, whitespace/punctuation split, one id per word; the domain's special tokens take the first ids
    (and its chat template, if any, rides along)."""
    lang = domain.language
    words = sorted({w for frag in domain.text_fragments() for w in re.findall(r"\w+|[^\w\s]+", frag.lower())})
    vocab = {tok: i for i, tok in enumerate(lang.specials)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=lang.unk))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=lang.pad,
        bos_token=lang.bos,
        eos_token=lang.eos,
        unk_token=lang.unk,
        extra_special_tokens={"image_token": lang.image},
    )
    fast.add_special_tokens({"additional_special_tokens": lang.additional_specials})
    if lang.chat_template is not None:
        fast.chat_template = lang.chat_template
    return fast
