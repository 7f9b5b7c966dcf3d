"""The mitigation interface: what a mitigation gets (suspect, reference, a few clean samples) and returns.

In the spirit of peft's tuner registry: a mitigation is configured in ``__init__`` (plain keyword
parameters, the same names the CLI and the harness pass), and :meth:`Mitigation.apply` returns a
:class:`MitigationResult`: a new :class:`~projlens_defense.projector.Projector` (weights the writer
can put back into the checkpoint) or, for run-time guards, a wrapper ``nn.Module``, plus a report of
what was removed (directions, energy, rank) and the parameters used.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from projlens_defense.errors import UsageError
from projlens_defense.linalg import singular_values
from projlens_defense.params import Configurable
from projlens_defense.projector import Projector, ProjectorModule

__all__ = [
    "CleanData",
    "Mitigation",
    "MitigationInputError",
    "MitigationResult",
    "weight_change",
]


class MitigationInputError(UsageError):
    """The mitigation needs an input it was not given (a reference, clean samples, the LLM)."""


@dataclass(eq=False)
class CleanData:
    """A few clean samples (no trigger knowledge): their vision features and the LLM to run them through.

    ``runtime`` is a :class:`~projlens_defense.runtime.LlavaRuntime` of the suspect model (its vision
    tower and LLM are untouched by a projector-only fine-tune); ``features`` [N, tokens, in_dim] are
    computed once. Mitigations that only need activations use ``features``; those that need answers
    (fine-tuning, trigger synthesis) use the runtime.
    """

    runtime: Any
    features: torch.Tensor
    questions: list[str]
    answers: list[str]
    ids: list[str] = field(default_factory=list)
    cache: dict[Any, Any] = field(default_factory=dict, repr=False)  # shared probes, keyed by the caller

    def __len__(self) -> int:
        return len(self.questions)

    @classmethod
    def from_samples(cls, runtime: Any, samples: Sequence[Any], n: int | None = 64, seed: int = 0) -> CleanData:
        """Draw ``n`` samples (seeded, without replacement; all if ``n`` is None) and compute their features."""
        chosen = list(samples)
        if n is not None and n < len(chosen):
            chosen = random.Random(seed).sample(chosen, n)
        if not chosen:
            raise MitigationInputError("no clean samples given")
        feats = runtime.vision_features([s.image for s in chosen])
        return cls(runtime, feats, [s.question for s in chosen], [s.answer for s in chosen], [s.id for s in chosen])


@dataclass(eq=False)
class MitigationResult:
    """What a mitigation produced.

    ``projector``: the repaired weights (None for a pure run-time guard); ``module``: a run-time
    wrapper to use instead of the projector (None for weight edits); ``report``: what was removed
    (per method: directions, energy, rank, discovered target...); ``params``: the parameters used.
    """

    method: str
    projector: Projector | None
    report: dict[str, Any]
    params: dict[str, Any]
    module: nn.Module | None = None

    @property
    def writable(self) -> bool:
        """Whether the result is plain weights the checkpoint writer can store."""
        return self.projector is not None and self.module is None

    def as_module(self) -> nn.Module:
        """The module to run in place of the projector."""
        if self.module is not None:
            return self.module
        assert self.projector is not None
        return ProjectorModule(self.projector).eval()

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "writable": self.writable, "params": self.params, "report": self.report}


def change_rank(dw: torch.Tensor, tol: float = 1e-4, sketch: int = 64, seed: int = 0) -> int:
    """Numerical rank of a weight change (singular values above ``tol`` x the largest).

    A mitigation's change is usually of low rank: the rank of ``dw @ G`` for a random Gaussian ``G`` with
    ``sketch`` columns equals the rank of ``dw`` (with probability 1) when it is below ``sketch``, and costs
    one thin matrix product instead of a full SVD of a 4096 x 4096 change. Full-rank changes fall back to
    the exact singular values."""
    dw = dw.float()
    if not bool(dw.abs().max() > 0):
        return 0
    n = min(dw.shape)
    if n > 2 * sketch:
        g = torch.randn(dw.shape[1], sketch, generator=torch.Generator().manual_seed(seed))
        s = singular_values(dw @ g)
        r = int((s > tol * s.max()).sum())
        if r < sketch:
            return r
    s = singular_values(dw)
    return int((s > tol * s.max()).sum())


def weight_change(suspect: Projector, new: Projector, reference: Projector | None = None) -> list[dict[str, Any]]:
    """Per layer: how much the mitigation changed the weights, and which share of the fine-tune's update it removed."""
    out = []
    ref_layers = reference.layers if reference is not None else [None] * suspect.num_layers
    for i, (a, b, r) in enumerate(zip(suspect.layers, new.layers, ref_layers, strict=True)):
        dw = b.weight.float() - a.weight.float()
        row: dict[str, Any] = {
            "layer": suspect.layer_name(i),
            "relative_change": round(float(dw.norm() / a.weight.float().norm().clamp_min(1e-12)), 6),
            "change_rank": change_rank(dw),
        }
        if a.bias is not None and b.bias is not None:
            row["bias_change"] = round(float((b.bias - a.bias).norm()), 6)
        if r is not None:
            upd = a.weight.float() - r.weight.float()
            e = float(upd.pow(2).sum())
            row["update_energy_removed"] = round(float(dw.pow(2).sum()) / e, 6) if e > 0 else 0.0
        out.append(row)
    return out


class Mitigation(Configurable, ABC):
    """Abstract base. Subclasses are ``@dataclass(eq=False)`` classes: they set ``name`` and the inputs they need
    as class attributes, declare every parameter as a typed field with its default (so it is an explicit keyword
    of ``__init__``, which ``get_params`` / ``defaults`` find by introspection and ``from_params`` checks a
    ``KEY=VALUE`` dict against; see :class:`~projlens_defense.params.Configurable`) and implement :meth:`apply`.

    ``requires_reference`` / ``requires_clean``: inputs without which the method cannot run;
    ``uses_clean``: the method has a few-shot mode that uses clean samples when given;
    ``run_time_only``: the result is a wrapper module, not weights a checkpoint can hold;
    ``uses_lens``: the constructor takes the keyword inputs ``lens`` (a
    :class:`~projlens_defense.scan_input.ScanInput` with the LLM read-out) and ``calibration`` for data-free use.
    """

    name: ClassVar[str] = "mitigation"
    requires_reference: ClassVar[bool] = False
    requires_clean: ClassVar[bool] = False
    uses_clean: ClassVar[bool] = False
    run_time_only: ClassVar[bool] = False
    uses_lens: ClassVar[bool] = False
    summary: ClassVar[str] = ""

    def check(self, reference: Projector | None, clean: CleanData | None) -> None:
        """Raise :class:`MitigationInputError` when a required input is missing."""
        if self.requires_reference and reference is None:
            raise MitigationInputError(f"method {self.name!r} needs the reference projector (`reference`)")
        if self.requires_clean and clean is None:
            raise MitigationInputError(f"method {self.name!r} needs clean samples (`clean_data`)")

    @abstractmethod
    def apply(self, suspect: Projector, reference: Projector | None = None,
              clean: CleanData | None = None) -> MitigationResult:
        """Repair ``suspect`` (with the reference projector and clean samples where the method uses them)."""

    def result(self, suspect: Projector, new: Projector | None, reference: Projector | None,
               report: dict[str, Any], module: nn.Module | None = None) -> MitigationResult:
        """Assemble a result, adding the generic weight-change summary to ``report``."""
        if new is not None:
            report = {**report, "weight_change": weight_change(suspect, new, reference)}
        return MitigationResult(self.name, new, report, self.get_params(), module)

