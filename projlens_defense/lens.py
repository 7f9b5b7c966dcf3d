"""The logit lens: read directions in the LLM's input space as scores over its vocabulary.

A direction ``w`` is read in one of three ways, each a score per vocabulary token: ``attention`` (what an
image token moved along ``w`` writes into the answer position through the first attention layers' value ->
output maps, read by ``lm_head``), ``embed`` / ``lm_head`` (cosine of ``w`` with each token's input embedding /
unembedding row). Scores are z-scored over the word tokens. The
:class:`~projlens_defense.detectors.logit_lens.LogitLensDetector` scores checkpoints with it; data-free
mitigations name the target with it, and read what a calibration stored of a fitted lens
(:func:`stored_task_basis`, :func:`token_novelty`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from projlens_defense.errors import CheckpointError
from projlens_defense.linalg import matmul32
from projlens_defense.scan_input import MissingInput, ScanInput, readout_matrix
from projlens_defense.tokens import token_name

__all__ = ["DEFAULT_STD_FLOOR", "READINGS", "LensReading", "available_readings", "default_readings",
           "lens_reading", "stored_task_basis", "token_novelty"]

DEFAULT_STD_FLOOR = 0.5
"""The smallest benign standard deviation a token's novelty divides by (score kinds; influence: x the median)."""
READINGS = ("attention", "embed", "lm_head")
_CHUNK = 8192


def _cosines(matrix: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """cos(row_t, direction_j) for every vocabulary row: [V, k], streaming the matrix in chunks."""
    d = directions.float()
    d = d / d.norm(dim=0, keepdim=True).clamp_min(1e-12)
    out = torch.empty(matrix.shape[0], d.shape[1])
    for s in range(0, matrix.shape[0], _CHUNK):
        rows = matrix[s : s + _CHUNK]
        norms = torch.linalg.vector_norm(rows, dim=1, keepdim=True, dtype=torch.float32)
        out[s : s + _CHUNK] = matmul32(rows, d) / norms.clamp_min(1e-12)
    return out


def _logits(head: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    out = torch.empty(head.shape[0], x.shape[1])
    for s in range(0, head.shape[0], _CHUNK):
        out[s : s + _CHUNK] = matmul32(head[s : s + _CHUNK], x)
    return out


def available_readings(inp: ScanInput) -> list[str]:
    """Readings ``inp`` supports, best first."""
    r = inp.readout
    out = []
    if inp.ov_layers and readout_matrix(inp, "lm_head") is not None:
        out.append("attention")
    if r is not None and r.embed_tokens is not None:
        out.append("embed")
    if r is not None and r.lm_head is not None and not r.tied:
        out.append("lm_head")
    return out


def default_readings(inp: ScanInput) -> list[str]:
    """``attention`` when possible, else the plain embedding / unembedding lens."""
    avail = available_readings(inp)
    return ["attention"] if "attention" in avail else avail


@dataclass
class LensReading:
    """Per-token z-scores [V, columns] of some directions under some readings.

    ``labels[c]`` names column c (``reading:direction sign``); ``mask`` marks word tokens (others
    are -inf); ``raw`` holds the unnormalised scores (cosine or logit); ``influence`` [V] is each
    token's share of the weighted directions' total reading, ``||raw_t * weights||`` over the
    first reading's positive columns, relative to its root mean square over word tokens.
    """

    z: torch.Tensor
    raw: torch.Tensor
    labels: list[str]
    mask: torch.Tensor
    influence: torch.Tensor | None = None

    def token_scores(self) -> torch.Tensor:
        """Each token's best z over all columns (-inf for non-word tokens)."""
        return self.z.max(dim=1).values

    def best_column(self) -> torch.Tensor:
        return self.z.max(dim=1).indices

    def column_tops(self, vocab: Sequence[str] | None, n: int = 5) -> dict[str, list[str]]:
        """The ``n`` best tokens of each column."""
        out = {}
        n = min(n, int(self.mask.sum()))
        top = torch.topk(self.z, n, dim=0).indices
        for c, label in enumerate(self.labels):
            order = top[:, c].tolist()
            out[label] = [token_name(vocab, t) for t in order]
        return out


def lens_reading(inp: ScanInput, directions: torch.Tensor, names: Sequence[str],
                 readings: Sequence[str] | None = None, weights: torch.Tensor | None = None) -> LensReading:
    """Read the columns of ``directions`` [hidden, k] (named ``names``), with both signs.

    ``weights`` [w <= k] (e.g. singular values) weigh the first ``w`` directions for ``influence``.
    """
    readings = list(readings) if readings else default_readings(inp)
    if not readings:
        raise MissingInput("needs the LLM input embeddings or lm_head (not in the checkpoint)")
    hidden = directions.shape[0]
    head = readout_matrix(inp, "lm_head")
    r = inp.readout
    assert r is not None
    size = min(m.shape[0] for m in (r.embed_tokens, r.lm_head) if m is not None)
    for m in (r.embed_tokens, r.lm_head):
        if m is not None and m.shape[1] != hidden:
            raise MissingInput(f"LLM width {m.shape[1]} != projector output width {hidden}: no logit lens")
    k = directions.shape[1]
    pos = directions.float() / directions.float().norm(dim=0, keepdim=True).clamp_min(1e-12)
    signs = [f"{n}{s}" for n in names for s in "+-"]
    order = [j for i in range(k) for j in (i, i + k)]  # u1+, u1-, u2+, ... (each reading is linear in w)
    mask = inp.word_mask(size)
    if int(mask.sum()) < 3:
        raise MissingInput("fewer than 3 word tokens in the vocabulary: no logit lens")
    raws, labels = [], []
    for reading in readings:
        if reading == "attention":
            if not inp.ov_layers or head is None:
                raise MissingInput("attention reading needs the LLM's first layers and lm_head")
            y = sum(layer.apply(pos) for layer in inp.ov_layers)
            assert isinstance(y, torch.Tensor)
            if inp.final_norm is not None:
                y = y * inp.final_norm.float()[:, None]
            raw = _logits(head[:size], y)
        elif reading in ("embed", "lm_head"):
            m = r.embed_tokens if reading == "embed" else r.lm_head
            if m is None:
                raise MissingInput(f"{reading} reading needs the LLM's {reading} matrix")
            raw = _cosines(m[:size], pos)
        else:
            raise ValueError(f"unknown reading {reading!r} (known: {', '.join(READINGS)})")
        raws.append(torch.cat([raw, -raw], dim=1)[:, order])
        labels += [f"{reading}:{s}" for s in signs]
    raw = torch.cat(raws, dim=1)
    if not bool(torch.isfinite(raw).all()):  # cheaper than checking 32000 x 4096 inputs element by element
        raise CheckpointError(f"{inp.path or 'checkpoint'}: the LLM read-out (lm_head / embeddings / first "
                              "attention layers) has NaN/inf values")
    rm = raw[mask]
    z = (raw - rm.mean(0)) / rm.std(0).clamp_min(1e-12)
    z = z.masked_fill(~mask[:, None], float("-inf"))
    influence = None
    if weights is not None and len(weights):
        w = weights.float()[: directions.shape[1]]
        plus = raws[0][:, 0 : 2 * len(w) : 2]  # the "+" columns of the weighted directions
        infl = (plus * w[None]).norm(dim=1)
        influence = infl / infl[mask].pow(2).mean().sqrt().clamp_min(1e-12)
        influence = influence.masked_fill(~mask, float("-inf"))
    return LensReading(z=z, raw=raw, labels=labels, mask=mask, influence=influence)


def token_novelty(baseline: dict[str, Any] | None, std_floor: float, scores: torch.Tensor | None,
                  kind: str = "score") -> torch.Tensor | None:
    """Per-token (value - benign mean) / max(benign std, floor) against a fitted lens's ``baseline`` (its
    per-token benign statistics of ``kind``); None if unfitted, for another vocabulary, or without ``kind``."""
    b = baseline
    if scores is None or not b or int(b.get("vocab_size", -1)) != scores.shape[0] or kind not in b:
        return None
    mu = torch.tensor(b[kind]["mean"], dtype=torch.float32)
    sd = torch.tensor(b[kind]["std"], dtype=torch.float32)
    floor = std_floor if kind.endswith("score") else std_floor * float(sd.median())
    sd = sd.clamp_min(max(floor, 1e-6))
    return ((scores - mu) / sd).masked_fill(torch.isinf(scores), float("-inf"))


def stored_task_basis(state: dict[str, Any] | None) -> torch.Tensor | None:
    """The benign task subspace [hidden, r] a fitted lens's stored state holds, re-orthonormalised after JSON
    rounding (None without a finite 2-D one)."""
    basis = (state or {}).get("task_basis")
    if not basis:
        return None
    b = torch.tensor(basis, dtype=torch.float32)
    if b.ndim != 2 or not bool(torch.isfinite(b).all()):
        return None
    return torch.linalg.qr(b)[0]
