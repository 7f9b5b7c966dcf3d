"""Mitigations behind one small interface, and their name registry (the names the CLI and the harness use).

Adding a mitigation = one module with a :class:`~projlens_defense.mitigations.base.Mitigation`
dataclass subclass (its ``name``, what it needs as class attributes, its parameters as typed fields) + its class in
:data:`MITIGATIONS`.
"""

from projlens_defense.mitigations.base import (
    CleanData,
    Mitigation,
    MitigationInputError,
    MitigationResult,
    weight_change,
)
from projlens_defense.mitigations.channel_restore import ChannelRestoreMitigation
from projlens_defense.mitigations.clp import ClpMitigation
from projlens_defense.mitigations.fine_prune import FinePruneMitigation
from projlens_defense.mitigations.finetune import FinetuneMitigation
from projlens_defense.mitigations.norm_guard import NormGuard, NormGuardMitigation
from projlens_defense.mitigations.orthogonal import OrthogonalMitigation
from projlens_defense.mitigations.restore import RestoreMitigation
from projlens_defense.mitigations.subspace import SubspaceMitigation
from projlens_defense.mitigations.target_direction import TargetDirectionMitigation
from projlens_defense.mitigations.unlearn import UnlearnMitigation

MITIGATIONS: dict[str, type[Mitigation]] = {cls.name: cls for cls in (
    SubspaceMitigation, TargetDirectionMitigation, NormGuardMitigation, UnlearnMitigation, RestoreMitigation,
    FinetuneMitigation, FinePruneMitigation, ClpMitigation, OrthogonalMitigation, ChannelRestoreMitigation,
)}
"""The mitigations by their ``name`` (the names the CLI, the API and the harness use)."""

__all__ = [
    "MITIGATIONS",
    "CleanData",
    "Mitigation",
    "MitigationInputError",
    "MitigationResult",
    "NormGuard",
    "weight_change",
]
