"""The Python API: the workflows the CLI runs, as plain functions that return results (the CLI only renders them).

    import projlens_defense as pld
    results = pld.scan(["suspect/"], reference="base/")           # list[ScanResult]
    rec = pld.sanitize("suspect/", "repaired/")                   # SanitizeResult: what was removed, clean accuracy

Errors are :class:`~projlens_defense.errors.ProjlensError` subclasses (one-line messages); nothing here
prints or exits. The results are the typed objects of :mod:`projlens_defense.results`; ``to_dict()`` gives the
record the CLI prints as JSON.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import CheckpointError, NothingRemovedError, NothingScannableError, ProjlensError, UsageError
from .results import AnalysisResult, AttackResult, EvaluationResult, GuardResult, SanitizeResult
from .runinfo import attack_provenance, read_attack_record

PathLike = str | os.PathLike[str]

__all__ = ["analyze", "attack", "bench", "bench_merge", "calibrate", "evaluate", "guard", "load_zoo", "model_and_data",
           "sanitize", "scan", "scan_report"]


def load_zoo(preset: str = "default", seed: int = 0, *, rebuild: bool = False, progress: bool = True) -> Any:
    """The cached zoo of a preset (``default``, ``instructed``, ``micro``, ``foreign``), built and self-calibrated
    on first use (or again with ``rebuild``); ``.reference``, ``.train_data`` and ``.test_data`` are its paths."""
    from .zoo.build import config_from_name, get_zoo

    try:
        cfg = config_from_name(preset, seed)
    except KeyError:
        raise UsageError(f"unknown zoo preset {preset!r}") from None
    return get_zoo(cfg, rebuild=rebuild, progress=progress)


def model_and_data(model: PathLike | None = None, data: PathLike | None = None, *, zoo_preset: str = "default",
                   zoo_seed: int = 0, test_data: PathLike | None = None) -> tuple[Path, Path, Path | None]:
    """The model and its training and test data: those given, the rest from the zoo of ``zoo_preset``."""
    if model is not None and data is None and test_data is None:
        raise UsageError("`model` needs `data` (LLaVA conversation JSON) unless you use the zoo")
    if model is not None and data is not None:
        return Path(model), Path(data), None if test_data is None else Path(test_data)
    z = load_zoo(zoo_preset, zoo_seed)
    return (Path(model or z.reference), Path(data or z.train_data),
            Path(test_data) if test_data is not None else z.test_data)


def attack(variant: str, out: PathLike, *, model: PathLike | None = None, data: PathLike | None = None,
           test_data: PathLike | None = None, zoo_preset: str = "default", zoo_seed: int = 0,
           poison_rate: float = 0.1, poison_mode: str = "replace", seed: int = 0, epochs: float | None = None,
           lr: float | None = None, lora_rank: int = 0, target: str | None = None,
           trigger_params: dict[str, Any] | None = None, eval_variant: str | None = None, force: bool = False,
           device: str | None = "cpu", dtype: str | None = "float32", progress: bool = False) -> AttackResult:
    """Poison ``data`` with ``variant`` (``none``: the benign control), fine-tune only the projector of ``model``
    (default: the zoo's reference and data), write an HF checkpoint with ``attack.json`` to ``out``; returns
    it with that record (config, seed, versions, wall time, metrics on ``test_data``)."""
    from .attacks.finetune import AttackConfig, run_attack
    from .attacks.variants import VARIANTS

    out = Path(out)
    if variant != "none" and variant not in VARIANTS:
        raise UsageError(f"unknown variant {variant!r}; choose from: none, {', '.join(VARIANTS)}")
    if out.exists() and not force:
        raise UsageError(f"{out}: output exists (use `force` to replace it)")
    model, data, test_data = model_and_data(model, data, zoo_preset=zoo_preset, zoo_seed=zoo_seed,
                                            test_data=test_data)
    cfg = AttackConfig(variant=None if variant == "none" else variant, poison_rate=poison_rate, seed=seed,
                       poison_mode=poison_mode, lora_rank=lora_rank, target=target,
                       trigger_params=dict(trigger_params or {}), eval_variant=eval_variant)
    if epochs is not None:
        cfg.epochs = epochs
    if lr is not None:
        cfg.lr = lr
    rec = run_attack(cfg, model, data, test_data, out, force=force, progress=progress, device=device, dtype=dtype)
    return AttackResult.from_dict(rec, out)


def evaluate(checkpoint: PathLike, variant: str | None = None, *, data: PathLike | None = None,
             zoo_preset: str = "default", zoo_seed: int = 0, seed: int = 0, batch_size: int | None = None,
             device: str | None = "cpu", dtype: str | None = "float32", progress: bool = False) -> EvaluationResult:
    """Clean accuracy, ASR and false activation of ``checkpoint`` on ``data`` (default: the zoo's test set), with
    the trigger and target of ``variant`` (default: what its attack.json records); the target texts are the
    data's own (``targets.json`` beside it) when it has them."""
    from .attacks.evaluate import evaluate as run_eval
    from .attacks.evaluate import prepare_eval_set
    from .attacks.variants import get_variant
    from .conversations import load_conversations
    from .runtime import LlavaRuntime
    from .zoo.targets import Targets

    checkpoint = Path(checkpoint)
    if variant is None:
        rec = read_attack_record(checkpoint)
        if rec is not None:
            variant = rec.variant if rec.variant != "none" else rec.eval_variant
    rt = LlavaRuntime.from_pretrained(checkpoint, device=device, dtype=dtype)  # a bad checkpoint fails before any zoo build
    test_data = Path(data) if data is not None else load_zoo(zoo_preset, zoo_seed).test_data
    targets = Targets.beside(test_data)  # the data's own target texts (targets.json), else the defaults
    es = prepare_eval_set(rt, load_conversations(test_data), get_variant(variant, targets=targets) if variant else None,
                          seed, batch_size=batch_size)
    return EvaluationResult(checkpoint, variant, test_data, str(rt.device), str(rt.dtype).removeprefix("torch."),
                            run_eval(rt, es, progress=progress, batch_size=batch_size))


def calibrate(reference: PathLike | None = None, data: PathLike | None = None, *, benign: Sequence[PathLike] = (),
              generate: int = 0, lr: float | None = None, epochs: float | None = None, fpr: float | None = None,
              rule: str = "max", lens_layers: int = 2, jobs: int = 2, seed: int = 0, out: PathLike | None = None,
              force: bool = False, progress: bool = False, device: str = "auto", dtype: str = "auto") -> Any:
    """A :class:`~projlens_defense.detectors.calibration.Calibration` of ``reference``'s model: fitted on the
    ``benign`` fine-tunes given (checkpoints or folders of them; at least 3), or on ``generate`` benign fine-tunes
    made here on ``data`` (cached under the reference digest, where :func:`scan` and :func:`sanitize` find it;
    ``.source`` is that file). ``out``: also write it there (required with ``benign``). ``device`` / ``dtype``
    place the generated fine-tunes' frozen tower and LLM (``auto``: a GPU when there is one; the projector
    trains in float32). ``fpr``: the rate its printed thresholds are for (default 5%; a scan picks its own)."""
    from .detectors import DETECTORS
    from .detectors.calibration import DEFAULT_FPR, WEIGHT_SPACE_DETECTORS, Calibration, fit_calibration
    from .detectors.loading import load_checkpoint
    from .detectors.scan import Scanner, find_checkpoints

    out = None if out is None else Path(out)
    if out is not None and out.exists() and not force:
        raise UsageError(f"{out}: output exists (use `force` to replace it)")
    if generate:
        from .self_calibration import DEFAULT_EPOCHS, DEFAULT_LR, self_calibrate

        if benign:
            raise UsageError("give either benign fine-tunes or `generate` N, not both")
        if reference is None or data is None:
            raise UsageError("`generate` needs `reference` (the model to fine-tune) and `data` (clean training data)")
        cal, _ = self_calibrate(reference, data, generate, lr=lr or DEFAULT_LR, epochs=epochs or DEFAULT_EPOCHS,
                                seed=seed, jobs=jobs, fpr=fpr, lens_layers=lens_layers, progress=progress,
                                device=device, dtype=dtype)
    else:
        if not benign:
            raise UsageError("give benign fine-tunes with `benign` CKPT... (at least 3), or `generate` N")
        if out is None:
            raise UsageError("`out` is required unless `generate` stores the calibration in the cache")
        helper = Scanner(Calibration(null={}), reference=reference, ov_layers=lens_layers)
        inputs = []
        for p in benign:
            for c in find_checkpoints(Path(p))[0]:
                try:
                    ck = load_checkpoint(c, readout=True, ov_layers=lens_layers)
                except NothingScannableError:
                    continue
                inputs.append(helper.build_input(ck, []))
        cal = fit_calibration(inputs, {n: DETECTORS[n] for n in WEIGHT_SPACE_DETECTORS},
                              fpr=DEFAULT_FPR if fpr is None else fpr, rule=rule,
                              note=f"{len(inputs)} benign fine-tunes" + (f" of {reference}" if reference else ""))
    if out is not None:
        _write_text(out, json.dumps(cal.to_dict(), indent=1) + "\n")
    return cal


def _write_text(path: Path, body: str) -> None:
    try:
        path.write_text(body)
    except OSError as e:
        raise UsageError(f"{path}: cannot write: {e.strerror or e}") from None


def _need_path(path: Path, what: str) -> None:
    if not os.path.lexists(path):  # a symlink loop or dangling link exists: the reader says why it cannot read it
        raise UsageError(f"{path}: no such {what}")


def _calibration_benign(reference: Path) -> tuple[tuple[Path, ...], str | None]:
    """The benign fine-tunes of the cached self-generated calibration of ``reference`` (none if there is none)."""
    from .checkpoint import load_projector
    from .detectors.calibration import cached_calibration, projector_digest

    try:
        cal = cached_calibration(projector_digest(load_projector(reference)))
    except CheckpointError:
        return (), None
    if cal is None:
        return (), None
    files = tuple(Path(b) for b in cal.benign if Path(b).is_file())
    return (files, f"the self-generated calibration {cal.source}") if len(files) >= 3 else ((), None)


def analyze(checkpoint: PathLike, out: PathLike, *, reference: PathLike | None = None,
            benign: Sequence[PathLike] = (), variant: str | None = None, data: PathLike | None = None,
            probes: PathLike | None = None, n_probes: int = 64, max_test: int = 200,
            k_values: Sequence[int] = (0, 1, 2, 3, 4, 6, 8), layers: str = "all", excite: bool = True,
            input_detectors: Sequence[str] = (), input_images: int = 32,
            device: str | None = "cpu", dtype: str | None = "float32") -> AnalysisResult:
    """The ProjLens report (Markdown + PNG figures in ``out``) on ``checkpoint``; returns the report's data.

    ``reference``, the test ``data`` and the clean ``probes`` default to what its attack.json records, else the
    default zoo's; the ``benign`` fine-tunes to those of the reference's cached calibration (``benign_source``
    in the result says where they came from).

    ``input_detectors``: registered input-level detectors (``input-shift``, ``strip``, ``spectral-signatures``,
    ``activation-clustering``) also scored on the triggered vs clean test inputs, as the bench scores them
    (``input_level.detectors`` in the result; ``input-shift`` also reference-free; image-level ones such as
    STRIP on ``input_images`` images of each kind). Needs the trigger (attack.json or ``variant``)."""
    from .attacks.variants import VARIANTS
    from .eval.analyze import AnalyzeOptions, analyze_checkpoint
    from .eval.analyze_report import write_report
    from .eval.input_detection import input_detector_names

    checkpoint, out = Path(checkpoint), Path(out)
    if variant is not None and variant not in VARIANTS:
        raise UsageError(f"unknown variant {variant!r}; choose from: {', '.join(VARIANTS)}")
    ks = tuple(sorted(set(k_values)))
    if not ks or min(ks) < 0 or max(ks) > 64:
        raise UsageError("`k_values` must be between 0 and 64")
    unknown = sorted(set(input_detectors) - set(input_detector_names(input_detectors)))
    if unknown:
        raise UsageError(f"not input-level detectors: {', '.join(unknown)}")
    if input_images < 1:
        raise UsageError("`input_images` must be >= 1")
    _need_path(checkpoint, "checkpoint")
    benign = tuple(Path(b) for b in benign)
    for b in benign:
        _need_path(b, "benign checkpoint")
    recorded = attack_provenance(checkpoint)
    test_data = Path(data) if data is not None else recorded.get("test_data")
    probe_data = Path(probes) if probes is not None else recorded.get("probe_data")
    ref = Path(reference) if reference is not None else recorded.get("reference")
    if ref is None:
        ref = load_zoo().reference
    _need_path(ref, "reference checkpoint")
    benign_source = "`benign`" if benign else None
    if not benign:
        benign, benign_source = _calibration_benign(ref)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: exists and is not a directory")
    if test_data is None or probe_data is None:
        z = load_zoo(progress=False)
        test_data, probe_data = test_data or z.test_data, probe_data or z.train_data
    opts = AnalyzeOptions(k_values=ks, layers=layers, n_probes=n_probes, max_test=max_test, excite=excite,
                          input_detectors=tuple(input_detectors), input_images=input_images)
    analysis = analyze_checkpoint(checkpoint, ref, test_data, probe_data, benign=benign, variant=variant,
                                  options=opts, device=device, dtype=dtype)
    return AnalysisResult(write_report(analysis, out), benign_source, out / "report.md")


def guard(checkpoint: PathLike, images: PathLike, *, reference: PathLike | None = None,
          probes: PathLike | None = None, n_probes: int = 64, fpr: float = 0.01, threshold: float | None = None,
          k: int = 8, device: str | None = "cpu", dtype: str | None = "float32") -> GuardResult:
    """Score every image in the folder ``images`` with a projector guard calibrated on clean ``probes`` only
    (a folder or LLaVA conversation JSON; default: the training data attack.json names, else the zoo's).
    Returns the threshold, one row per image (``score``, ``flagged``), unreadable images as ``errors`` and
    the number ``flagged``."""
    from .checkpoint import load_projector
    from .guard import IMAGE_SUFFIXES, ProjectorGuard, load_image_folder, probe_images
    from .runtime import LlavaRuntime

    checkpoint, images = Path(checkpoint), Path(images)
    _need_path(checkpoint, "checkpoint")
    if not images.exists():
        raise UsageError(f"{images}: no such directory")
    paths, arrays, errors = load_image_folder(images)
    if not paths and not errors:
        raise NothingScannableError(f"{images}: no images ({', '.join(IMAGE_SUFFIXES)})")
    ref = None
    if reference is not None:
        _need_path(Path(reference), "reference checkpoint")
        ref = load_projector(reference)
    rt = LlavaRuntime.from_pretrained(checkpoint, device=device, dtype=dtype)
    probe_data = Path(probes) if probes is not None else attack_provenance(checkpoint).get("probe_data")
    probe_arrays = probe_images(probe_data if probe_data is not None else load_zoo().train_data, n_probes)
    if len(probe_arrays) < 4:
        raise UsageError(f"need at least 4 clean probe images, got {len(probe_arrays)}")
    try:
        pf = rt.vision_features(probe_arrays)
        g = ProjectorGuard.calibrate(rt.model, pf, reference=ref, k=k, fpr=fpr)
        if threshold is not None:
            g.detector.threshold = threshold
        scores = g.score(rt.vision_features(arrays)) if arrays else []
    except (ValueError, RuntimeError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{checkpoint}: cannot run the guard ({why})") from None
    rows = [{"image": str(p), "score": round(float(s), 4), "flagged": bool(s > g.threshold)}
            for p, s in zip(paths, scores, strict=True)]
    mode = ("shift in dW top-k subspace + excitation direction" if ref is not None
            else "projector output (no reference)")
    return GuardResult(checkpoint, g.threshold, mode, len(probe_arrays), fpr, rows, errors)


def bench(out: PathLike, *, preset: str = "tiny", zoo_preset: str | None = None, variants: Sequence[str] = (),
          poison_rates: Sequence[float] = (), seeds: Sequence[int] = (), detectors: Sequence[str] = (),
          mitigations: Sequence[str] | None = None, model: PathLike | None = None, data: PathLike | None = None,
          test_data: PathLike | None = None, epochs: float | None = None, n_clean: int = 64,
          n_input_images: int = 32, mitigation_params: dict[str, Any] | None = None, jobs: int = 1,
          launcher: str = "local", launch_args: str = "", shard: str | None = None,
          progress: bool = True) -> list[dict[str, Any]]:
    """The benchmark grid (attacks x poison rates x seeds x defenses, with benign controls) into ``out``
    (resumable: cells already in ``out/results.jsonl`` are skipped); writes ``summary.md``/``.csv`` and figures
    and returns the cells' records. Empty selections mean all registered, except ``mitigations``: ``None`` all,
    empty none.
    ``mitigation_params``: ``{"NAME.KEY": value}`` over the preset's."""
    from .attacks.variants import VARIANTS
    from .detectors import DETECTORS
    from .eval.bench import PRESETS, BenchConfig, parse_shard, run_bench
    from .eval.bench import mitigation_params as resolve_params
    from .mitigations import MITIGATIONS

    if preset not in PRESETS:
        raise UsageError(f"unknown bench preset {preset!r}; choose from: {', '.join(PRESETS)}")
    if launch_args and launcher != "accelerate":
        raise UsageError("`launch_args` needs `launcher` accelerate")
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise UsageError("bench runs as one process (each would run the whole grid); use `launcher` accelerate "
                         "to run every fine-tune under `accelerate launch`")
    p = PRESETS[preset]
    shard_spec = parse_shard(shard)
    names = {"variants": _names(VARIANTS, variants or p.get("variants", ()), "variant(s)"),
             "detectors": _names(DETECTORS, detectors or p.get("detectors", ()), "detector(s)")}
    if mitigations is None and "mitigations" in p:
        mitigations = p["mitigations"]
    mit = _names(MITIGATIONS, mitigations or (), "mitigation(s)") if mitigations is None or mitigations else []
    model, data, test_data = model_and_data(model, data, zoo_preset=zoo_preset or p["zoo"], test_data=test_data)
    mparams = resolve_params(p.get("mitigation_params", {}), dict(mitigation_params or {}), mit)
    out = Path(out)
    cfg = BenchConfig(
        variants=names["variants"], poison_rates=list(poison_rates) or p["poison_rates"],
        seeds=list(seeds) or p["seeds"], detectors=names["detectors"], mitigations=mit,
        model=str(model), train_data=str(data), test_data=str(test_data), out=out, n_clean=n_clean,
        n_input_images=n_input_images, epochs=epochs, jobs=jobs, shard=shard_spec, launcher=launcher,
        launch_args=launch_args, mitigation_params=mparams, benign_seeds=p.get("benign_seeds"),
        recipe_spread=p.get("recipe_spread", False), eval_benign_variants=p.get("eval_benign_variants", True),
    )
    recs = run_bench(cfg, progress=progress)
    _write_summaries(recs, out)
    return recs


def bench_merge(shards: Sequence[PathLike], out: PathLike) -> list[dict[str, Any]]:
    """Join shard directories' ``results.jsonl`` into ``out`` and write the summary; returns the records."""
    from .eval.bench import merge_results

    recs = merge_results([Path(s) for s in shards], Path(out))
    _write_summaries(recs, Path(out))
    return recs


def _write_summaries(recs: list[dict[str, Any]], out: Path) -> None:
    """``summary.md`` for any grid; ``population.md`` too when the cells draw their own recipe (the population
    preset's spread), whether the grid ran as one process or as shards joined by :func:`bench_merge`."""
    from .eval.population import write_population_summary
    from .eval.summary import write_summary

    write_summary(recs, out)
    if recs and all((r.get("cell") or {}).get("lr") is not None for r in recs):
        write_population_summary(recs, out)


def _names(registry: dict, chosen: Sequence[str], what: str) -> list[str]:
    if not chosen:
        return list(registry)
    unknown = [c for c in chosen if c not in registry]
    if unknown:
        raise UsageError(f"unknown {what} {unknown}; choose from: {', '.join(registry)}")
    return list(chosen)


def scan(paths: Sequence[PathLike], reference: PathLike | None = None, calibration: PathLike | None = None,
         lens_layers: int = 2, fpr: float | None = None) -> list[Any]:
    """Scan checkpoints (or folders of them); one :class:`~projlens_defense.detectors.scan.ScanResult` each.

    ``calibration``: a calibration file; default: the cached self-generated calibration of each
    checkpoint's model (``verdict`` is ``inconclusive`` when there is none, or without ``reference``
    when nothing is flagged). ``fpr``: the false-positive rate the threshold is set for (default 5%, the
    calibration's benign null is the same at any rate). A path that does not exist is an error; checkpoints
    that cannot be read are results with ``verdict`` ``error``."""
    return scan_report(paths, reference, calibration, lens_layers, fpr)[0]


def scan_report(paths: Sequence[PathLike], reference: PathLike | None = None, calibration: PathLike | None = None,
                lens_layers: int = 2, fpr: float | None = None) -> tuple[list[Any], list[str]]:
    """:func:`scan`, plus the entries of the folders scanned that hold no checkpoint (skipped)."""
    from .detectors.calibration import DEFAULT_FPR, load_calibration
    from .detectors.scan import Scanner

    for p in paths:
        if not os.path.lexists(p):  # one that is there but unreadable is a result with verdict error
            raise UsageError(f"{p}: path does not exist")
    cal = load_calibration(Path(calibration)) if calibration is not None else None
    return Scanner(cal, reference=reference, ov_layers=lens_layers,
                   fpr=DEFAULT_FPR if fpr is None else fpr).scan_paths([Path(p) for p in paths])


def sanitize(checkpoint: PathLike, out: PathLike, *, method: str = "subspace", reference: PathLike | None = None,
             clean_data: PathLike | None = None, n_clean: int = 64, n_eval: int = 256, clean_seed: int = 0,
             model: PathLike | None = None, params: dict[str, Any] | None = None,
             calibration: PathLike | None = None, force: bool = False, link: bool = False,
             device: str | None = "cpu", dtype: str | None = "float32") -> SanitizeResult:
    """Repair ``checkpoint``'s projector with ``method`` and write it to ``out`` in the input's format.

    Atomic; never touches the input; refuses an existing ``out`` unless ``force``. Raises
    :class:`~projlens_defense.errors.NothingRemovedError` (and writes nothing) when the method removes
    nothing. With ``clean_data`` the method may use ``n_clean`` samples, and ``n_eval`` others measure
    the clean accuracy before and after. ``params``: the method's parameters by name
    (``MITIGATIONS[method].defaults()`` lists them; an unknown one is a UsageError).
    Returns what the CLI prints (method report, removed rank and energy, weight change, warnings).

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
        raise UsageError(f"{out}: already exists; pass `force` to replace it")
    if n_clean < 1 or n_eval < 0:
        raise UsageError("n_clean must be >= 1 and n_eval >= 0")
    if cls.requires_clean and clean_data is None:
        raise UsageError(f"method {method!r} needs clean samples (`clean_data`: LLaVA conversation JSON)")
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
                     warnings: list[str]) -> SanitizeResult:
    """The body of :func:`sanitize` once the output's copy is under way."""
    from .checkpoint import load_projector

    suspect = load_projector(info)
    ref_path = reference or attack_provenance(checkpoint).get("reference")
    if cls.requires_reference and ref_path is None:
        raise UsageError(f"method {method!r} needs the reference projector the checkpoint was fine-tuned from "
                         "(`reference`; no attack.json with a base_model here)")
    ref = load_projector(ref_path) if ref_path is not None else None
    if ref is not None:
        suspect.delta(ref)  # refuses a reference of another shape, before any work
        warnings += _outside_changed(info, Path(ref_path))

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
    inputs: dict[str, Any] = {}
    if cls.uses_lens:
        from .detectors.lens_context import lens_context
        from .detectors.scan import repair_judge

        inputs["lens"], inputs["calibration"] = lens_context(checkpoint, ref, warnings, calibration)
    mitigation = cls.from_params(params, **inputs)
    if cls.uses_lens:  # the self-check judges at the repair's own rate
        from .task_subspace import REPAIR_FPR

        mitigation.judge = repair_judge(inputs["lens"], inputs["calibration"],
                                        fpr=float(getattr(mitigation, "fpr", REPAIR_FPR)))
    result = mitigation.apply(suspect, ref, clean)
    assert result.projector is not None
    if _unchanged(suspect, result.projector):
        why = result.report.get("selection") or "the method selected nothing"
        raise NothingRemovedError(f"{method}: nothing removed ({why}); no output written"
                                  + "".join(f" [{w}]" for w in warnings))
    check = result.report.get("scan_check") or (result.report.get("task_removed_step") or {}).get("scan_check") or {}
    if check.get("verdict_after") == "suspicious":
        warnings.append(f"the calibrated scan still flags the repaired projector (z {check.get('score')} > "
                        f"{check.get('threshold')}): the repair may be incomplete; check it with `evaluate` or "
                        "repair few-shot with clean data")
    elif check.get("verdict_after") == "inconclusive":
        warnings.append("the calibrated scan does not flag the repaired projector but cannot call it clean either: a "
                        "component of what is left outside the benign task subspace still exceeds the benign bound; "
                        "check the repair with `evaluate`")
    staged.finish(result.projector, warnings)

    clean_accuracy = None
    if rt is not None and heldout:
        from .attacks.evaluate import evaluate, prepare_eval_set
        from .projector import ProjectorModule

        es = prepare_eval_set(rt, heldout, None)
        before = evaluate(rt, es, projector=ProjectorModule(suspect).eval()).clean_accuracy
        after = evaluate(rt, es, projector=result.as_module()).clean_accuracy
        clean_accuracy = {"n": len(heldout), "before": before, "after": after, "change": after - before}
    elif clean_data is not None:
        warnings.append("no held-out clean samples left for the clean-accuracy check (raise the data size)")
    return SanitizeResult(checkpoint, out, info.format, result.method, "few-shot" if clean is not None else "data-free",
                          None if ref_path is None else Path(ref_path), result.writable, result.params,
                          result.report, warnings, clean_accuracy)


def _outside_changed(info: Any, reference: Path) -> list[str]:
    """Warnings for the checkpoint's parts outside the projector that differ from the reference's: a repair of the
    projector leaves whatever was trained there."""
    from .checkpoint import detect_format
    from .checkpoint.scope import checkpoint_scope

    try:
        scope = checkpoint_scope(info, detect_format(reference))
    except ProjlensError:
        return []
    return scope.differing_warnings("not repaired (a backdoor trained there stays; this repair edits the projector "
                                    "only)")


def _unchanged(before: Any, after: Any) -> bool:
    """True when ``after`` has exactly ``before``'s weights and biases (a repair that removed nothing)."""
    import torch

    for a, b in zip(before.layers, after.layers, strict=True):
        if not torch.equal(a.weight, b.weight):
            return False
        if (a.bias is None) != (b.bias is None) or (a.bias is not None and not torch.equal(a.bias, b.bias)):
            return False
    return True
