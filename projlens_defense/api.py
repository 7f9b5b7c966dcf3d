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

__all__ = ["analyze", "attack", "calibrate", "evaluate", "load_zoo", "sanitize", "scan"]


def load_zoo(preset: str = "default", seed: int = 0) -> Any:
    """The cached zoo of a preset (``default``, ``instructed``, ``micro``, ``foreign``), built and self-calibrated
    on first use; ``.reference``, ``.train_data`` and ``.test_data`` are its paths."""
    from .zoo.build import config_from_name, get_zoo

    try:
        cfg = config_from_name(preset, seed)
    except KeyError:
        raise UsageError(f"unknown zoo preset {preset!r}") from None
    return get_zoo(cfg)


def attack(variant: str, out: PathLike, *, model: PathLike | None = None, data: PathLike | None = None,
           test_data: PathLike | None = None, zoo_preset: str = "default", poison_rate: float = 0.1, seed: int = 0,
           epochs: float | None = None, lr: float | None = None, lora_rank: int = 0, target: str | None = None,
           eval_variant: str | None = None, force: bool = False, progress: bool = False) -> dict[str, Any]:
    """Poison ``data`` with ``variant`` (``none``: the benign control), fine-tune only the projector of ``model``
    (default: the zoo's reference and data), write an HF checkpoint with ``attack.json`` to ``out``; returns
    that record (config, seed, versions, wall time, metrics on ``test_data``)."""
    from .attacks.finetune import AttackConfig, run_attack
    from .attacks.variants import VARIANTS

    if variant != "none" and variant not in VARIANTS:
        raise UsageError(f"unknown variant {variant!r}; choose from: none, {', '.join(VARIANTS)}")
    if (model is None) != (data is None):
        raise UsageError("give both model and data, or neither (the zoo's)")
    if model is None:
        z = load_zoo(zoo_preset)
        model, data, test_data = z.reference, z.train_data, test_data or z.test_data
    cfg = AttackConfig(variant=None if variant == "none" else variant, poison_rate=poison_rate, seed=seed,
                       lora_rank=lora_rank, target=target, eval_variant=eval_variant)
    if epochs is not None:
        cfg.epochs = epochs
    if lr is not None:
        cfg.lr = lr
    return run_attack(cfg, Path(model), Path(data), None if test_data is None else Path(test_data), Path(out),
                      force=force, progress=progress)


def evaluate(checkpoint: PathLike, variant: str | None = None, *, data: PathLike | None = None,
             zoo_preset: str = "default", seed: int = 0) -> dict[str, Any]:
    """Clean accuracy, ASR and false activation of ``checkpoint`` on ``data`` (default: the zoo's test set), with
    the trigger and target of ``variant`` (default: what its attack.json records); the target texts are the
    data's own (``targets.json`` beside it) when it has them."""
    import json

    from .attacks.targets import Targets
    from .attacks.variants import get_variant
    from .conversations import load_conversations
    from .eval.evaluate import evaluate as run_eval
    from .eval.evaluate import prepare_eval_set
    from .runtime import LlavaRuntime

    checkpoint = Path(checkpoint)
    if variant is None and (checkpoint / "attack.json").is_file():
        rec = json.loads((checkpoint / "attack.json").read_text())
        variant = rec["variant"] if rec["variant"] != "none" else rec["config"].get("eval_variant")
    test_data = Path(data) if data is not None else load_zoo(zoo_preset).test_data
    rt = LlavaRuntime.from_pretrained(checkpoint)
    targets = Targets.beside(test_data)
    es = prepare_eval_set(rt, load_conversations(test_data), get_variant(variant, targets=targets) if variant else None,
                          seed)
    res = run_eval(rt, es).to_dict()
    res.update({"checkpoint": str(checkpoint), "variant": variant, "test_data": str(test_data)})
    return res


def calibrate(reference: PathLike, data: PathLike | None = None, *, benign: Sequence[PathLike] = (), generate: int = 0,
              fpr: float = 0.01, jobs: int = 2, seed: int = 0, progress: bool = False) -> Any:
    """A :class:`~projlens_defense.detectors.calibration.Calibration` of ``reference``'s model: fitted on the
    ``benign`` fine-tunes given, or on ``generate`` benign fine-tunes made here on ``data`` (cached under the
    reference digest, where :func:`scan` and :func:`sanitize` find it)."""
    from .detectors import DETECTORS
    from .detectors.calibration import WEIGHT_SPACE_DETECTORS, Calibration, fit_calibration
    from .detectors.loading import load_checkpoint
    from .detectors.scan import Scanner, find_checkpoints
    from .self_calibration import self_calibrate

    if generate:
        if data is None or benign:
            raise UsageError("generate needs data (clean training JSON) and no benign fine-tunes")
        return self_calibrate(reference, data, generate, seed=seed, jobs=jobs, fpr=fpr, progress=progress)[0]
    helper = Scanner(Calibration(null={}), reference=reference)
    inputs = [helper.build_input(load_checkpoint(c), []) for p in benign for c in find_checkpoints(p)[0]]
    return fit_calibration(inputs, {n: DETECTORS[n] for n in WEIGHT_SPACE_DETECTORS}, fpr=fpr,
                           note=f"{len(inputs)} benign fine-tunes of {reference}")


def analyze(checkpoint: PathLike, out: PathLike, *, reference: PathLike | None = None,
            benign: Sequence[PathLike] = (), variant: str | None = None) -> dict[str, Any]:
    """The ProjLens report (Markdown + PNG figures in ``out``) on ``checkpoint``; reference and data default to what
    its attack.json records; returns the report's data."""
    from .eval.analyze import AnalyzeOptions, analyze_checkpoint

    checkpoint = Path(checkpoint)
    recorded = attack_provenance(checkpoint)
    ref = Path(reference) if reference is not None else recorded.get("reference")
    if ref is None:
        raise UsageError(f"{checkpoint}: no reference given and no attack.json naming one")
    return analyze_checkpoint(checkpoint, ref, Path(out), benign=[Path(b) for b in benign], variant=variant,
                              test_data=recorded.get("test_data"), probe_data=recorded.get("probe_data"),
                              options=AnalyzeOptions())


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
             calibration: PathLike | None = None, force: bool = False, link: bool = False,
             device: str | None = "cpu", dtype: str | None = "float32") -> dict[str, Any]:
    """Repair ``checkpoint``'s projector with ``method`` and write it to ``out`` in the input's format.

    Atomic; never touches the input; refuses an existing ``out`` unless ``force``. Raises
    :class:`~projlens_defense.errors.NothingRemovedError` (and writes nothing) when the method removes
    nothing. With ``clean_data`` the method may use ``n_clean`` samples, and ``n_eval`` others measure
    the clean accuracy before and after. Returns the record the CLI prints (method report, removed rank
    and energy, weight change, warnings).

    ``link``: hard-link the unchanged files of a checkpoint directory into ``out`` instead of copying them
    (the output then shares them with the input; a copy, with a warning, where a link is impossible).
    ``device`` / ``dtype``: where and in what precision the model runs the clean samples (``auto``: a GPU and
    bfloat16 when available, else the CPU and float32)."""
    from .checkpoint import StagedWrite, detect_format
    from .mitigations import MITIGATIONS

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
    # the output's copy of the checkpoint starts now and runs while the method computes (on a multi-GB
    # checkpoint the copy is most of the time); it is removed again if anything below fails
    with StagedWrite(checkpoint, out, force=force, link=link, info=info) as staged:
        return _sanitize_staged(staged, info, cls, method, checkpoint, out, reference, clean_data, n_clean, n_eval,
                                clean_seed, model, params, calibration, device, dtype, warnings)


def _sanitize_staged(staged: Any, info: Any, cls: Any, method: str, checkpoint: Path, out: Path,
                     reference: PathLike | None, clean_data: PathLike | None, n_clean: int, n_eval: int,
                     clean_seed: int, model: PathLike | None, params: dict[str, Any] | None,
                     calibration: PathLike | None, device: str | None, dtype: str | None,
                     warnings: list[str]) -> dict[str, Any]:
    """The body of :func:`sanitize` once the output's copy is under way."""
    from .checkpoint import load_projector
    from .mitigations import LENS_METHODS

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
        # its LLM and vision tower; the projector is passed explicitly
        rt = LlavaRuntime.from_pretrained(runner, device=device, dtype=dtype)
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
    staged.finish(result.projector, warnings)

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
