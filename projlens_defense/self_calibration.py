"""Self-calibration: benign projector fine-tunes made by the tool itself, and the calibration fitted on them.

A verdict needs a null distribution for *this* model: what benign fine-tunes of its reference look
like. A user rarely has a population of those, so ``calibrate --generate N`` makes them: the
attack's training loop without poison (:func:`~projlens_defense.training.train_projector`, the
projector only), over a documented spread of recipes (:func:`benign_recipes`: seeds, learning rate
x0.5/1/2, epochs x1/0.5/2, each on its own 80% subsample of the clean data). Each fine-tune's
projector is stored in the user cache under the reference's projector digest, so the work resumes
after an interruption and ``scan``, ``sanitize`` and ``analyze`` find the fitted calibration by
themselves (:func:`~projlens_defense.detectors.calibration.cached_calibration`).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .cache import calibration_dir
from .checkpoint import load_projector
from .detectors.calibration import (
    CALIBRATION_FILE,
    WEIGHT_SPACE_DETECTORS,
    Calibration,
    fit_calibration,
    projector_digest,
)
from .errors import UsageError
from .runinfo import environment

LR_SPREAD = (1.0, 0.5, 2.0)
EPOCH_SPREAD = (1.0, 0.5, 2.0)
SUBSAMPLE = 0.8
DEFAULT_LR = 5e-3
DEFAULT_EPOCHS = 20.0
DEFAULT_N = 8


@dataclass(frozen=True)
class BenignRecipe:
    """One benign fine-tune of the spread: its seed, learning rate, epochs and data subsample."""

    index: int
    seed: int
    lr: float
    epochs: float
    subsample: float = SUBSAMPLE
    batch_size: int = 32

    @property
    def name(self) -> str:
        return f"benign-{self.index:02d}"


def benign_recipes(n: int, lr: float = DEFAULT_LR, epochs: float = DEFAULT_EPOCHS, seed: int = 0) -> list[BenignRecipe]:
    """``n`` recipes around (lr, epochs): lr x {1, 0.5, 2} cycling fastest, epochs x {1, 0.5, 2} per block of
    three, seeds ``1000 * (seed + 1) + i``; every one on its own 80% subsample of the data.

    (Taking the grid's corners first, so that N = 8 holds lr x2 with epochs x2, was tried: it widened the null
    so much that the micro zoo's malicious-injection fine-tune, ASR 1.0, scored z 2.60 under a 3.71 threshold.
    The order stays; a benign recipe beyond the spread can exceed the bound, as the README says.)"""
    return [BenignRecipe(i, 1000 * (seed + 1) + i, lr * LR_SPREAD[i % 3], epochs * EPOCH_SPREAD[(i // 3) % 3])
            for i in range(n)]


def _subsample(n: int, frac: float, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    k = max(1, int(round(n * frac)))
    return sorted(torch.randperm(n, generator=g)[:k].tolist())


def _train_one(reference: str, data: str, features: str, recipe: dict, out: str, threads: int,
               device: str = "cpu", dtype: str = "float32") -> dict:
    """Worker: one benign fine-tune of ``reference``'s projector; writes its projector tensors to ``out``.
    As ``attack`` does: the frozen tower and LLM in ``dtype`` on ``device``, the projector trained in float32."""
    from .conversations import load_conversations
    from .runtime import LlavaRuntime, resolve_placement
    from .training import train_projector

    torch.set_num_threads(threads)
    r = BenignRecipe(**recipe)
    t0 = time.time()
    torch.manual_seed(r.seed)
    dev, dt = resolve_placement(device, dtype, auto_dtype=torch.float32)
    rt = LlavaRuntime.from_pretrained(reference, device=dev, dtype=dt)
    if dt != torch.float32:
        rt.projector.float()
    samples = load_conversations(data)
    feats = torch.load(features, weights_only=True)
    idx = _subsample(len(samples), r.subsample, r.seed)
    losses = train_projector(rt, feats[idx], [samples[i].question for i in idx], [samples[i].answer for i in idx],
                             epochs=r.epochs, lr=r.lr, batch_size=r.batch_size, seed=r.seed, progress=False,
                             accelerate=False)
    prefix = getattr(rt, "projector_prefix", "")  # a Qwen2-VL merger keeps its `visual.merger.` keys (the reader's format)
    state = {prefix + k: v.detach().to("cpu").contiguous() for k, v in rt.projector.state_dict().items()}
    tmp = f"{out}.tmp-{os.getpid()}"
    save_file(state, tmp, metadata={"format": "pt", "recipe": json.dumps(recipe)})
    os.replace(tmp, out)
    return {"recipe": recipe, "final_loss": sum(losses[-5:]) / max(1, len(losses[-5:])),
            "n_train": len(idx), "seconds": round(time.time() - t0, 2)}


def generate_benign(reference: str | os.PathLike[str], data: str | os.PathLike[str], recipes: Sequence[BenignRecipe],
                    work: Path, jobs: int = 1, progress: bool = True, device: str = "auto",
                    dtype: str = "auto") -> list[Path]:
    """Run the benign fine-tunes not yet in ``work`` (resumable); returns every recipe's projector file.
    ``device`` / ``dtype`` place the frozen model as ``attack --device/--dtype`` do (auto: a GPU when there is
    one; float32 unless asked otherwise)."""
    from .conversations import load_conversations
    from .runtime import LlavaRuntime, resolve_placement

    work.mkdir(parents=True, exist_ok=True)
    outs = [work / f"{r.name}.safetensors" for r in recipes]
    todo = [(r, o) for r, o in zip(recipes, outs, strict=True) if not _made_with(o, r)]
    if not todo:
        return outs
    feats_path = work / "features.pt"
    if not feats_path.is_file():  # the frozen vision tower's features, computed once for all fine-tunes
        dev, dt = resolve_placement(device, dtype, auto_dtype=torch.float32)
        rt = LlavaRuntime.from_pretrained(reference, device=dev, dtype=dt)
        samples = load_conversations(data)
        tmp = work / f".features.tmp-{os.getpid()}"
        torch.save(rt.vision_features([s.image for s in samples]), tmp)
        os.replace(tmp, feats_path)
    jobs = max(1, min(jobs, len(todo)))
    threads = max(1, (os.cpu_count() or 1) // jobs)
    args = [(str(reference), str(data), str(feats_path), asdict(r), str(o), threads, str(device), str(dtype))
            for r, o in todo]
    bar = tqdm(total=len(todo), desc=f"benign fine-tunes ({jobs} job{'s' if jobs > 1 else ''})",
               disable=not progress, unit="fine-tune")
    log = work / "fine_tunes.jsonl"
    try:
        if jobs == 1:
            for a in args:
                _log(log, _train_one(*a))
                bar.update(1)
        else:
            import multiprocessing as mp

            with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
                for fut in as_completed([pool.submit(_train_one, *a) for a in args]):
                    _log(log, fut.result())
                    bar.update(1)
    finally:
        bar.close()
    return outs


def _made_with(path: Path, recipe: BenignRecipe) -> bool:
    """Whether ``path`` holds a finished fine-tune of exactly this recipe (its metadata records the recipe)."""
    from safetensors import safe_open

    if not path.is_file():
        return False
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        return json.loads(meta.get("recipe", "null")) == asdict(recipe)
    except (OSError, ValueError, RuntimeError):
        return False


def _log(path: Path, rec: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(rec) + "\n")


def work_dir_for(reference: str | os.PathLike[str]) -> tuple[Path, str]:
    """The cache folder of ``reference``'s self-calibration and the reference projector's digest."""
    digest = projector_digest(load_projector(reference))
    return calibration_dir() / digest, digest


def calibration_path(reference: str | os.PathLike[str]) -> Path:
    """Where the self-generated calibration of ``reference`` is (or will be) stored."""
    return work_dir_for(reference)[0] / CALIBRATION_FILE


def self_calibrate(reference: str | os.PathLike[str], data: str | os.PathLike[str], n: int = DEFAULT_N, *,
                   lr: float = DEFAULT_LR, epochs: float = DEFAULT_EPOCHS, seed: int = 0, jobs: int = 1,
                   fpr: float | None = None, lens_layers: int = 2, progress: bool = True,
                   log: Callable[[str], None] | None = None, device: str = "auto",
                   dtype: str = "auto") -> tuple[Calibration, Path]:
    """Make ``n`` benign fine-tunes of ``reference`` on ``data`` (cached, resumable), fit a calibration on
    them and store it in the cache under the reference digest; returns it and its path."""
    from .detectors import DETECTORS
    from .detectors.loading import load_checkpoint
    from .detectors.scan import Scanner

    if n < 3:
        raise UsageError(f"self-calibration needs at least 3 benign fine-tunes, got {n}")
    if not (Path(reference) / "config.json").is_file():
        raise UsageError(f"{reference}: generating benign fine-tunes needs an HF LLaVA model directory")
    t0 = time.time()
    work, digest = work_dir_for(reference)
    recipes = benign_recipes(n, lr, epochs, seed)
    files = generate_benign(reference, data, recipes, work, jobs, progress, device=device, dtype=dtype)
    helper = Scanner(Calibration(null={}), reference=reference, ov_layers=lens_layers)
    inputs = [helper.build_input(load_checkpoint(f, readout=True, ov_layers=lens_layers), []) for f in files]
    kw = {} if fpr is None else {"fpr": fpr}
    cal = fit_calibration(inputs, {k: DETECTORS[k] for k in WEIGHT_SPACE_DETECTORS},
                          note=f"self-generated: {n} benign fine-tunes of {reference} on {data}", **kw)
    cal.generation = {"reference": str(reference), "data": str(data), "recipes": [asdict(r) for r in recipes],
                      "spread": {"lr": list(LR_SPREAD), "epochs": list(EPOCH_SPREAD), "subsample": SUBSAMPLE},
                      "base": {"lr": lr, "epochs": epochs, "seed": seed}, "jobs": jobs,
                      "wall_time_s": round(time.time() - t0, 2), "environment": environment()}
    path = work / CALIBRATION_FILE
    tmp = work / f".{CALIBRATION_FILE}.tmp-{os.getpid()}"
    cal.save(tmp)
    os.replace(tmp, path)
    cal.source = str(path)
    if log:
        log(f"calibration for reference {digest}: {n} benign fine-tunes, {time.time() - t0:.1f} s")
    return cal, path
