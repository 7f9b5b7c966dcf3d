"""Backdoor detectors behind one small interface, and their name registry (the names the CLI uses).

Adding a detector = one new module with a :class:`~projlens_defense.detectors.base.Detector`
subclass + its class in :data:`DETECTORS`.
"""

from projlens_defense.detectors.activation import ActivationDetector
from projlens_defense.detectors.base import Detector, DetectorReport
from projlens_defense.detectors.baselines import (
    ActivationClusteringDetector,
    SpectralSignatureDetector,
    StripDetector,
)
from projlens_defense.detectors.input_level import ShiftInputDetector
from projlens_defense.detectors.logit_lens import LogitLensDetector
from projlens_defense.detectors.reference_free import ReferenceFreeDetector
from projlens_defense.detectors.spectral import SpectralDetector
from projlens_defense.detectors.task_residual import TaskResidualDetector
from projlens_defense.scan_input import MissingInput, OvLayer, ScanInput

DETECTORS: dict[str, type[Detector]] = {cls.name: cls for cls in (
    SpectralDetector, LogitLensDetector, TaskResidualDetector, ReferenceFreeDetector, ActivationDetector, ShiftInputDetector,
    StripDetector, SpectralSignatureDetector, ActivationClusteringDetector,
)}
"""The detectors by their ``name`` (the names the CLI, the API and the harness use)."""

__all__ = [
    "DETECTORS",
    "Detector",
    "DetectorReport",
    "LogitLensDetector",
    "MissingInput",
    "OvLayer",
    "ReferenceFreeDetector",
    "ScanInput",
    "SpectralDetector",
    "TaskResidualDetector",
]
