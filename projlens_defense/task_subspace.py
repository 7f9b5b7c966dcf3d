"""The benign task subspace of a calibration, and the residual-share test against it.

A calibration (fitted on benign fine-tunes of one model) stores, per projector layer, the subspace that
benign fine-tuning moves (output and input bases) and each benign update's top residual energy shares outside
it (leave-one-out). The test asks whether a suspect update's top component outside that subspace carries more
of its energy than a benign fine-tune's does, at a stated false-positive rate. The data-free repair removes
that component where it exceeds the bound; the scan will not call an update clean while it does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from projlens_defense.linalg import column_basis, residual_shares, top_singular
from projlens_defense.stats import prediction_bound

TaskLayer = tuple[torch.Tensor, torch.Tensor, list[float]]  # output basis, input basis, benign top residual shares


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


def loo_residual_shares(mats: Sequence[torch.Tensor], rank: int = TASK_RANK) -> list[float]:
    """Each benign update's top residual energy share outside the task subspace of the *others* (one layer):
    the out-of-sample null a suspect's top share is compared with."""
    return [residual_shares(m, side_basis(list(mats[:i]) + list(mats[i + 1 :]), "left", rank), 1)[0]
            for i, m in enumerate(mats)]


def fitted_task_subspace(calibration: Any, delta: list[torch.Tensor]) -> list[TaskLayer] | None:
    """Per layer, (output basis, input basis, benign top residual shares) of a calibration's task subspace
    fitted for layers of these shapes (None without one)."""
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
        null = [float(x) for x in spec["residual_share_null"]]
        out.append((torch.linalg.qr(left)[0], torch.linalg.qr(right)[0], null))
    return out


REPAIR_FPR = 0.01
"""The rate at which the data-free repair's test (and the scan's backing of a `clean` verdict, which is the same
test) fires on a benign update: 1%, lower than a scan's triage rate, because a repair edits the model."""


def residual_share_test(update: torch.Tensor, layer: TaskLayer, fpr: float) -> tuple[float, float, bool]:
    """(the update's top residual share outside the task subspace, the benign bound at ``fpr``, whether it
    exceeds the bound): a benign update exceeds it with probability ``fpr``."""
    left, _, null = layer
    share = residual_shares(update.float(), left, 1)[0]
    bound = prediction_bound(null, fpr)
    return share, bound, share > bound
