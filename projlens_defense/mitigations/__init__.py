"""Mitigations behind one small interface, and their name registry (the names the CLI and the harness use).

Adding a mitigation = one module with a :class:`~projlens_defense.mitigations.base.Mitigation`
subclass + one line in :data:`MITIGATIONS`.
"""

from projlens_defense.mitigations.base import (
    CleanData,
    Mitigation,
    MitigationInputError,
    MitigationResult,
    ProjectorModule,
    weight_change,
)
from projlens_defense.mitigations.clp import ClpMitigation
from projlens_defense.mitigations.fine_prune import FinePruneMitigation
from projlens_defense.mitigations.finetune import FinetuneMitigation
from projlens_defense.mitigations.norm_guard import NormGuard, NormGuardMitigation
from projlens_defense.mitigations.orthogonal import OrthogonalMitigation
from projlens_defense.mitigations.restore import RestoreMitigation
from projlens_defense.mitigations.subspace import SubspaceMitigation
from projlens_defense.mitigations.target_direction import TargetDirectionMitigation
from projlens_defense.mitigations.unlearn import UnlearnMitigation

MITIGATIONS: dict[str, type[Mitigation]] = {
    "subspace": SubspaceMitigation,
    "target-direction": TargetDirectionMitigation,
    "norm-guard": NormGuardMitigation,
    "unlearn": UnlearnMitigation,
    "restore": RestoreMitigation,
    "finetune": FinetuneMitigation,
    "fine-prune": FinePruneMitigation,
    "clp": ClpMitigation,
    "orthogonal": OrthogonalMitigation,
}

LENS_METHODS = ("subspace", "target-direction")
"""Methods whose constructor takes a ``lens`` (a detectors ScanInput with the LLM read-out) for data-free use."""

__all__ = [
    "LENS_METHODS",
    "MITIGATIONS",
    "CleanData",
    "Mitigation",
    "MitigationInputError",
    "MitigationResult",
    "NormGuard",
    "ProjectorModule",
    "weight_change",
]
