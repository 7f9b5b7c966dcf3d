"""projlens-defense: find and remove backdoors in the vision-language projector of LLaVA-style models.

The Python API (the same workflows the CLI runs; see README "Python API")::

    import projlens_defense as pld
    [result] = pld.scan(["suspect/"], reference="base/")
    record = pld.sanitize("suspect/", "repaired/")     # a SanitizeResult; record.to_dict() is the CLI's JSON

Besides the workflows, the few library pieces scripts around them need (the benchmarks use nothing else), loaded
on first use so that ``import projlens_defense`` stays light:

* attack records: ``read_attack_record(ckpt)`` (an :class:`AttackRecord` or None), ``has_attack_record(ckpt)``;
* attacks: ``VARIANTS`` (name -> variant class), ``PROJLENS_VARIANTS`` / ``CLASSIC_VARIANTS`` (name lists),
  ``get_variant(name)``, ``AttackConfig`` (the attack recipe and its defaults, e.g. ``AttackConfig().lr``);
* ``MITIGATIONS``: the registry of repair methods (name -> class; ``requires_clean``, ``uses_clean``,
  ``run_time_only`` say what each needs);
* metrics: ``auroc(pos, neg)``, ``tpr_at_fpr(pos, neg, fpr)``, ``EFFECTIVE_ASR`` (the ASR from which a backdoored
  fine-tune counts as an effective backdoor in the population tables);
* calibrations: ``load_calibration(path)``, ``calibration_path(reference)`` (where the self-generated one is),
  ``DEFAULT_FPR`` (the false-positive rate a scan decides at unless told another; ``Calibration.at_fpr``);
* checkpoints and data: ``load_projector(ckpt)``, ``write_projector(ckpt, projector, out)``,
  ``LlavaRuntime`` (a model's tower, projector and LLM, ``LlavaRuntime.from_pretrained(dir)``),
  ``load_conversations(json)``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .api import analyze, attack, calibrate, evaluate, load_zoo, sanitize, scan
from .detectors.calibration import DEFAULT_FPR, Calibration
from .detectors.scan import ScanResult
from .errors import CheckpointError, NothingRemovedError, ProjlensError, UsageError
from .results import AnalysisResult, AttackResult, EvaluationResult, GuardResult, SanitizeResult

if TYPE_CHECKING:
    from .attacks.finetune import AttackConfig
    from .attacks.variants import CLASSIC_VARIANTS, PROJLENS_VARIANTS, VARIANTS, get_variant
    from .checkpoint import load_projector, write_projector
    from .conversations import load_conversations
    from .detectors.calibration import load_calibration
    from .eval.population import EFFECTIVE_ASR
    from .metrics import auroc, tpr_at_fpr
    from .mitigations import MITIGATIONS
    from .runinfo import AttackRecord, has_attack_record, read_attack_record
    from .runtime import LlavaRuntime
    from .self_calibration import calibration_path

# public name -> the module that defines it (imported on first access: several pull in torch / transformers)
_LAZY = {
    "AttackConfig": ".attacks.finetune", "AttackRecord": ".runinfo", "CLASSIC_VARIANTS": ".attacks.variants",
    "EFFECTIVE_ASR": ".eval.population", "LlavaRuntime": ".runtime", "MITIGATIONS": ".mitigations",
    "PROJLENS_VARIANTS": ".attacks.variants",
    "VARIANTS": ".attacks.variants", "auroc": ".metrics", "calibration_path": ".self_calibration",
    "get_variant": ".attacks.variants", "has_attack_record": ".runinfo", "load_calibration": ".detectors.calibration",
    "load_conversations": ".conversations", "load_projector": ".checkpoint", "read_attack_record": ".runinfo",
    "tpr_at_fpr": ".metrics", "write_projector": ".checkpoint",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["CLASSIC_VARIANTS", "DEFAULT_FPR", "MITIGATIONS", "PROJLENS_VARIANTS", "VARIANTS", "AnalysisResult", "AttackConfig",
           "AttackRecord", "AttackResult", "Calibration", "CheckpointError", "EFFECTIVE_ASR", "EvaluationResult",
           "GuardResult",
           "LlavaRuntime", "NothingRemovedError", "ProjlensError", "SanitizeResult", "ScanResult", "UsageError",
           "analyze", "attack", "auroc", "calibrate", "calibration_path", "evaluate", "get_variant",
           "has_attack_record", "load_calibration", "load_conversations", "load_projector", "load_zoo",
           "read_attack_record", "sanitize", "scan", "tpr_at_fpr", "write_projector"]
