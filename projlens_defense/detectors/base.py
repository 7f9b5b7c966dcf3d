"""The detector interface: what a detector gets (:class:`ScanInput`) and returns (:class:`DetectorReport`).

In scikit-learn's spirit: a detector is configured in ``__init__``, may be ``fit`` on benign
examples (most weight-space detectors need nothing and return ``self``), and ``score``-s one
suspect, returning plain data. Higher scores mean more suspicious. A detector that needs
something the input lacks (a reference, the LLM read-out) raises :class:`MissingInput`; the
scan then records that the detector was skipped instead of failing the checkpoint.
"""

from __future__ import annotations

import inspect
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch

from projlens_defense.checkpoint.reader import LmReadout
from projlens_defense.jsonsafe import finite
from projlens_defense.projector import Projector

__all__ = [
    "Detector",
    "DetectorReport",
    "MissingInput",
    "OvLayer",
    "ScanInput",
    "display_token",
    "matmul32",
    "token_name",
    "top_singular",
    "word_token_mask",
]

LOWRANK_MIN_DIM = 512
"""Matrices whose smaller side exceeds this use a randomized truncated SVD (torch.svd_lowrank)."""
SVD_RANK = 8
"""Singular triplets computed once per matrix and shared by every detector of a scan."""


def _fast_bf16() -> bool:
    try:
        return bool(torch.cpu._is_avx512_bf16_supported())
    except Exception:  # noqa: BLE001 - private API; be conservative
        return False


FAST_BF16 = _fast_bf16()


def matmul32(m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``m @ x`` as float32. A bf16 ``m`` (LLM weights as stored) multiplies natively where the CPU
    has bf16 kernels (10x faster than converting 32000 x 4096 first), else it is converted."""
    if m.dtype == torch.bfloat16 and FAST_BF16:
        return (m @ x.to(torch.bfloat16)).float()
    return m.float() @ x.float()


def top_singular(
    m: torch.Tensor, k: int, seed: int = 0, min_dim: int = LOWRANK_MIN_DIM
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-``k`` singular triplets (U [out,k], S [k], V [in,k]) of a 2-D matrix, in float32.

    Exact SVD for small matrices; a seeded randomized SVD (``torch.svd_lowrank`` with 8 extra
    columns of oversampling and 3 power iterations) once ``min(m.shape) > min_dim``.
    """
    m = m.float()
    k = max(1, min(k, min(m.shape)))
    if min(m.shape) <= min_dim:
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        return u[:, :k], s[:k], vh[:k].T
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(m, q=min(min(m.shape), k + 8), niter=3)
    finally:
        torch.random.set_rng_state(state)
    return u[:, :k], s[:k], v[:, :k]


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


@dataclass(eq=False)
class ScanInput:
    """Everything a detector may look at for one suspect checkpoint.

    ``projector``: the suspect; ``reference``: the projector it was fine-tuned from, if known;
    ``readout``: the LLM input embeddings / ``lm_head`` (for the logit lens), if the checkpoint has
    them; ``ov_layers`` / ``final_norm``: the first LLM attention layers' value->output maps and
    the final norm gain (for the attention lens); ``vocab``: id -> token string, if a tokenizer
    was found; ``path``/``format``: provenance. Activation-space detectors can carry probe data
    in ``extras``.
    """

    projector: Projector
    reference: Projector | None = None
    readout: LmReadout | None = None
    ov_layers: list[OvLayer] = field(default_factory=list)
    final_norm: torch.Tensor | None = None
    vocab: list[str] | None = None
    path: str | None = None
    format: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)
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


@dataclass
class DetectorReport:
    """One detector's verdict material for one checkpoint.

    ``score``: the detector's headline number (higher = more suspicious, uncalibrated);
    ``signals``: named scalar signals, each oriented so that higher = more suspicious (these are
    what a calibration normalises and combines); ``evidence``: anything JSON-serialisable a human
    may want (per-layer numbers, token readings); ``suspected_tokens``: ranked token strings.
    """

    name: str
    score: float
    signals: dict[str, float] = field(default_factory=dict)
    evidence: dict[str, Any] = field(default_factory=dict)
    suspected_tokens: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (NaN/inf become null)."""
        return finite(asdict(self))


class Detector(ABC):
    """Abstract base. Subclasses set ``name`` (the registry / CLI name), take every parameter as an explicit
    keyword of ``__init__`` stored under its own name (so :meth:`get_params` finds them), and implement
    :meth:`score`.

    ``requires_reference`` / ``requires_readout`` say what the detector cannot work without; the
    scan skips a detector whose requirements the input does not meet. ``learns``: :meth:`fit` learns
    from benign inputs (a calibration refits it without each benign input before scoring that one);
    its learnt state is what :meth:`get_state` returns and :meth:`set_state` restores (None: no state).
    """

    name: ClassVar[str] = "detector"
    requires_reference: ClassVar[bool] = False
    requires_readout: ClassVar[bool] = False
    learns: ClassVar[bool] = False

    @classmethod
    def param_names(cls) -> list[str]:
        """The keyword parameters of ``__init__``, in order."""
        sig = inspect.signature(cls.__init__)
        return [p.name for p in sig.parameters.values()
                if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]

    def get_params(self) -> dict[str, Any]:
        """The parameters this detector was made with (``type(d)(**d.get_params())`` is an unfitted copy)."""
        return {k: getattr(self, k) for k in self.param_names()}

    def fit(self, benign: Sequence[ScanInput]) -> Detector:  # noqa: B027 - optional hook
        """Learn from benign examples (only where ``learns``; weight-space detectors need none). Returns self."""
        return self

    def get_state(self) -> dict[str, Any] | None:
        """What :meth:`fit` learnt, as JSON-able data a calibration stores (None: nothing learnt to store)."""
        return None

    def set_state(self, state: dict[str, Any]) -> Detector:
        """Restore :meth:`get_state` output. Returns self."""
        return self

    def can_score(self, inp: ScanInput) -> bool:
        """Whether ``inp`` has what this detector needs."""
        if self.requires_reference and inp.reference is None:
            return False
        return not (self.requires_readout and (inp.readout is None or readout_matrix(inp) is None))

    @abstractmethod
    def score(self, inp: ScanInput) -> DetectorReport:
        """Score one suspect; higher is more suspicious."""

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({params})"


# ----------------------------------------------------------------------------- token helpers
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


def readout_matrix(inp: ScanInput) -> torch.Tensor | None:
    """The first available LLM read-out matrix [vocab, hidden] (input embeddings, else lm_head)."""
    r = inp.readout
    if r is None:
        return None
    return r.embed_tokens if r.embed_tokens is not None else r.lm_head
