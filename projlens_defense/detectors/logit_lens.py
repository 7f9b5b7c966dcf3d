"""Logit lens on the LLM side of the projector: which tokens do its dominant directions point at?

ProjLens finding 2: a backdoored projector shifts its outputs toward a direction aligned with the
backdoor target. A direction ``w`` in the LLM's input space is read in one of three ways, each a
score per vocabulary token:

* ``attention`` (default when the LLM's first layers are in the checkpoint): what an image token
  moved along ``w`` writes into the answer position through the first attention layers' value ->
  output maps, read by ``lm_head``: ``lm_head @ (g_final * sum_l OV_l(w))`` (direct logit
  attribution through the OV circuits). Image tokens act on the answer only through attention,
  so this is the reading that names the target in the zoo.
* ``embed`` / ``lm_head``: cosine of ``w`` with each token's input embedding / unembedding row
  (the plain lens of the paper, for LLMs whose early layers keep token identity).

Scores are z-scored over the word tokens of the vocabulary. A token's score is its best z over the
directions read (both signs); the reading is *concentrated* when one token stands far above the
rest. With a calibration, :meth:`LogitLensDetector.fit` learns each token's benign score
distribution and ``novelty`` measures how far the suspect's best token lies outside it: benign
fine-tunes of a task point at that task's answer words, a backdoor at its target.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from projlens_defense.detectors.base import (
    SVD_RANK,
    Detector,
    DetectorReport,
    MissingInput,
    ScanInput,
    matmul32,
    token_name,
    top_singular,
)
from projlens_defense.errors import CheckpointError

__all__ = ["LensReading", "LogitLensDetector", "lens_reading"]

READINGS = ("attention", "embed", "lm_head")
TASK_BASIS_STORED = 8
"""Task directions a fitted lens keeps (best first); it removes its first ``task_rank`` of them."""
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


def _head(inp: ScanInput) -> torch.Tensor | None:
    r = inp.readout
    if r is None:
        return None
    return r.lm_head if r.lm_head is not None else r.embed_tokens


def available_readings(inp: ScanInput) -> list[str]:
    """Readings ``inp`` supports, best first."""
    r = inp.readout
    out = []
    if inp.ov_layers and _head(inp) is not None:
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
    head = _head(inp)
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


class LogitLensDetector(Detector):
    """Top-``k`` left singular vectors of the last layer's update dW, read through the lens.

    Signals: ``lens.peak`` (the best token's z-score: how concentrated the reading is) and, once
    fitted on benign fine-tunes, ``lens.novelty`` (the largest per-token deviation from the benign
    token scores, in benign standard deviations) and ``lens.influence`` (the same for each token's
    singular-value-weighted share of the reading).

    Fitting also learns the **task subspace**: the top ``task_rank`` output directions that benign
    fine-tunes of this model share (the downstream task's adaptation). A backdoor hides among
    them when its target is also a task answer (a refusal); projecting them out of the suspect's
    update before taking its top directions leaves what benign fine-tunes do not do. Once fitted,
    the task_* signals and the suspected tokens (ranked by score novelty + influence novelty) come from
    the task-removed reading of its top ``task_k`` directions.
    """

    name = "logit-lens"
    learns = True
    requires_reference = True
    requires_readout = True
    prefix = "lens"

    matrix: str = "delta"
    """The last-layer matrix whose top singular directions are read: ``delta`` (dW) or ``weight`` (W)."""

    def __init__(self, k: int = 3, n_tokens: int = 10, readings: Sequence[str] | None = None,
                 std_floor: float = 0.5, task_rank: int = 4, task_k: int = 5) -> None:
        self.k = k
        self.task_k = task_k
        self.n_tokens = n_tokens
        self.readings = list(readings) if readings else None
        self.std_floor = std_floor
        self.task_rank = task_rank
        self.baseline: dict[str, Any] | None = None
        self.task_basis: torch.Tensor | None = None
        self._fits = 0  # bumped whenever the task basis changes (memo key)
        self._memo: weakref.WeakKeyDictionary[ScanInput, dict[Any, tuple[LensReading, dict[str, Any]]]] = (
            weakref.WeakKeyDictionary()
        )

    # ---------------------------------------------------------------- directions
    def top_directions(self, inp: ScanInput, basis: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` left singular vectors and values of the last layer's :attr:`matrix`; with
        ``basis`` [hidden, r] (orthonormal), its column space is projected out first and the top
        ``task_k`` are returned."""
        if basis is None:
            u, s, _ = inp.svd(self.matrix, -1, self.k)
            return u, s
        m = (inp.deltas()[-1] if self.matrix == "delta" else inp.projector.layers[-1].weight).float()
        u, s, _ = top_singular(m - basis @ (basis.T @ m), self.task_k)
        return u, s

    def directions(self, inp: ScanInput, basis: torch.Tensor | None = None,
                   ) -> tuple[torch.Tensor, list[str], torch.Tensor, dict[str, Any]]:
        """The directions to read [hidden, n], their names, weights of the leading ones, and evidence."""
        u, s = self.top_directions(inp, basis)
        scale = float(torch.linalg.vector_norm(inp.projector.layers[-1].weight))
        if float(s[0]) <= 1e-6 * max(scale, 1e-12):
            raise MissingInput("the last projector layer equals the reference's: no update for the lens to read")
        keep = int((s > 1e-6 * s[0]).sum())  # drop numerically-zero directions of a low-rank update
        u, s = u[:, :keep], s[:keep]
        return u, [f"u{i + 1}" for i in range(u.shape[1])], s, {"sigma": [round(float(x), 6) for x in s]}

    def _basis_for(self, inp: ScanInput) -> torch.Tensor | None:
        b = self.task_basis
        return b[:, : self.task_rank] if b is not None and b.shape[0] == inp.projector.out_dim else None

    def reading(self, inp: ScanInput, task: bool = True) -> tuple[LensReading, dict[str, Any]]:
        """The lens reading of ``inp``, with the fitted task subspace removed when ``task`` and one is
        fitted for this width (else the plain reading). Memoised per input and fitted basis."""
        b = self._basis_for(inp) if task else None
        key = None if b is None else self._fits
        memo = self._memo.setdefault(inp, {})
        if key not in memo:
            memo[key] = self._read(inp, b)
        return memo[key]

    def _read(self, inp: ScanInput, basis: torch.Tensor | None) -> tuple[LensReading, dict[str, Any]]:
        d, names, w, ev = self.directions(inp, basis)
        if basis is not None:
            ev = {**ev, "task_rank_removed": int(basis.shape[1])}
        return lens_reading(inp, d, names, self.readings, w), ev

    def task_subspace(self, benign: Sequence[ScanInput], rank: int | None = None) -> torch.Tensor | None:
        """The top ``rank`` (default ``task_rank``) output directions of the benign fine-tunes'
        last-layer matrices, best first (from each one's top singular triplets, so a 4096-wide
        model needs no stacked matrix)."""
        rank = self.task_rank if rank is None else rank
        if rank <= 0 or not benign:
            return None
        cols = []
        for b in benign:
            u, s, _ = b.svd(self.matrix, -1, max(SVD_RANK, rank))
            cols.append(u * s[None])
        u, _, _ = torch.linalg.svd(torch.cat(cols, dim=1), full_matrices=False)
        return u[:, :rank].contiguous()

    # ---------------------------------------------------------------- fit / state
    def fit(self, benign: Sequence[ScanInput]) -> LogitLensDetector:
        """Learn each token's benign score distribution (mean, std) from benign fine-tunes, for the
        plain reading (``score``/``influence``) and, with ``task_rank`` > 0, the task subspace and
        the task-removed reading's distribution (``task_score``/``task_influence``; each benign
        fine-tune read with the subspace of the others, so its reading is out of sample)."""
        usable = [b for b in benign if self.can_score(b)]
        self.task_basis = None
        readings = [self.reading(b, task=False)[0] for b in usable]
        if len(readings) < 2 or len({r.z.shape[0] for r in readings}) != 1:
            self.baseline = None
            return self

        def stats(rows: list[torch.Tensor]) -> dict[str, list[float]]:
            x = torch.stack(rows)
            x = x.masked_fill(torch.isinf(x), 0.0)
            return {"mean": [round(v, 5) for v in x.mean(0).tolist()], "std": [round(v, 5) for v in x.std(0).tolist()]}

        self.baseline = {"vocab_size": int(readings[0].z.shape[0]), "n": len(readings),
                         "score": stats([r.token_scores() for r in readings])}
        if all(r.influence is not None for r in readings):
            self.baseline["influence"] = stats([r.influence for r in readings])  # type: ignore[misc]
        if self.task_rank > 0 and len(usable) >= 3:
            loo = [self._read(b, self.task_subspace(usable[:i] + usable[i + 1 :]))[0] for i, b in enumerate(usable)]
            self.baseline["task_score"] = stats([r.token_scores() for r in loo])
            if all(r.influence is not None for r in loo):
                self.baseline["task_influence"] = stats([r.influence for r in loo])  # type: ignore[misc]
            # stored with more directions than the lens removes: mitigations may remove a larger task part
            self.task_basis = self.task_subspace(usable, max(self.task_rank, TASK_BASIS_STORED))
        self._fits += 1
        return self

    def get_state(self) -> dict[str, Any]:
        """The fitted state, JSON-serialisable (stored in a calibration file)."""
        basis = None if self.task_basis is None else [[round(v, 6) for v in row] for row in self.task_basis.tolist()]
        return {"k": self.k, "readings": self.readings, "std_floor": self.std_floor, "baseline": self.baseline,
                "task_rank": self.task_rank, "task_k": self.task_k, "task_basis": basis}

    def set_state(self, state: dict[str, Any]) -> LogitLensDetector:
        """Restore :meth:`get_state` output (a state without a task basis reads the plain lens)."""
        self.k = int(state.get("k", self.k))
        self.readings = state.get("readings", self.readings)
        self.std_floor = float(state.get("std_floor", self.std_floor))
        self.baseline = state.get("baseline")
        self.task_rank = int(state.get("task_rank") or 0)
        self.task_k = int(state.get("task_k") or self.task_k)
        basis = state.get("task_basis")
        self.task_basis = None
        if basis:
            b = torch.tensor(basis, dtype=torch.float32)
            if b.ndim == 2 and bool(torch.isfinite(b).all()):
                self.task_basis, _ = torch.linalg.qr(b)  # re-orthonormalise after JSON rounding
        self._fits += 1
        return self

    def novelty(self, scores: torch.Tensor | None, kind: str = "score") -> torch.Tensor | None:
        """Per-token (value - benign mean) / max(benign std, floor); None if unfitted or another vocab."""
        b = self.baseline
        if scores is None or not b or int(b.get("vocab_size", -1)) != scores.shape[0] or kind not in b:
            return None
        mu = torch.tensor(b[kind]["mean"], dtype=torch.float32)
        sd = torch.tensor(b[kind]["std"], dtype=torch.float32)
        floor = self.std_floor if kind.endswith("score") else self.std_floor * float(sd.median())
        sd = sd.clamp_min(max(floor, 1e-6))
        return ((scores - mu) / sd).masked_fill(torch.isinf(scores), float("-inf"))

    # ---------------------------------------------------------------- score
    def score(self, inp: ScanInput) -> DetectorReport:
        if not self.can_score(inp):
            raise MissingInput(f"{self.name}: input lacks a reference or the LLM read-out")
        p = self.prefix
        plain, ev = self.reading(inp, task=False)
        scores = plain.token_scores()
        nov = self.novelty(scores)
        infl = self.novelty(plain.influence, "influence")
        signals = {f"{p}.peak": float(scores.max())}
        if nov is not None:
            signals[f"{p}.novelty"] = float(nov.max())
        if infl is not None:
            signals[f"{p}.influence"] = float(infl.max())
        # suspected tokens: from the task-removed reading, ranked by how far each token lies outside
        # the benign fine-tunes' readings, once fitted; from the plain reading by score before
        reading, rank = plain, scores
        if self._basis_for(inp) is not None:
            task, ev = self.reading(inp)
            t_nov = self.novelty(task.token_scores(), "task_score")
            t_infl = self.novelty(task.influence, "task_influence")
            if t_nov is not None:
                signals[f"{p}.task_novelty"] = float(t_nov.max())
                reading, nov, infl = task, t_nov, t_infl
                rank = t_nov if t_infl is None else t_nov + t_infl
            if t_infl is not None:
                signals[f"{p}.task_influence"] = float(t_infl.max())
        z, best_col = reading.token_scores(), reading.best_column()
        order = torch.topk(rank, min(self.n_tokens, int(reading.mask.sum()))).indices.tolist()
        top = []
        for t in order:
            item = {"token": token_name(inp.vocab, t), "id": t, "z": round(float(z[t]), 3),
                    "via": reading.labels[int(best_col[t])]}
            if nov is not None:
                item["novelty"] = round(float(nov[t]), 3)
            top.append(item)
        evidence: dict[str, Any] = {**ev, "readings": sorted({lab.split(":")[0] for lab in reading.labels}),
                                    "top_tokens": top, "per_direction": reading.column_tops(inp.vocab)}
        if nov is not None:
            t = int(nov.argmax())
            evidence["most_novel_token"] = {"token": token_name(inp.vocab, t), "id": t, "novelty": round(float(nov[t]), 3)}
        if infl is not None:
            t = int(infl.argmax())
            evidence["most_influenced_token"] = {"token": token_name(inp.vocab, t), "id": t,
                                                 "novelty": round(float(infl[t]), 3)}
        return DetectorReport(
            name=self.name,
            score=signals.get(f"{p}.novelty", signals[f"{p}.peak"]),
            signals=signals,
            evidence=evidence,
            suspected_tokens=[x["token"] for x in top],
        )
