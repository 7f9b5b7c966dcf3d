"""Logit-lens detector: which tokens do the dominant directions of the projector's update point at?

ProjLens finding 2: a backdoored projector shifts its outputs toward a direction aligned with the
backdoor target. A direction ``w`` in the LLM's input space is read (:mod:`projlens_defense.lens`) in
one of three ways, each a score per vocabulary token:

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
from typing import Any

import torch

from projlens_defense.detectors.base import Detector, DetectorReport
from projlens_defense.lens import (
    DEFAULT_STD_FLOOR,
    LensReading,
    lens_reading,
    stored_task_basis,
    token_novelty,
)
from projlens_defense.linalg import column_basis, top_singular
from projlens_defense.scan_input import SVD_RANK, MissingInput, ScanInput
from projlens_defense.tokens import token_name

__all__ = ["LogitLensDetector"]

TASK_BASIS_STORED = 8
"""Task directions a fitted lens keeps (best first); it removes its first ``task_rank`` of them."""


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
                 std_floor: float = DEFAULT_STD_FLOOR, task_rank: int = 4, task_k: int = 5) -> None:
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
        return column_basis(cols, rank)

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
        self.task_basis = stored_task_basis(state)
        self._fits += 1
        return self

    def novelty(self, scores: torch.Tensor | None, kind: str = "score") -> torch.Tensor | None:
        """Per-token (value - benign mean) / max(benign std, floor); None if unfitted or another vocab."""
        return token_novelty(self.baseline, self.std_floor, scores, kind)

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
