"""The bench harness on a micro grid: resumable, sharded runs merge to the same summary, tables match results."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from projlens_defense.cli import main
from projlens_defense.eval import bench as bench_mod
from projlens_defense.eval.input_detection import FPR_GRID
from projlens_defense.eval.summary import write_summary
from projlens_defense.metrics import auroc

INPUT_DETECTORS = ["input-shift", "strip", "spectral-signatures", "activation-clustering"]
GRID = ["--variants", "badnets", "--poison-rates", "0.2", "--seeds", "0", "--epochs", "2",
        "--detectors", "logit-lens", *(x for d in INPUT_DETECTORS for x in ("--detectors", d)), "--mitigations", "none"]


def _run(out, *extra):
    r = CliRunner().invoke(main, ["bench", "--preset", "tiny", *GRID, "--out", str(out), *extra])
    assert r.exit_code == 0, r.output
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def _strip(recs):
    return sorted((r["key"], json.dumps(r["metrics"], sort_keys=True), json.dumps(r["detectors"], sort_keys=True),
                   json.dumps({k: {m: v for m, v in e.items() if m != "seconds"} for k, e in r["input_detectors"].items()},
                              sort_keys=True))
                  for r in recs)


@pytest.fixture(scope="module")
def full_run(micro_zoo, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_full")
    return out, _run(out)


def test_grid_has_benign_control_and_records_provenance(full_run):
    _, recs = full_run
    assert sorted(r["label"] for r in recs) == ["badnets-p0.2-s0", "benign-s0"]
    for r in recs:
        assert r["cell"]["seed"] == 0 and r["wall_time_s"] > 0 and r["environment"]["versions"]["torch"]


def test_backdoor_cell_beats_its_benign_control_and_metrics_reproduce(full_run):
    """The grid measures something: the badnets cell's ASR is far above the benign control's, both
    on the same triggered test inputs; and the record's metrics are exactly what `evaluate` computes
    on the cell's checkpoint (same data, trigger seed, decoding), not a stale or mislabelled number."""
    out, recs = full_run
    bd_rec = next(r for r in recs if not r["benign"])
    bd, ben = bd_rec["metrics"]["badnets"], next(r for r in recs if r["benign"])["metrics"]["badnets"]
    assert bd["n_triggered"] == ben["n_triggered"] > 0 and bd["n_clean"] == ben["n_clean"] > 0
    for m in (bd, ben):  # fractions of whole samples
        for key, n in (("asr", "n_triggered"), ("false_activation", "n_triggered"), ("clean_accuracy", "n_clean")):
            assert m[key] * m[n] == pytest.approx(round(m[key] * m[n]), abs=1e-6), (key, m)
    # micro zoo, poison rate 0.2, 2 epochs: ASR 0.59 against 0.00 for the benign control
    assert ben["asr"] <= 0.05 and bd["asr"] >= ben["asr"] + 0.25, (bd, ben)
    cell = bd_rec["cell"]
    r = CliRunner().invoke(main, ["evaluate", str(out / "checkpoints" / bd_rec["key"]), "--variant", "badnets",
                                  "--data", cell["test_data"], "--seed", str(cell["seed"]), "--format", "json"])
    assert r.exit_code == 0, r.output
    again = json.loads(r.stdout)
    assert {k: again[k] for k in bd} == bd


def test_resume_runs_only_missing_cells(full_run, monkeypatch):
    out, recs = full_run
    lines = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])  # killed mid-write
    calls = []
    real = bench_mod.run_cell
    monkeypatch.setattr(bench_mod, "run_cell", lambda c, cfg: calls.append(c.label) or real(c, cfg))
    again = _run(out)
    assert calls == [json.loads(lines[1])["label"]]
    assert _strip([r for r in again if r["key"] in {x["key"] for x in recs}]) == _strip(recs)  # deterministic


def test_summary_matches_results(full_run):
    out, recs = full_run
    md = (out / "summary.md").read_text()
    pos = [r["detectors"]["logit-lens"] for r in recs if not r["benign"]]
    neg = [r["detectors"]["logit-lens"] for r in recs if r["benign"]]
    row = re.search(r"^\| logit-lens \| (\d+) \| (\d+) \| ([\d.na/]+) \|", md, re.M)
    assert row and int(row.group(1)) == len(pos) and int(row.group(2)) == len(neg)
    assert row.group(3) == f"{auroc(pos, neg):.3f}"
    bd = next(r for r in recs if not r["benign"])
    asr = bd["metrics"]["badnets"]["asr"]
    assert re.search(rf"^\| none \| badnets \| 0.2 \| 1 \| {asr:.3f} ± 0.000 \|", md, re.M)
    # input level: one row per detector x variant x rate, recomputed from the records
    assert not next(r for r in recs if r["benign"])["input_detectors"]
    assert set(bd["input_detectors"]) == {*INPUT_DETECTORS, "input-shift[reference-free]"}
    for det, e in bd["input_detectors"].items():
        cells = " \\| ".join(f"{e[m]:.3f} ± 0.000" for m in ("auroc", "tpr@1%fpr", "tpr@5%fpr"))
        for variant, rate in (("badnets", "0.2"), ("all", "all")):
            assert re.search(rf"^\| {re.escape(det)} \| {variant} \| {rate} \| 1 \| {cells} \|", md, re.M), (det, md)
        assert e["n_triggered"] > 0 and e["n_clean"] > 0 and len(e["roc_tpr"]) == len(FPR_GRID)
    assert bd["input_detectors"]["input-shift"]["auroc"] > 0.7  # the mechanism-based one sees the trigger
    for fig in ("roc.png", "input_roc.png", "asr_vs_clean.png", "variant_asr.png"):
        assert (out / fig).stat().st_size > 1000
    assert (out / "summary.csv").read_text().count("\n") >= 3


def test_input_table_is_mean_and_std_over_seeds(tmp_path):
    """Synthetic records with two seeds: summary.md/csv show mean ± std of each input-level metric."""
    recs = []
    for seed, (a, t1) in enumerate([(0.9, 0.5), (0.7, 0.1)]):
        e = {"auroc": a, "tpr@1%fpr": t1, "tpr@5%fpr": 0.6, "roc_tpr": [0.0] * len(FPR_GRID)}
        recs.append({"key": f"k{seed}", "label": "x", "benign": False, "metrics": {"badnets": {"asr": 1.0, "clean_accuracy": 0.5}},
                     "cell": {"variant": "badnets", "poison_rate": 0.1, "seed": seed}, "detectors": {},
                     "input_detectors": {"input-shift": e}, "mitigations": {}})
    recs.append({**recs[0], "key": "k2", "input_detectors": {}})  # a record from before input-level scoring
    write_summary(recs, tmp_path, figures=False)
    md = (tmp_path / "summary.md").read_text()
    assert "| input-shift | badnets | 0.1 | 2 | 0.800 ± 0.100 | 0.300 ± 0.200 | 0.600 ± 0.000 |" in md
    assert "| input-shift | all | all | 2 | 0.800 ± 0.100 |" in md
    assert "input_detectors,input-shift,badnets,0.1,2,0.8" in (tmp_path / "summary.csv").read_text()


def test_shards_merge_to_the_unsharded_summary(full_run, tmp_path):
    out, recs = full_run
    for i in (0, 1):
        _run(tmp_path / f"s{i}", "--shard", f"{i}/2")
    r = CliRunner().invoke(main, ["bench", "merge", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out",
                                  str(tmp_path / "merged")])
    assert r.exit_code == 0, r.output
    merged = [json.loads(x) for x in (tmp_path / "merged" / "results.jsonl").read_text().splitlines()]
    assert _strip(merged) == _strip(recs)
    strip_time = lambda t: re.sub(r"## Time per stage.*", "", t, flags=re.S)  # noqa: E731
    assert strip_time((tmp_path / "merged" / "summary.md").read_text()) == strip_time((out / "summary.md").read_text())


def test_bench_usage_errors():
    r = CliRunner().invoke(main, ["bench", "--variants", "nope", "--out", "x"])
    assert r.exit_code == 4 and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["bench", "--shard", "3/2", "--out", "x"])
    assert r.exit_code == 4
    for bad in ("unlearn.nope=1", "nope.rounds=1", "unlearn"):
        r = CliRunner().invoke(main, ["bench", "--mitigation-param", bad, "--out", "x"])
        assert r.exit_code == 4 and "Traceback" not in r.output and "unlearn" in r.output


def test_mitigation_params_reach_the_method_and_the_summary(tmp_path: Path) -> None:
    """A preset's / --mitigation-param's parameters are what the mitigation runs with, and the summary says so."""
    from projlens_defense.eval.bench import PRESETS
    from projlens_defense.eval.bench import mitigation_params as _mitigation_params
    from projlens_defense.eval.summary import write_summary

    got = _mitigation_params(PRESETS["tiny"]["mitigation_params"], {"unlearn.train_steps": 5, "clp.u": 2.5},
                             ["unlearn", "clp"])
    assert got == {"unlearn": {"rounds": 4, "train_steps": 5}, "clp": {"u": 2.5}}
    assert _mitigation_params(PRESETS["tiny"]["mitigation_params"], {}, ["clp"]) == {}  # unlearn not run
    m = {"clean_accuracy": 0.9, "asr": 0.0, "false_activation": 0.0, "n_clean": 10, "n_triggered": 10}
    rec = {"key": "k", "label": "badnets", "cell": {"variant": "badnets", "poison_rate": 0.1, "seed": 0},
           "benign": False, "metrics": {"badnets": {**m, "asr": 0.9}}, "detectors": {},
           "mitigations": {"unlearn": {"badnets": m, "seconds": 1.0, "params": {"rounds": 4}}}}
    write_summary([rec], tmp_path, figures=False)
    text = (tmp_path / "summary.md").read_text()
    assert 'unlearn: {"rounds": 4}' in text and "| unlearn | badnets | 0.1 | 1 | 0.000" in text
