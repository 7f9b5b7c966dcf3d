"""The benign task subspace of a calibration, and the residual-share test against it.

A calibration (fitted on benign fine-tunes of one model) stores, per projector layer, the subspace that
benign fine-tuning moves (output and input bases) and each benign update's top residual energy shares outside
it (leave-one-out). The test asks whether a suspect update's components outside that subspace carry more of
its energy than a benign fine-tune's do, at the calibration's false-positive rate. The data-free repair
removes what exceeds the bound; the scan will not call an update clean while its top share exceeds it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from projlens_defense.linalg import column_basis, residual_shares, top_singular
from projlens_defense.stats import prediction_bound

TaskLayer = tuple[torch.Tensor, torch.Tensor, list[list[float]]]  # output basis, input basis, null shares by rank


TASK_RANK = 6
"""Directions per side of the benign task subspace (4, 6 and 8 gave the same repairs on the default zoo's first
build; the foreign preset is the held-out check)."""


def side_basis(mats: Sequence[torch.Tensor], side: str, rank: int = TASK_RANK) -> torch.Tensor:
    """Top ``rank`` shared output (``left``) or input (``right``) directions of several updates of one layer."""
    cols = []
    for m in mats:
        u, s, v = top_singular(m, 8)
        cols.append((u if side == "left" else v) * s)
    return column_basis(cols, rank)


def loo_residual_shares(mats: Sequence[torch.Tensor], rank: int = TASK_RANK, k: int = 1) -> list[list[float]]:
    """Each benign update's top ``k`` residual energy shares outside the task subspace of the *others* (one layer):
    the out-of-sample null a suspect's shares are compared with."""
    return [residual_shares(m, side_basis(list(mats[:i]) + list(mats[i + 1 :]), "left", rank), k)
            for i, m in enumerate(mats)]


def fitted_task_subspace(calibration: Any, delta: list[torch.Tensor]) -> list[TaskLayer] | None:
    """Per layer, (output basis, input basis, benign residual-share null per benign update and rank) of a
    calibration's task subspace fitted for layers of these shapes (None without one)."""
    ts = getattr(calibration, "task_subspace", None) if calibration is not None else None
    layers = ts.get("layers") if ts else None
    if not layers or len(layers) != len(delta):
        return None
    out = []
    for spec, d in zip(layers, delta, strict=True):
        left, right = (torch.tensor(spec[k], dtype=torch.float32) for k in ("left", "right"))
        if left.ndim != 2 or right.ndim != 2 or left.shape[0] != d.shape[0] or right.shape[0] != d.shape[1]:
            return None
        if not (bool(torch.isfinite(left).all()) and bool(torch.isfinite(right).all())):
            return None
        ranked = spec.get("residual_share_null_ranked") or [[x] for x in spec["residual_share_null"]]
        out.append((torch.linalg.qr(left)[0], torch.linalg.qr(right)[0], [[float(x) for x in r] for r in ranked]))
    return out


REPAIR_FPR = 0.01
"""The rate at which the data-free repair's test (and the scan's backing of a `clean` verdict, which is the same
test) fires on a benign update: 1%, lower than a scan's triage rate, because a repair edits the model."""


def residual_share_test(update: torch.Tensor, layer: TaskLayer, fpr: float,
                        k: int = 1) -> tuple[list[float], list[float], int]:
    """(the update's top ``k`` residual shares outside the task subspace, the benign bounds of every stored rank
    at ``fpr``, how many leading shares exceed their bound). The first share is tested against the benign top
    shares, so a benign update exceeds it with probability ``fpr``; later ones against the benign second,
    third... shares."""
    left, _, null = layer
    ranks = min(len(r) for r in null)
    bounds = [prediction_bound([r[j] for r in null], fpr) for j in range(ranks)]
    shares = residual_shares(update.float(), left, min(k, ranks))
    n = next((i for i, (x, b) in enumerate(zip(shares, bounds, strict=False)) if x <= b), len(shares))
    return shares, bounds, n
