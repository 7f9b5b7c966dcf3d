"""projlens-defense: find and remove backdoors in the vision-language projector of LLaVA-style models.

The Python API (the same workflows the CLI runs; see README "Python API")::

    import projlens_defense as pld
    [result] = pld.scan(["suspect/"], reference="base/")
    record = pld.sanitize("suspect/", "repaired/")     # a SanitizeResult; record.to_dict() is the CLI's JSON
"""

from .api import analyze, attack, calibrate, evaluate, load_zoo, sanitize, scan
from .detectors.calibration import Calibration
from .detectors.scan import ScanResult
from .errors import CheckpointError, NothingRemovedError, ProjlensError, UsageError
from .results import AnalysisResult, AttackResult, EvaluationResult, GuardResult, SanitizeResult

__all__ = ["AnalysisResult", "AttackResult", "Calibration", "CheckpointError", "EvaluationResult", "GuardResult",
           "NothingRemovedError", "ProjlensError", "SanitizeResult", "ScanResult", "UsageError", "analyze", "attack",
           "calibrate", "evaluate", "load_zoo", "sanitize", "scan"]
