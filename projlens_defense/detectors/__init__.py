"""Backdoor detectors behind one small interface, and their name registry (the names the CLI uses).

Adding a detector = one new module with a :class:`~projlens_defense.detectors.base.Detector`
subclass + one line in :data:`DETECTORS`.
"""

from projlens_defense.detectors.base import Detector, DetectorReport, MissingInput, OvLayer, ScanInput
from projlens_defense.detectors.logit_lens import LogitLensDetector
from projlens_defense.detectors.reference_free import ReferenceFreeDetector
from projlens_defense.detectors.spectral import SpectralDetector

DETECTORS: dict[str, type[Detector]] = {
    "spectral": SpectralDetector,
    "logit-lens": LogitLensDetector,
    "reference-free": ReferenceFreeDetector,
}

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
]
