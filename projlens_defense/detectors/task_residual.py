"""How much of a fine-tuning update lies outside the subspace benign fine-tunes of the model move.

ProjLens finding 1 says a backdoor is a low-rank piece of dW; what makes it stand out per model is that the
piece points where benign fine-tuning of the same task does not. Fitted on benign fine-tunes, this detector
learns each projector layer's benign task subspace (the output directions their updates share) and how much of
a benign update's energy its top component outside that subspace carries (each benign update measured against
the subspace of the others). A suspect's signal is, per layer, that share in benign standard deviations; the
largest over layers is ``task.residual_share``. It reads only the weights (no LLM read-out), so it does not
depend on which tokens a target is made of; it is the same test the data-free repair removes by and the scan
backs a `clean` verdict with (:mod:`projlens_defense.task_subspace`), here as a calibrated decision signal.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

import torch

from projlens_defense.detectors.base import Detector, DetectorReport
from projlens_defense.linalg import residual_shares
from projlens_defense.scan_input import MissingInput, ScanInput
from projlens_defense.task_subspace import TASK_RANK, loo_residual_shares, side_basis

__all__ = ["SIGNAL_PREFIX", "TaskResidualDetector"]

SIGNAL_PREFIX = "task."

MIN_FIT = 3
STD_FLOOR = 1e-3  # of an energy share: a null whose benign shares agree to 0.1% does not make z explode


class TaskResidualDetector(Detector):
    """Per layer, the top residual energy share of dW outside the benign task subspace, in benign std units."""

    name = "task-residual"
    requires_reference = True
    learns = True

    def __init__(self, task_rank: int = TASK_RANK) -> None:
        self.task_rank = task_rank
        self.layers: list[dict[str, Any]] | None = None

    def fit(self, benign: Sequence[ScanInput]) -> TaskResidualDetector:
        usable = [b for b in benign if b.reference is not None]
        self.layers = None
        if len(usable) < MIN_FIT:
            return self
        layers = []
        for li in range(usable[0].projector.num_layers):
            mats = [b.deltas()[li].float() for b in usable]
            shares = loo_residual_shares(mats, self.task_rank)
            layers.append({"basis": side_basis(mats, "left", self.task_rank), "mean": statistics.fmean(shares),
                           "std": max(statistics.stdev(shares), STD_FLOOR)})
        self.layers = layers
        return self

    def get_state(self) -> dict[str, Any] | None:
        if self.layers is None:
            return None
        return {"task_rank": self.task_rank,
                "layers": [{"basis": [[round(v, 6) for v in row] for row in la["basis"].tolist()],
                            "mean": round(la["mean"], 6), "std": round(la["std"], 6)} for la in self.layers]}

    def set_state(self, state: dict[str, Any]) -> TaskResidualDetector:
        self.task_rank = int(state.get("task_rank", self.task_rank))
        self.layers = [{"basis": torch.tensor(la["basis"], dtype=torch.float32), "mean": float(la["mean"]),
                        "std": float(la["std"])} for la in state.get("layers", [])] or None
        return self

    def score(self, inp: ScanInput) -> DetectorReport:
        if self.layers is None:
            raise MissingInput("no benign task subspace for this model (calibrate first)")
        deltas = inp.deltas()
        if len(deltas) != len(self.layers) or any(la["basis"].shape[0] != d.shape[0]
                                                  for la, d in zip(self.layers, deltas, strict=False)):
            raise MissingInput("the calibration's task subspace is for projector layers of other shapes")
        evidence: dict[str, Any] = {}
        zs = []
        for li, (la, d) in enumerate(zip(self.layers, deltas, strict=True)):
            share = residual_shares(d.float(), la["basis"], 1)[0]
            z = (share - la["mean"]) / la["std"]
            zs.append(z)
            evidence[inp.projector.layer_name(li)] = {"residual_share": round(share, 6), "benign_mean": la["mean"],
                                                     "benign_std": la["std"], "z": round(z, 3)}
        return DetectorReport(name=self.name, score=max(zs), signals={f"{SIGNAL_PREFIX}residual_share": max(zs)},
                              evidence={"layers": evidence})
