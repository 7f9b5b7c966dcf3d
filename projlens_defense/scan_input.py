"""What a scan looks at for one suspect checkpoint (:class:`ScanInput`), shared by detectors and mitigations.

The suspect projector, the reference it was fine-tuned from, the LLM read-out (embeddings, ``lm_head``, the
first attention layers' value->output maps) and the vocabulary, with the per-input caches every detector of a
scan shares (dW per layer, top singular triplets, the word-token mask), and the :class:`ProbeData` that
activation-space and input-level detectors read. Something an input lacks raises :class:`MissingInput`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import torch

from projlens_defense.checkpoint.reader import LmReadout
from projlens_defense.linalg import matmul32, top_singular
from projlens_defense.projector import Projector
from projlens_defense.tokens import word_token_mask

if TYPE_CHECKING:
    import numpy as np

    from projlens_defense.runtime import LlavaRuntime

__all__ = ["SVD_RANK", "MissingInput", "OvLayer", "ProbeData", "ScanInput", "readout_matrix"]

SVD_RANK = 8
"""Singular triplets computed once per matrix and shared by every detector of a scan."""


class MissingInput(Exception):
    """The detector cannot run on this input (no reference, no LLM read-out...). Not a user error."""


@dataclass(eq=False)
class OvLayer:
    """One LLM attention layer's value->output path: ``o_proj @ expand(v_proj) @ diag(norm)``.

    ``v_proj`` [kv_heads*head_dim, hidden], ``o_proj`` [hidden, heads*head_dim], ``norm`` [hidden]
    (the layer's input RMSNorm gain, or None); ``group`` = heads // kv_heads (grouped-query
    attention repeats each value head ``group`` times) and ``head_dim``.
    """

    v_proj: torch.Tensor
    o_proj: torch.Tensor
    norm: torch.Tensor | None = None
    group: int = 1
    head_dim: int = 0

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's OV map on directions ``x`` [hidden, k] -> [hidden, k] (float32)."""
        x = x.float()
        if self.norm is not None:
            x = x * self.norm.float()[:, None]
        v = matmul32(self.v_proj, x)
        if self.group > 1:
            k = v.shape[1]
            v = v.reshape(-1, self.head_dim, k).repeat_interleave(self.group, dim=0).reshape(-1, k)
        return matmul32(self.o_proj, v)


@dataclass(frozen=True, eq=False)
class ProbeData:
    """Data beyond the weights that activation-space and input-level detectors read (every field optional).

    ``probes``: vision features of clean probe images [N, tokens, vision_dim]; ``probe_images``: those
    images themselves (HxWx3 uint8) and ``probe_questions`` their questions (STRIP); ``inputs``: vision
    features of the inputs to judge [M, tokens, vision_dim]; ``input_images`` / ``input_questions``: the
    inputs as images and questions (image-level detectors); ``runtime``: the
    :class:`~projlens_defense.runtime.LlavaRuntime` (STRIP runs the LLM).
    """

    probes: torch.Tensor | None = None
    probe_images: Sequence[np.ndarray] | None = None
    probe_questions: Sequence[str] | None = None
    inputs: torch.Tensor | None = None
    input_images: Sequence[np.ndarray] | None = None
    input_questions: Sequence[str] | None = None
    runtime: LlavaRuntime | None = None

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The names of the fields, in order."""
        return tuple(f.name for f in fields(cls))

    def missing(self, names: Sequence[str]) -> list[str]:
        """Those of the fields ``names`` that are None (a name that is not a field raises ValueError)."""
        unknown = [n for n in names if n not in self.field_names()]
        if unknown:
            raise ValueError(f"ProbeData has no field {', '.join(unknown)}")
        return [n for n in names if getattr(self, n) is None]


@dataclass(eq=False)
class ScanInput:
    """Everything a detector may look at for one suspect checkpoint.

    ``projector``: the suspect; ``reference``: the projector it was fine-tuned from, if known;
    ``readout``: the LLM input embeddings / ``lm_head`` (for the logit lens), if the checkpoint has
    them; ``ov_layers`` / ``final_norm``: the first LLM attention layers' value->output maps and
    the final norm gain (for the attention lens); ``vocab``: id -> token string, if a tokenizer
    was found; ``path``/``format``: provenance; ``probe_data``: the clean probes, inputs to judge and
    runtime that activation-space and input-level detectors read (:class:`ProbeData`).
    """

    projector: Projector
    reference: Projector | None = None
    readout: LmReadout | None = None
    ov_layers: list[OvLayer] = field(default_factory=list)
    final_norm: torch.Tensor | None = None
    vocab: list[str] | None = None
    path: str | None = None
    format: str | None = None
    probe_data: ProbeData = field(default_factory=ProbeData)
    _cache: dict[Any, Any] = field(default_factory=dict, repr=False)

    def deltas(self) -> list[torch.Tensor]:
        """dW per layer against the reference (computed once); MissingInput without one."""
        if self.reference is None:
            raise MissingInput("needs a reference projector (--reference)")
        if "deltas" not in self._cache:
            self._cache["deltas"] = self.projector.delta(self.reference)
        return self._cache["deltas"]

    def svd(self, of: str, layer: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-``k`` singular triplets of layer ``layer``'s ``"delta"`` (dW) or ``"weight"`` (W), cached.

        At least :data:`SVD_RANK` triplets are computed once and shared by all detectors.
        """
        key = ("svd", of, layer % self.projector.num_layers)
        hit = self._cache.get(key)
        if hit is None or hit[1].shape[0] < min(k, hit[3]):
            m = self.deltas()[layer] if of == "delta" else self.projector.layers[layer].weight
            hit = self._cache[key] = (*top_singular(m, max(k, SVD_RANK)), min(m.shape))
        return hit[0][:, :k], hit[1][:k], hit[2][:, :k]

    def word_mask(self, size: int) -> torch.Tensor:
        """:func:`word_token_mask` of this input's vocabulary (cached)."""
        key = ("mask", size)
        if key not in self._cache:
            self._cache[key] = word_token_mask(self.vocab, size)
        return self._cache[key]

    def bias_deltas(self) -> list[torch.Tensor | None]:
        """db per layer against the reference (None where a layer has no bias)."""
        if self.reference is None:
            raise MissingInput("needs a reference projector (--reference)")
        out: list[torch.Tensor | None] = []
        for mine, ref in zip(self.projector.layers, self.reference.layers, strict=True):
            if mine.bias is None or ref.bias is None:
                out.append(None)
            else:
                out.append(mine.bias.float() - ref.bias.float())
        return out


def readout_matrix(inp: ScanInput, prefer: str = "embed_tokens") -> torch.Tensor | None:
    """The first available LLM read-out matrix [vocab, hidden]: the input embeddings, else ``lm_head``
    (``prefer="lm_head"``: the other way round); None without a read-out."""
    r = inp.readout
    if r is None:
        return None
    first, second = (r.lm_head, r.embed_tokens) if prefer == "lm_head" else (r.embed_tokens, r.lm_head)
    return first if first is not None else second
