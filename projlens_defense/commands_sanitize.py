"""`projlens-defense sanitize`: repair a projector and write it back in the checkpoint's own format."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import click

from .errors import NothingRemovedError, UsageError
from .runinfo import attack_provenance


def _parse_params(items: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for it in items:
        if "=" not in it:
            raise UsageError(f"--param expects KEY=VALUE, got {it!r}")
        k, v = it.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


def _text(rec: dict[str, Any]) -> str:
    r = rec["report"]
    lines = [f"wrote {rec['out']}  (method {rec['method']}, {rec['mode']}, format {rec['format']})"]
    if rec.get("reference"):
        lines.append(f"reference: {rec['reference']}")
    if "probe" in r:
        pr = r["probe"]
        lines.append(f"probe: target {pr.get('target')!r} on {pr.get('support', 0):.0%} of the clean samples "
                     f"(modal answer under the synthesized trigger: {pr.get('modal_probe_answer')!r})")
    if "selection" in r:
        lines.append(f"selection: {r['selection']}")
    if "rank" in r:
        lines.append(f"removed: rank {r['rank']}, energy of the update removed {r.get('energy_removed')}")
    for c in r.get("removed", []) if isinstance(r.get("removed"), list) else []:
        lines.append(f"  {c.get('layer')} component {c.get('component')}: sigma {c.get('sigma')}, "
                     f"energy share {c.get('energy')}")
    if "outcome" in r:
        lines.append(f"outcome: {r['outcome']}")
    for w in r.get("weight_change", []):
        extra = f", update energy removed {w['update_energy_removed']:.4f}" if "update_energy_removed" in w else ""
        lines.append(f"  {w['layer']}: relative weight change {w['relative_change']:.4f}, "
                     f"change rank {w['change_rank']}{extra}")
    ca = rec.get("clean_accuracy")
    if ca:
        lines.append(f"clean accuracy on {ca['n']} held-out clean samples: {ca['before']:.4f} -> {ca['after']:.4f} "
                     f"({(ca['after'] - ca['before']) * 100:+.2f} points)")
    lines += [f"warning: {w}" for w in rec.get("warnings", [])]
    return "\n".join(lines)


@click.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--reference", type=click.Path(path_type=Path), default=None,
              help="The checkpoint the suspect was fine-tuned from (default: base_model of its attack.json).")
@click.option("--method", default="subspace", show_default=True, help="Mitigation (see --list-methods).")
@click.option("--clean-data", type=click.Path(path_type=Path), default=None,
              help="Clean samples (LLaVA conversation JSON) for few-shot methods and the clean-accuracy check.")
@click.option("--n-clean", type=int, default=64, show_default=True, help="Clean samples the method may use.")
@click.option("--n-eval", type=int, default=256, show_default=True,
              help="Held-out clean samples (the rest of --clean-data) for the clean-accuracy change.")
@click.option("--clean-seed", type=int, default=0, show_default=True)
@click.option("--model", type=click.Path(path_type=Path), default=None,
              help="HF LLaVA directory whose vision tower and LLM run the clean samples (default: CHECKPOINT).")
@click.option("--param", "params", multiple=True, help="Method parameter KEY=VALUE (repeatable; JSON values).")
@click.option("--calibration", type=click.Path(path_type=Path), default=None,
              help="Scan calibration fitted on benign fine-tunes of this model (`projlens-defense calibrate`); "
                   "data-free subspace/target-direction use its task subspace and benign null "
                   "(default: the cached self-generated calibration of the reference).")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Output checkpoint (same format).")
@click.option("--force", is_flag=True, help="Replace an existing output.")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
def sanitize(checkpoint: Path, reference: Path | None, method: str, clean_data: Path | None, n_clean: int,
             n_eval: int, clean_seed: int, model: Path | None, params: tuple[str, ...], calibration: Path | None,
             out: Path, force: bool, fmt: str) -> None:
    """Remove a backdoor from CHECKPOINT's projector and write the repaired checkpoint to --out.

    The output keeps the input's format (an HF directory stays an HF directory with only the projector
    tensors changed; mm_projector.bin stays a torch pickle); it is written atomically, an existing
    output is refused without --force, and the input is never modified. When the method removes nothing
    it says why and exits 6 without writing (never an unchanged copy). Methods: subspace (default),
    target-direction, unlearn, restore, finetune, fine-prune, clp, orthogonal; norm-guard is a run-time
    wrapper (Python API only).
    """
    from .checkpoint import detect_format, load_projector, write_projector
    from .cli import emit
    from .mitigations import LENS_METHODS, MITIGATIONS

    if method not in MITIGATIONS:
        raise UsageError(f"unknown method {method!r}; choose from: {', '.join(MITIGATIONS)}")
    cls = MITIGATIONS[method]
    if cls.run_time_only:
        raise UsageError(f"method {method!r} is a run-time guard, not a weight edit, so it cannot be written to a "
                         f"checkpoint; use projlens_defense.mitigations.{cls.__name__} from Python")
    if os.path.lexists(out) and not force:
        raise UsageError(f"{out}: already exists; pass --force to replace it")
    if n_clean < 1 or n_eval < 0:
        raise UsageError("--n-clean must be >= 1 and --n-eval >= 0")
    if cls.requires_clean and clean_data is None:
        raise UsageError(f"method {method!r} needs clean samples: pass --clean-data (LLaVA conversation JSON)")
    warnings: list[str] = []
    info = detect_format(checkpoint)
    suspect = load_projector(info)
    ref_path = reference or attack_provenance(checkpoint).get("reference")
    if cls.requires_reference and ref_path is None:
        raise UsageError(f"method {method!r} needs the reference projector the checkpoint was fine-tuned from: "
                         f"pass --reference (no attack.json with a base_model here)")
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
            raise UsageError("--clean-data needs an HF LLaVA model to run the samples: pass --model DIR "
                             "(the checkpoint itself is not an HF LLaVA directory)")
        samples = load_conversations(clean_data)
        order = list(range(len(samples)))
        random.Random(clean_seed).shuffle(order)
        used = [samples[i] for i in order[:n_clean]]
        heldout = [samples[i] for i in order[n_clean : n_clean + n_eval]]
        rt = LlavaRuntime.from_pretrained(runner)  # its LLM and vision tower; the projector is passed explicitly
        clean = CleanData.from_samples(rt, used, None, clean_seed) if cls.uses_clean else None
        if len(samples) < n_clean:
            warnings.append(f"--clean-data has only {len(samples)} samples")
    kw: dict[str, Any] = _parse_params(params)
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

        es = prepare_eval_set(rt, heldout, None)
        before = evaluate(rt, es, projector=_module(suspect)).clean_accuracy
        after = evaluate(rt, es, projector=result.as_module()).clean_accuracy
        rec["clean_accuracy"] = {"n": len(heldout), "before": before, "after": after, "change": after - before}
    elif clean_data is not None:
        warnings.append("no held-out clean samples left for the clean-accuracy check (raise the data size)")
    emit(rec, fmt, _text(rec))


def _unchanged(before: Any, after: Any) -> bool:
    """True when ``after`` has exactly ``before``'s weights and biases (a repair that removed nothing)."""
    import torch

    for a, b in zip(before.layers, after.layers, strict=True):
        if not torch.equal(a.weight, b.weight):
            return False
        if (a.bias is None) != (b.bias is None) or (a.bias is not None and not torch.equal(a.bias, b.bias)):
            return False
    return True


def _module(projector: Any) -> Any:
    from .mitigations import ProjectorModule

    return ProjectorModule(projector).eval()
