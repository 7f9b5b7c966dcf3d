"""The population preset's grid and its leave-one-family-out tables."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from projlens_defense.attacks.variants import (
    ADAPTIVE_VARIANTS,
    CLASSIC_VARIANTS,
    NEW_FAMILY_VARIANTS,
    PROJLENS_VARIANTS,
)
from projlens_defense.eval.bench import POPULATION_VARIANTS, PRESETS, RECIPE_SPREAD, BenchConfig
from projlens_defense.eval.population import population_tables, write_population_summary


def _config(tmp_path: Path) -> BenchConfig:
    p = PRESETS["population"]
    return BenchConfig(variants=p["variants"], poison_rates=p["poison_rates"], seeds=p["seeds"], detectors=["spectral"],
                       mitigations=[], model="m", train_data="t", test_data="e", out=tmp_path,
                       benign_seeds=p["benign_seeds"], recipe_spread=True, eval_benign_variants=False)


def test_the_population_families_are_the_registry_groups():
    # spelled out in eval/bench.py so that importing the presets (the CLI does at start-up) does not load torch
    assert POPULATION_VARIANTS == PROJLENS_VARIANTS + CLASSIC_VARIANTS + NEW_FAMILY_VARIANTS + ADAPTIVE_VARIANTS


def test_the_population_grid_has_210_cells_with_a_spread_recipe(tmp_path):
    cells = _config(tmp_path).cells()
    assert len(cells) == 210 and sum(c.variant is None for c in cells) == 60
    assert len({c.key for c in cells}) == 210
    pairs = {(round(c.lr / 5e-3, 3), round(c.epochs / 20.0, 3)) for c in cells}
    assert pairs == set(RECIPE_SPREAD)  # every lr / epochs combination is drawn, benign and backdoored alike
    benign_pairs = {(round(c.lr / 5e-3, 3), round(c.epochs / 20.0, 3)) for c in cells if c.variant is None}
    assert len(benign_pairs) >= 7
    shards = [BenchConfig(**{**_config(tmp_path).__dict__, "shard": (i, 3)}).cells() for i in (0, 1, 2)]
    assert [len(s) for s in shards] == [70, 70, 70] and {c.key for s in shards for c in s} == {c.key for c in cells}


def _record(key: str, variant: str | None, top1: float, norm: float, verdict: str) -> dict:
    return {"key": key, "benign": variant is None, "cell": {"variant": variant},
            "metrics": {variant: {"asr": 1.0 if variant == "fam-a" else 0.9}} if variant else {},
            "detectors": {"scan[reference]": top1, "scan[reference-free]": 0.0, "spectral": top1,
                          "verdict[reference]": verdict, "verdict[reference-free]": "inconclusive"},
            "weight_features": {f"linear_2.{k}": v for k, v in {"fro_norm": norm, "top1_energy": top1,
                                                                 "top5_energy": top1, "stable_rank": 1 / top1,
                                                                 "gap12": 2.0, "effective_rank": 3.0}.items()}}


def test_leave_one_family_out_shows_what_a_supervised_detector_cannot_know(tmp_path):
    rng = np.random.default_rng(0)
    recs = [_record(f"b{i}", None, 0.3 + 0.02 * rng.standard_normal(), 1.0 + 0.05 * rng.standard_normal(), "clean")
            for i in range(40)]
    # family A: spiky spectrum, normal norm; family B: flat spectrum, big norm (what A taught is no help)
    recs += [_record(f"a{i}", "fam-a", 0.8 + 0.02 * rng.standard_normal(), 1.0 + 0.05 * rng.standard_normal(),
                     "suspicious") for i in range(20)]
    recs += [_record(f"z{i}", "fam-b", 0.3 + 0.02 * rng.standard_normal(), 3.0 + 0.05 * rng.standard_normal(),
                     "clean" if i % 2 else "suspicious") for i in range(20)]
    t = population_tables(recs)
    assert t["n_backdoored"] == 40 and t["n_benign"] == 40
    seen = t["per_family"]["fam-b"]["supervised spectral LR (all families seen)"]["auroc"]
    held = t["per_family"]["fam-b"]["supervised spectral LR (leave-one-family-out)"]["auroc"]
    assert seen > 0.95 and held < 0.8  # trained on A only, the detector reads B's spectrum as benign
    assert t["per_family"]["fam-a"]["top-1 energy share"]["auroc"] == 1.0
    assert t["per_family"]["fam-b"]["dW Frobenius norm"]["auroc"] == 1.0
    v = t["verdicts"]["reference"]
    assert v["tpr_at_threshold"] == 0.75 and v["fpr_at_threshold"] == 0.0 and v["per_family_tpr"]["fam-b"] == 0.5
    write_population_summary(recs, tmp_path)
    text = (tmp_path / "population.md").read_text()
    fam_a = next(line for line in text.splitlines() if line.startswith("| fam-a |"))
    assert "| 1.000 / 1.000 / 1.000 |" in fam_a  # top-1 energy on family A: AUROC / TPR@1%FPR / TPR@5%FPR
    assert "| fam-b | 0.900 |" in text and "TPR 0.750 (effective backdoors 0.750, 10 of them called clean), FPR 0.000" in text


def test_population_shards_joined_by_bench_merge_get_the_population_tables(tmp_path):
    import json

    from projlens_defense.api import bench_merge

    rng = np.random.default_rng(1)
    recs = [_record(f"b{i}", None, 0.3 + 0.02 * rng.standard_normal(), 1.0, "clean") for i in range(10)]
    recs += [_record(f"a{i}", "fam-a", 0.8 + 0.02 * rng.standard_normal(), 1.0, "suspicious") for i in range(10)]
    for i, r in enumerate(recs):
        r["cell"].update(seed=i, poison_rate=0.0 if r["benign"] else 0.1, lr=5e-3)  # its own recipe, as in the preset
        r["metrics"] = {"fam-a": {"asr": 0.0 if r["benign"] else 1.0, "clean_accuracy": 0.9}}
        r["mitigations"] = {}  # detection only, as in the preset
    for i, part in enumerate((recs[::2], recs[1::2])):
        (tmp_path / f"s{i}").mkdir()
        (tmp_path / f"s{i}" / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    merged = bench_merge([tmp_path / "s0", tmp_path / "s1"], tmp_path / "merged")
    assert len(merged) == 20
    text = (tmp_path / "merged" / "population.md").read_text()
    assert "| fam-a | 1.000 |" in text and "(10 backdoored, 10 benign fine-tunes" in text
    # a grid without a per-cell recipe (tiny / full presets) gets the general summary only
    for r in recs:
        r["cell"]["lr"] = None
    (tmp_path / "s0" / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    bench_merge([tmp_path / "s0"], tmp_path / "plain")
    assert (tmp_path / "plain" / "summary.md").is_file() and not (tmp_path / "plain" / "population.md").exists()
