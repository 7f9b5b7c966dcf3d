"""The Python API: the workflows the CLI runs, as plain functions that return results (the CLI only renders them).

    import projlens_defense as pld
    results = pld.scan(["suspect/"], reference="base/")           # list[ScanResult]
    rec = pld.sanitize("suspect/", "repaired/")                   # what was removed, clean accuracy before/after

Errors are :class:`~projlens_defense.errors.ProjlensError` subclasses (one-line messages); nothing here
prints or exits.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import NothingRemovedError, UsageError
from .runinfo import attack_provenance

PathLike = str | os.PathLike[str]

__all__ = ["sanitize", "scan"]


def scan(paths: Sequence[PathLike], reference: PathLike | None = None, calibration: PathLike | None = None,
         lens_layers: int = 2) -> list[Any]:
    """Scan checkpoints (or folders of them); one :class:`~projlens_defense.detectors.scan.ScanResult` each.

    ``calibration``: a calibration file; default: the cached self-generated calibration of each
    checkpoint's model (``verdict`` is ``inconclusive`` when there is none, or without ``reference``
    when nothing is flagged)."""
    from .detectors.calibration import load_calibration
    from .detectors.scan import Scanner

    cal = load_calibration(calibration) if calibration is not None else None
    results, _ = Scanner(cal, reference=reference, ov_layers=lens_layers).scan_paths(list(paths))
    return results


def sanitize(checkpoint: PathLike, out: PathLike, *, method: str = "subspace", reference: PathLike | None = None,
             clean_data: PathLike | None = None, n_clean: int = 64, n_eval: int = 256, clean_seed: int = 0,
             model: PathLike | None = None, params: dict[str, Any] | None = None,
             calibration: PathLike | None = None, force: bool = False) -> dict[str, Any]:
    """Repair ``checkpoint``'s projector with ``method`` and write it to ``out`` in the input's format.

    Atomic; never touches the input; refuses an existing ``out`` unless ``force``. Raises
    :class:`~projlens_defense.errors.NothingRemovedError` (and writes nothing) when the method removes
    nothing. With ``clean_data`` the method may use ``n_clean`` samples, and ``n_eval`` others measure
    the clean accuracy before and after. Returns the record the CLI prints (method report, removed rank
    and energy, weight change, warnings)."""
    from .checkpoint import detect_format, load_projector, write_projector
    from .mitigations import LENS_METHODS, MITIGATIONS

    checkpoint, out = Path(checkpoint), Path(out)
    if method not in MITIGATIONS:
        raise UsageError(f"unknown method {method!r}; choose from: {', '.join(MITIGATIONS)}")
    cls = MITIGATIONS[method]
    if cls.run_time_only:
        raise UsageError(f"method {method!r} is a run-time guard, not a weight edit, so it cannot be written to a "
                         f"checkpoint; use projlens_defense.mitigations.{cls.__name__} from Python")
    if os.path.lexists(out) and not force:
        raise UsageError(f"{out}: already exists; pass --force to replace it")
    if n_clean < 1 or n_eval < 0:
        raise UsageError("n_clean must be >= 1 and n_eval >= 0")
    if cls.requires_clean and clean_data is None:
        raise UsageError(f"method {method!r} needs clean samples (`clean_data`, --clean-data on the command line: "
                         "LLaVA conversation JSON)")
    warnings: list[str] = []
    info = detect_format(checkpoint)
    suspect = load_projector(info)
    ref_path = reference or attack_provenance(checkpoint).get("reference")
    if cls.requires_reference and ref_path is None:
        raise UsageError(f"method {method!r} needs the reference projector the checkpoint was fine-tuned from "
                         "(`reference`, --reference on the command line; no attack.json with a base_model here)")
    ref = load_projector(ref_path) if ref_path is not None else None
    if ref is not None:
        suspect.delta(ref)  # refuses a reference of another shape, before any work

    clean = rt = None
    heldout: list = []
    if clean_data is not None:
        from .conversations import load_conversations
        from .mitigations import CleanData
        from .runtime import LlavaRuntime

        runner = model or (info.root if info.root is not None else None)
        if runner is None or not (Path(runner) / "config.json").is_file():
            raise UsageError("clean data needs an HF LLaVA model to run the samples: pass the model directory "
                             "(the checkpoint itself is not an HF LLaVA directory)")
        samples = load_conversations(clean_data)
        order = list(range(len(samples)))
        random.Random(clean_seed).shuffle(order)
        used = [samples[i] for i in order[:n_clean]]
        heldout = [samples[i] for i in order[n_clean : n_clean + n_eval]]
        rt = LlavaRuntime.from_pretrained(runner)  # its LLM and vision tower; the projector is passed explicitly
        clean = CleanData.from_samples(rt, used, None, clean_seed) if cls.uses_clean else None
        if len(samples) < n_clean:
            warnings.append(f"the clean data has only {len(samples)} samples")
    kw: dict[str, Any] = dict(params or {})
    if method in LENS_METHODS:
        from .mitigations.lens import lens_context

        kw["lens"], kw["calibration"] = lens_context(checkpoint, ref, warnings, calibration)
    result = cls(**kw).apply(suspect, ref, clean)
    assert result.projector is not None
    if _unchanged(suspect, result.projector):
        why = result.report.get("selection") or "the method selected nothing"
        raise NothingRemovedError(f"{method}: nothing removed ({why}); no output written"
                                  + "".join(f" [{w}]" for w in warnings))
    write_projector(checkpoint, result.projector, out, force=force)

    rec: dict[str, Any] = {"checkpoint": str(checkpoint), "out": str(out), "format": info.format, "method": method,
                           "mode": "few-shot" if clean is not None else "data-free",
                           "reference": None if ref_path is None else str(ref_path), **result.to_dict(),
                           "warnings": warnings}
    if rt is not None and heldout:
        from .eval.evaluate import evaluate, prepare_eval_set
        from .mitigations import ProjectorModule

        es = prepare_eval_set(rt, heldout, None)
        before = evaluate(rt, es, projector=ProjectorModule(suspect).eval()).clean_accuracy
        after = evaluate(rt, es, projector=result.as_module()).clean_accuracy
        rec["clean_accuracy"] = {"n": len(heldout), "before": before, "after": after, "change": after - before}
    elif clean_data is not None:
        warnings.append("no held-out clean samples left for the clean-accuracy check (raise the data size)")
    return rec


def _unchanged(before: Any, after: Any) -> bool:
    """True when ``after`` has exactly ``before``'s weights and biases (a repair that removed nothing)."""
    import torch

    for a, b in zip(before.layers, after.layers, strict=True):
        if not torch.equal(a.weight, b.weight):
            return False
        if (a.bias is None) != (b.bias is None) or (a.bias is not None and not torch.equal(a.bias, b.bias)):
            return False
    return True
