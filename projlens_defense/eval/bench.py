"""The benchmark harness: attacks x poison rates x seeds, benign controls, every detector and mitigation.

A *cell* is one projector fine-tune (a backdoored model or a benign control) together with everything
measured on it: its own metrics, every detector's checkpoint score and every mitigation's effect.
Cells are keyed by the hash of their full configuration; `results.jsonl` holds one record per
finished cell, so an interrupted run resumes where it stopped and shards of a grid merge by key.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import sys
import time
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import UsageError
from ..runinfo import environment, has_attack_record, read_attack_record

if TYPE_CHECKING:
    from ..mitigations.base import CleanData

POPULATION_VARIANTS = ["targeted-refusal", "malicious-injection", "perceptual-hijack", "jailbreak-output", "badnets",
                       "blended", "wanet", "sig", "text-trigger", "two-key", "clean-label", "projector-and-llm-lora",
                       "adaptive-spread", "adaptive-hide-target", "adaptive-mimic"]
"""Every in-scope family (the projector is poisoned): ProjLens, classic, text / two-key / clean-label / with LLM
LoRA, adaptive."""
RECIPE_SPREAD = [(lr, ep) for lr in (0.5, 1.0, 2.0) for ep in (0.5, 1.0, 2.0)]
"""(learning-rate, epochs) factors on the attack recipe a population cell draws from (backdoored and benign alike)."""

PRESETS = {
    # tiny: a quick look on 2 cores; unlearn gets 4 unlearning rounds instead of 12 (its cost dominates a cell)
    "tiny": {"zoo": "micro", "poison_rates": [0.1], "seeds": [0, 1], "mitigation_params": {"unlearn": {"rounds": 4}}},
    "full": {"zoo": "default", "poison_rates": [0.1, 0.01], "seeds": [0, 1, 2], "mitigation_params": {}},
    # population: 15 families x 2 rates x 5 seeds + 60 benign = 210 fine-tunes, each with its own lr / epochs
    # from RECIPE_SPREAD; detection only (no mitigations, no input detectors), benign cells measure clean accuracy
    "population": {"zoo": "default", "poison_rates": [0.1, 0.01], "seeds": [0, 1, 2, 3, 4],
                   "benign_seeds": list(range(100, 160)), "variants": POPULATION_VARIANTS, "recipe_spread": True,
                   "mitigations": [], "detectors": ["spectral"], "eval_benign_variants": False,
                   "mitigation_params": {}},
}


@dataclass(frozen=True)
class Cell:
    """One fine-tune of the grid; `variant=None` is the benign control of its seed."""

    variant: str | None
    poison_rate: float
    seed: int
    model: str
    train_data: str
    test_data: str
    epochs: float | None = None
    lr: float | None = None

    @property
    def key(self) -> str:
        d = asdict(self)
        if d["lr"] is None:  # cells without their own learning rate keep the keys they had before it existed
            del d["lr"]
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def label(self) -> str:
        base = f"{self.variant}-p{self.poison_rate:g}-s{self.seed}" if self.variant else f"benign-s{self.seed}"
        return base if self.lr is None else f"{base}-lr{self.lr:g}-ep{self.epochs:g}"


@dataclass
class BenchConfig:
    variants: list[str]
    poison_rates: list[float]
    seeds: list[int]
    detectors: list[str]
    mitigations: list[str]
    model: str
    train_data: str
    test_data: str
    out: Path
    n_clean: int = 64
    n_input_images: int = 32
    epochs: float | None = None
    jobs: int = 1
    shard: tuple[int, int] = (0, 1)
    launcher: str = "local"
    launch_args: str = ""
    mitigation_params: dict = field(default_factory=dict)  # method name -> parameters overriding its defaults
    benign_seeds: list[int] | None = None  # seeds of the benign controls (default: `seeds`)
    recipe_spread: bool = False  # each cell draws its lr / epochs factors from RECIPE_SPREAD
    eval_benign_variants: bool = True  # benign controls measure every variant's trigger (else clean accuracy only)
    extra: dict = field(default_factory=dict)

    def _cell(self, variant: str | None, rate: float, seed: int) -> Cell:
        base = {"model": self.model, "train_data": self.train_data, "test_data": self.test_data, "epochs": self.epochs}
        if not self.recipe_spread:
            return Cell(variant, rate, seed, **base)
        from ..attacks.finetune import AttackConfig

        recipe = AttackConfig(variant=None)
        lr_f, ep_f = RECIPE_SPREAD[zlib.crc32(f"{variant}|{rate}|{seed}".encode()) % len(RECIPE_SPREAD)]
        base["epochs"] = (self.epochs or recipe.epochs) * ep_f
        return Cell(variant, rate, seed, **base, lr=recipe.lr * lr_f)

    def cells(self) -> list[Cell]:
        """The whole grid (benign controls included), sorted by key, then this shard's part."""
        benign = self.seeds if self.benign_seeds is None else self.benign_seeds
        grid = [self._cell(None, 0.0, s) for s in benign]
        grid += [self._cell(v, r, s) for v in self.variants for r in self.poison_rates for s in self.seeds]
        grid.sort(key=lambda c: c.key)
        i, n = self.shard
        return [c for k, c in enumerate(grid) if k % n == i]


def parse_shard(text: str | None) -> tuple[int, int]:
    if not text:
        return (0, 1)
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UsageError(f"`shard` expects I/N (e.g. 0/2), got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise UsageError(f"`shard` {text}: need 0 <= I < N")
    return i, n


def mitigation_params(preset: dict[str, dict], overrides: dict[str, Any], methods: Sequence[str]) -> dict[str, dict]:
    """The preset's per-method parameters for the ``methods`` run, overridden by ``{"NAME.KEY": value}``; each
    method's set is checked against its parameters, so an unknown one fails now, not in the middle of the grid."""
    from ..mitigations import MITIGATIONS

    out = {m: dict(v) for m, v in preset.items() if m in methods}
    for key, value in overrides.items():
        name, _, param = key.partition(".")
        if name not in methods or not param:
            raise UsageError(f"`mitigation_params` expects NAME.KEY=VALUE with NAME one of {list(methods)}, "
                             f"got {key!r}")
        out.setdefault(name, {})[param] = value
    for name, params in out.items():
        MITIGATIONS[name].check_params(params)
    return out


def read_results(path: Path) -> dict[str, dict]:
    """Finished cells by key (a torn last line from an interrupted write is ignored)."""
    out: dict[str, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            out[rec["key"]] = rec
    return out


def _clean_subset(train_data: str, n: int, seed: int):
    from ..conversations import load_conversations

    samples = load_conversations(train_data)
    idx = np.random.default_rng(seed).choice(len(samples), size=min(n, len(samples)), replace=False)
    return [samples[i] for i in sorted(idx)]


def run_cell(cell: Cell, cfg: BenchConfig) -> dict:
    """Fine-tune, evaluate, run every detector and mitigation on one cell; returns its record."""
    import torch

    from ..attacks.evaluate import evaluate, prepare_eval_set
    from ..attacks.finetune import AttackConfig, run_attack
    from ..attacks.variants import get_variant
    from ..conversations import load_conversations
    from ..mitigations.base import CleanData
    from ..runtime import LlavaRuntime
    from ..zoo.targets import Targets
    from .input_detection import input_detector_names

    if not os.environ.get("OMP_NUM_THREADS"):  # the user's thread setting wins; else share the cores among jobs
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, cfg.jobs)))
    t0 = time.time()
    ckpt = cfg.out / "checkpoints" / cell.key
    acfg = AttackConfig(variant=cell.variant, poison_rate=cell.poison_rate, seed=cell.seed)
    if cell.epochs is not None:
        acfg.epochs = cell.epochs
    if cell.lr is not None:
        acfg.lr = cell.lr
    if cfg.launcher == "accelerate":
        launch_attack(cell, ckpt, cfg.launch_args)
    else:
        run_attack(acfg, Path(cell.model), Path(cell.train_data), None, ckpt, force=True, progress=False)
    t_attack = time.time() - t0
    record = read_attack_record(ckpt)
    attack_distributed = record.distributed if record is not None else None

    rt = LlavaRuntime.from_pretrained(ckpt)
    test = load_conversations(cell.test_data)
    eval_variants = [cell.variant] if cell.variant else cfg.variants if cfg.eval_benign_variants else []
    targets = Targets.beside(cell.test_data)
    sets = {v: prepare_eval_set(rt, test, get_variant(v, targets=targets), cell.seed) for v in eval_variants}
    if not eval_variants:
        sets["none"] = prepare_eval_set(rt, test, None, cell.seed)
    metrics = {v: evaluate(rt, es).to_dict() for v, es in sets.items()}
    t_eval = time.time() - t0 - t_attack

    detectors, weight_features = _run_detectors(ckpt, cell.model, cfg.detectors)
    t_det = time.time() - t0 - t_attack - t_eval

    wants = cfg.mitigations or (cell.variant is not None and input_detector_names(cfg.detectors))
    probes = _clean_subset(cell.train_data, cfg.n_clean, cell.seed) if wants else []
    clean = CleanData.from_samples(rt, probes, n=None) if wants else None
    inputs = _run_input_detectors(rt, sets, probes, clean, ckpt, cell, cfg)
    t_inp = time.time() - t0 - t_attack - t_eval - t_det

    mitigations = _run_mitigations(rt, sets, ckpt, cell, cfg, clean)
    t_mit = time.time() - t0 - t_attack - t_eval - t_det - t_inp
    return {
        "key": cell.key, "label": cell.label, "cell": asdict(cell), "benign": cell.variant is None,
        "launcher": cfg.launcher, "attack_distributed": attack_distributed,
        "metrics": metrics, "detectors": detectors, "weight_features": weight_features, "input_detectors": inputs,
        "mitigations": mitigations,
        "timings_s": {"attack": round(t_attack, 2), "evaluate": round(t_eval, 2), "detectors": round(t_det, 2),
                      "input_detectors": round(t_inp, 2), "mitigations": round(t_mit, 2)},
        "wall_time_s": round(time.time() - t0, 2), "environment": environment(),
    }


def attack_command(cell: Cell, ckpt: Path, launch_args: str = "") -> list[str]:
    """The `accelerate launch ... -m projlens_defense attack ...` command line of a cell's fine-tune."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *shlex.split(launch_args), "-m", "projlens_defense",
           "attack", "--variant", cell.variant or "none", "--poison-rate", repr(cell.poison_rate), "--seed",
           str(cell.seed), "--model", cell.model, "--data", cell.train_data, "--out", str(ckpt), "--force",
           "--format", "json"]
    if cell.epochs is not None:
        cmd += ["--epochs", repr(cell.epochs)]
    return cmd


def launch_attack(cell: Cell, ckpt: Path, launch_args: str = "") -> None:
    """Run a cell's fine-tune under `accelerate launch` (its config: `launch_args`, else accelerate's default)."""
    import subprocess

    from ..errors import ProjlensError

    r = subprocess.run(attack_command(cell, ckpt, launch_args), capture_output=True, text=True)
    if r.returncode != 0 or not has_attack_record(ckpt):
        tail = "\n".join((r.stderr or "").replace("\r", "\n").splitlines()[-15:])
        raise ProjlensError(f"{cell.label}: `accelerate launch ... attack` failed (exit {r.returncode}):\n{tail}")


def _run_detectors(ckpt: Path, reference: str, names: Sequence[str]) -> tuple[dict[str, Any], dict[str, float]]:
    """Checkpoint-level scores: each detector's own score, plus the calibrated scan decision (with the cached
    self-generated calibration of the cell's reference; None where there is none) and its verdict; and the
    update's per-layer spectral statistics (the weight features supervised baselines learn from)."""
    from ..detectors.scan import Scanner

    out: dict[str, Any] = {}
    features: dict[str, float] = {}
    for mode, ref in (("reference", reference), ("reference-free", None)):
        res = Scanner(None, reference=ref).scan(ckpt)
        out[f"scan[{mode}]"] = res.score
        out[f"verdict[{mode}]"] = res.verdict
        for rep in res.detectors:
            if rep["name"] in names:
                out.setdefault(rep["name"], rep["score"])
            if rep["name"] == "spectral" and mode == "reference":
                for layer, stats in (rep.get("evidence") or {}).get("layers", {}).items():
                    features.update({f"{layer}.{k}": float(v) for k, v in stats.items()})
    return out, features


def _run_input_detectors(rt, sets: dict, probes: list, clean: CleanData | None, ckpt: Path, cell: Cell, cfg: BenchConfig) -> dict:
    """Input-level detection on a backdoored cell: held-out clean vs triggered test inputs, per detector,
    calibrated on the clean probes only (see :mod:`projlens_defense.eval.input_detection`)."""
    from ..checkpoint import load_projector
    from .input_detection import input_detector_names, run_input_detectors

    if cell.variant is None or clean is None or not input_detector_names(cfg.detectors):
        return {}
    es = sets[cell.variant]
    if es.triggered_features is None:
        return {}
    return run_input_detectors(
        rt, load_projector(ckpt), load_projector(cell.model), cfg.detectors, samples=es.samples,
        clean_features=es.clean_features, eligible=es.eligible, triggered_features=es.triggered_features,
        variant=es.variant, seed=cell.seed, probe_features=clean.features, probe_images=[s.image for s in probes],
        probe_questions=[s.question for s in probes], image_subset=cfg.n_input_images)


def _run_mitigations(rt, sets: dict, ckpt: Path, cell: Cell, cfg: BenchConfig,
                     clean: CleanData | None) -> dict[str, dict]:
    """Each mitigation applied to this cell's projector, evaluated on the same cached features."""
    if not cfg.mitigations:
        return {}
    from ..attacks.evaluate import evaluate
    from ..checkpoint import load_projector
    from ..detectors.lens_context import lens_context
    from ..detectors.scan import repair_judge
    from ..mitigations import MITIGATIONS

    suspect, reference = load_projector(ckpt), load_projector(cell.model)
    lens: dict = {}
    if any(MITIGATIONS[m].uses_lens for m in cfg.mitigations):  # as `sanitize` runs them: logit lens + matching scan calibration
        lens["lens"], lens["calibration"] = lens_context(ckpt, reference)
        lens["judge"] = repair_judge(lens["lens"], lens["calibration"])
    out = {}
    for name in cfg.mitigations:
        t = time.time()
        params = cfg.mitigation_params.get(name, {})
        inputs = lens if MITIGATIONS[name].uses_lens else {}
        module = MITIGATIONS[name].from_params(params, **inputs).apply(suspect, reference, clean).as_module()
        out[name] = {v: evaluate(rt, es, projector=module).to_dict() for v, es in sets.items()}
        out[name]["seconds"] = round(time.time() - t, 2)
        if params:
            out[name]["params"] = params
    return out


def run_bench(cfg: BenchConfig, progress: bool = True) -> list[dict]:
    """Run the missing cells of the grid (in parallel with `jobs`), appending to results.jsonl."""
    from tqdm.auto import tqdm

    cfg.out.mkdir(parents=True, exist_ok=True)
    results_path = cfg.out / "results.jsonl"
    done = read_results(results_path)
    if results_path.is_file():  # drop a line torn by an interrupted write before appending
        tmp = results_path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r, default=str) + "\n" for r in done.values()))
        os.replace(tmp, results_path)
    todo = [c for c in cfg.cells() if c.key not in done]
    (cfg.out / "bench_config.json").write_text(json.dumps({**asdict(cfg), "out": str(cfg.out)}, indent=2, default=str))
    bar = tqdm(total=len(todo), desc="bench cells", disable=not progress)
    with open(results_path, "a") as fh:
        def finish(rec: dict) -> None:
            fh.write(json.dumps(rec, default=str) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
            done[rec["key"]] = rec
            bar.update(1)
            bar.set_postfix_str(rec["label"])

        if cfg.jobs <= 1:
            for c in todo:
                finish(run_cell(c, cfg))
        else:
            import multiprocessing as mp

            with mp.get_context("spawn").Pool(cfg.jobs) as pool:
                for rec in pool.imap_unordered(_run_cell_star, [(c, cfg) for c in todo]):
                    finish(rec)
    bar.close()
    keys = {c.key for c in cfg.cells()}
    return [r for k, r in done.items() if k in keys]


def _run_cell_star(args: tuple[Cell, BenchConfig]) -> dict:
    return run_cell(*args)


def merge_results(dirs: Sequence[Path], out: Path) -> list[dict]:
    """Join the results.jsonl of shards into `out` (deduplicated by cell key, sorted)."""
    merged: dict[str, dict] = {}
    for d in dirs:
        if not (Path(d) / "results.jsonl").is_file():
            raise UsageError(f"{d}: no results.jsonl to merge")
        merged.update(read_results(Path(d) / "results.jsonl"))
    out.mkdir(parents=True, exist_ok=True)
    recs = [merged[k] for k in sorted(merged)]
    (out / "results.jsonl").write_text("".join(json.dumps(r, default=str) + "\n" for r in recs))
    return recs
