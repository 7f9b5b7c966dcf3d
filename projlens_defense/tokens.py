"""Vocabulary tokens as a reader sees them: display strings, and which ids are words worth naming as a target."""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

__all__ = ["display_token", "token_name", "word_token_mask"]

_MARKERS = ("\u2581", "\u0120")  # SentencePiece "▁" and byte-level BPE "Ġ" word-start markers
_UNMARK = str.maketrans(dict.fromkeys(_MARKERS, " "))
_WORD = re.compile(r"[^\W\d_]", re.UNICODE)  # at least one letter
_SPECIAL = re.compile(r"^(<[^<>]*>|\[[A-Z_]+\]|<0x[0-9A-Fa-f]{2}>)$")


def display_token(tok: str) -> str:
    """A token as a reader expects it: word-start markers removed, whitespace trimmed."""
    return tok.translate(_UNMARK).strip()


def word_token_mask(vocab: Sequence[str] | None, size: int, special_ids: Sequence[int] = ()) -> torch.Tensor:
    """Bool mask [size] of ids worth naming as a target: real words, not special/byte/punctuation tokens.

    Without a vocab every id counts (they are reported as ``#id``).
    """
    if vocab is None:
        mask = torch.ones(size, dtype=torch.bool)
    else:
        word, special = _WORD.search, _SPECIAL.match
        keep = []
        for tok in vocab[:size]:
            shown = tok.translate(_UNMARK).strip()
            keep.append(bool(shown) and word(shown) is not None and special(tok) is None)
        keep += [False] * (size - len(keep))
        mask = torch.tensor(keep, dtype=torch.bool)
    for i in special_ids:
        if 0 <= i < size:
            mask[i] = False
    return mask


def token_name(vocab: Sequence[str] | None, i: int) -> str:
    """The display string of token ``i`` (``#i`` without a vocab)."""
    if vocab is None or i >= len(vocab) or not vocab[i]:
        return f"#{i}"
    return display_token(vocab[i]) or vocab[i]
