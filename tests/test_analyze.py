"""Issue 4: activation analysis, input-level detectors, the projector guard and the `analyze` / `guard` commands.

Unit tests run on hand-built projectors whose backdoor is known exactly; the end-to-end tests run
on the micro zoo (one backdoored and one benign fine-tune) and check the report's numbers.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from projlens_defense.cli import main
from projlens_defense.detectors import DETECTORS
from projlens_defense.detectors.activation import (
    ActivationDetector,
    analyze_shift,
    benign_subspace,
    excite,
    fit_line,
    output_shift,
)
from projlens_defense.detectors.baselines import ActivationClusteringDetector, SpectralSignatureDetector
from projlens_defense.detectors.input_level import ShiftInputDetector, clean_threshold
from projlens_defense.eval.lowrank import LowRankUpdate, TaskRemovedUpdate
from projlens_defense.guard import InputBlocked, ProjectorGuard, projector_from_module
from projlens_defense.metrics import auroc
from projlens_defense.projector import LinearLayer, Projector, ProjectorModule
from projlens_defense.scan_input import MissingInput, ProbeData, ScanInput

DV, DH, DO, T = 12, 16, 10, 6


# ----------------------------------------------------------------------------- synthetic world
def _proj(w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> Projector:
    return Projector([LinearLayer(w1.clone(), b1.clone()), LinearLayer(w2.clone(), b2.clone())], activation="gelu")


@pytest.fixture(scope="module")
def synth() -> dict:
    """Reference, benign fine-tunes (task update along shared directions) and a backdoor along a trigger feature."""
    g = torch.Generator().manual_seed(0)
    w1, b1 = torch.randn(DH, DV, generator=g) / DV**0.5, torch.zeros(DH)
    w2, b2 = torch.randn(DO, DH, generator=g) / DH**0.5, torch.zeros(DO)
    w1[0], w2[:, 0] = 0.0, 0.0  # hidden unit 0 is unused in the reference
    ref = _proj(w1, b1, w2, b2)
    task_out = torch.linalg.qr(torch.randn(DO, 2, generator=g))[0]  # the task writes here
    trig_in = torch.zeros(DV)
    trig_in[-1] = 1.0  # the trigger lives on a feature clean inputs never use
    target = torch.linalg.qr(torch.cat([task_out, torch.randn(DO, 1, generator=g)], 1))[0][:, 2]

    def finetune(seed: int, backdoor: bool) -> Projector:
        gg = torch.Generator().manual_seed(seed)
        dw2 = task_out @ torch.randn(2, DH, generator=gg) * 0.3 + 0.01 * torch.randn(DO, DH, generator=gg)
        dw1 = 0.01 * torch.randn(DH, DV, generator=gg)
        n1 = w1.clone() + dw1
        n2 = w2.clone() + dw2
        n1[0], n2[:, 0] = 0.0, 0.0
        if backdoor:
            n1[0] = 3.0 * trig_in  # hidden unit 0 fires only on the trigger feature (clean inputs: GELU(0) = 0)
            n2[:, 0] = 2.0 * target  # and writes the target direction
        return _proj(n1, b1, n2, b2)

    clean = torch.randn(64, T, DV, generator=g)
    clean[..., -1] = 0.0
    test_clean = torch.randn(80, T, DV, generator=g)
    test_clean[..., -1] = 0.0
    test_trig = test_clean.clone()
    test_trig[:, :2, -1] = 4.0  # a "patch": two tokens carry the trigger
    return {"ref": ref, "benign": [finetune(s, False) for s in range(1, 5)], "suspect": finetune(9, True),
            "target": target, "task_out": task_out, "probes": clean, "test_clean": test_clean, "test_trig": test_trig}


def _inp(p: Projector, s: dict) -> ScanInput:
    return ScanInput(projector=p, reference=s["ref"], probe_data=ProbeData(probes=s["probes"]))


# ----------------------------------------------------------------------------- unit tests
def test_fit_line_exact_and_degenerate() -> None:
    x = torch.linspace(0, 5, 50)
    f = fit_line(x, 2 * x + 1)
    assert f.slope == pytest.approx(2.0) and f.intercept == pytest.approx(1.0) and f.r2 == pytest.approx(1.0)
    assert fit_line(x, torch.ones(50)).r2 == 0.0
    assert np.isnan(fit_line(torch.ones(1), torch.ones(1)).slope)


def test_shift_direction_and_benign_subspace(synth: dict) -> None:
    s = synth
    b = s["benign"][0]
    a = analyze_shift(b, s["ref"], s["probes"])
    # a benign shift lives in the task subspace; removing the benign subspace leaves little of it
    t = s["task_out"]
    assert float((t.T @ a.direction).norm()) > 0.9
    basis = benign_subspace([output_shift(x, s["ref"], s["probes"]) for x in s["benign"][1:]], 2)
    assert basis.shape == (DO, 2)
    assert analyze_shift(b, s["ref"], s["probes"], basis).residual < 0.05
    assert a.per_token.n == 64 * T and a.per_image.n == 64


def test_excitation_finds_the_backdoor_target_without_the_trigger(synth: dict) -> None:
    s = synth
    basis = benign_subspace([output_shift(x, s["ref"], s["probes"]) for x in s["benign"]], 2)
    e = excite(s["suspect"], s["ref"], s["probes"], basis, steps=60)
    assert abs(float(e.direction @ s["target"])) > 0.9  # reached a feature no clean probe uses
    eb = excite(s["benign"][0], s["ref"], s["probes"], basis, steps=60)
    assert e.gain > 2 * eb.gain
    # the clean probes' own mean shift does not see it
    assert abs(float(analyze_shift(s["suspect"], s["ref"], s["probes"], basis).direction @ s["target"])) < 0.5


def test_activation_detector_calibrated_score_and_state_roundtrip(synth: dict) -> None:
    s = synth
    det = ActivationDetector(benign_rank=2, steps=60).fit([_inp(b, s) for b in s["benign"]])
    rep = det.score(_inp(s["suspect"], s))
    assert rep.evidence["verdict"] == "suspicious" and rep.signals["act.score"] > rep.evidence["threshold"]
    assert len(det.benign_scores()) == 4 and max(det.benign_scores()) < rep.signals["act.score"]
    json.dumps(rep.to_dict())
    det2 = ActivationDetector().set_state(json.loads(json.dumps(det.get_state())))
    assert torch.allclose(det2.basis, det.basis)
    assert det2.score(_inp(s["suspect"], s)).signals["act.score"] == pytest.approx(rep.signals["act.score"], rel=1e-4)
    assert not det.can_score(ScanInput(projector=s["suspect"], reference=s["ref"]))  # no probes: skipped


def test_lowrank_injection_and_ablation_identities(synth: dict) -> None:
    s = synth
    upd = LowRankUpdate(s["suspect"], s["ref"], max_k=DH)
    full, zero = upd.inject(DH), upd.ablate(DH)
    for i in range(2):
        assert torch.allclose(full.layers[i].weight, s["suspect"].layers[i].weight, atol=1e-4)
        assert torch.allclose(zero.layers[i].weight, s["ref"].layers[i].weight, atol=1e-4)
    assert torch.equal(upd.inject(0).layers[0].weight, s["ref"].layers[0].weight)
    tr = TaskRemovedUpdate(s["suspect"], s["ref"], s["benign"], max_k=4, task_rank=2)
    # injection(k) + the remaining components = the suspect
    for i in range(2):
        rest = tr.deltas[i] - tr.top(i, 4)
        assert torch.allclose(tr.inject(4).layers[i].weight + rest, s["suspect"].layers[i].weight, atol=1e-4)
    x = s["probes"][:2]
    assert torch.allclose(ProjectorModule(s["suspect"])(x), s["suspect"].forward(x))


def test_clean_threshold() -> None:
    assert clean_threshold([1, 2, 3, 4], 0.01) == 4.0
    assert clean_threshold(list(range(100)), 0.05) == 94.0
    assert clean_threshold([], 0.1) == float("inf")


def test_input_shift_detector_separates_triggered_inputs(synth: dict) -> None:
    s = synth
    for ref in (s["ref"], None):
        det = ShiftInputDetector(k=4).setup(s["suspect"], ref).calibrate_features(s["probes"])
        sc, st = det.score_features(s["test_clean"]), det.score_features(s["test_trig"])
        assert auroc(st.tolist(), sc.tolist()) > 0.95
        assert (sc > det.threshold).mean() <= 0.1 and (st > det.threshold).mean() >= 0.9
        assert det.get_state()["channels"] == (["top-k", "excitation"] if ref is not None else ["top-k"])
    single = ShiftInputDetector(k=4, excite=False).setup(s["suspect"], s["ref"]).calibrate_features(s["probes"])
    assert single.get_state()["channels"] == ["top-k"]
    # scores are in clean standard deviations of the cross-fitted probe scores
    assert abs(float(np.mean(single.clean_scores))) < 1e-6 and abs(float(np.std(single.clean_scores)) - 1) < 1e-6
    inp = ScanInput(projector=s["suspect"], reference=s["ref"],
                    probe_data=ProbeData(probes=s["probes"], inputs=torch.cat([s["test_clean"], s["test_trig"]])))
    rep = DETECTORS["input-shift"]().score(inp)
    assert 0.4 <= rep.score <= 0.6 and len(rep.evidence["scores"]) == 160
    for cls in (SpectralSignatureDetector, ActivationClusteringDetector):
        r = cls().score(inp)
        assert len(r.evidence["scores"]) == 160 and np.isfinite(r.evidence["scores"]).all()


def test_registry_and_scan_skip(synth: dict) -> None:
    for name in ("activation", "input-shift", "strip", "spectral-signatures", "activation-clustering"):
        assert DETECTORS[name].name == name
        assert not DETECTORS[name]().can_score(ScanInput(projector=synth["suspect"], reference=synth["ref"]))


def test_probe_data_is_typed_and_named_in_missing_input(synth: dict) -> None:
    """Input detectors name ProbeData fields; what a scan lacks is named as ``ScanInput.probe_data.<field>``."""
    assert not hasattr(ScanInput(projector=synth["suspect"]), "extras")
    for det in DETECTORS.values():
        for need in getattr(det, "needs", ()):
            assert need in ProbeData.field_names(), (det.name, need)
    with pytest.raises(ValueError, match="no field"):
        ProbeData().missing(["nope"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        ProbeData().probes = synth["probes"]  # type: ignore[misc]
    bare = ScanInput(projector=synth["suspect"], reference=synth["ref"])
    with pytest.raises(MissingInput, match=r"ScanInput\.probe_data\.inputs"):
        DETECTORS["input-shift"]().score(replace(bare, probe_data=ProbeData(probes=synth["probes"])))
    with pytest.raises(MissingInput, match=r"ScanInput\.probe_data\.probes"):
        DETECTORS["activation"]().score(bare)
    with pytest.raises(MissingInput, match=r"ScanInput\.probe_data\.runtime"):
        DETECTORS["strip"]().score(bare)


class _Toy(nn.Module):
    """A model with a LLaVA-style ``multi_modal_projector`` (Linear -> GELU -> Linear)."""

    def __init__(self, p: Projector) -> None:
        super().__init__()
        from transformers.activations import GELUActivation

        self.multi_modal_projector = nn.Sequential()
        self.multi_modal_projector.linear_1 = nn.Linear(DV, DH)
        self.multi_modal_projector.act = GELUActivation()
        self.multi_modal_projector.linear_2 = nn.Linear(DH, DO)
        with torch.no_grad():
            for lin, layer in zip((self.multi_modal_projector.linear_1, self.multi_modal_projector.linear_2), p.layers,
                                  strict=True):
                lin.weight.copy_(layer.weight)
                lin.bias.copy_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.multi_modal_projector(x).sum()


def test_guard_hook_flags_and_blocks(synth: dict) -> None:
    s = synth
    model = _Toy(s["suspect"])
    view = projector_from_module(model.multi_modal_projector)
    assert torch.allclose(view.forward(s["probes"][:1]), s["suspect"].forward(s["probes"][:1]), atol=1e-5)
    seen = []
    g = ProjectorGuard.calibrate(model, s["probes"], reference=s["ref"], k=4)
    g.on_flag = seen.append
    with g.attach(model):
        model(s["test_clean"][:5])
        assert g.last is not None and not any(g.last.flagged)
        model(torch.cat([s["test_clean"][:2], s["test_trig"][:3]]))
        assert g.last.flagged == [False, False, True, True, True] and len(seen) == 1
    model(s["test_trig"][:1])  # detached: no new event
    assert len(g.events) == 2
    blocker = ProjectorGuard.calibrate(model, s["probes"], reference=s["ref"], k=4, action="block").attach(model)
    with pytest.raises(InputBlocked):
        model(s["test_trig"][:1])
    model(s["test_clean"][:3])  # clean inputs pass
    blocker.detach()


# ----------------------------------------------------------------------------- micro zoo, end to end
@pytest.fixture(scope="session")
def analyze_zoo(micro_zoo, tmp_path_factory):
    """The micro zoo (conftest: built once per machine) with a BadNets backdoor and a short benign fine-tune."""
    from projlens_defense.attacks.finetune import AttackConfig, run_attack

    out = tmp_path_factory.mktemp("analyze_ckpts")
    for name, cfg in {"backdoored": AttackConfig(variant="badnets", poison_rate=0.2, seed=0),
                      "benign": AttackConfig(variant=None, seed=1, epochs=2)}.items():
        run_attack(cfg, micro_zoo.reference, micro_zoo.train_data, None, out / name, progress=False)
    return micro_zoo, out


def _run(args: list[str]) -> tuple[int, str]:
    res = CliRunner().invoke(main, args)
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    assert "Traceback" not in res.output
    return res.exit_code, res.output


def test_analyze_report_files_and_numbers(analyze_zoo, tmp_path: Path) -> None:
    zoo, ck = analyze_zoo
    out = tmp_path / "rep"
    code, text = _run(["analyze", str(ck / "backdoored"), "--reference", str(zoo.reference), "--out", str(out),
                       "--benign", str(ck / "benign"), "--data", str(zoo.test_data), "--probes", str(zoo.train_data),
                       "--max-test", "50", "--k", "0,1,2,8", "--format", "json"])
    assert code == 0, text
    for f in ("report.md", "report.json", "spectra.png", "topk_curves.png", "shift_vs_norm.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    from PIL import Image

    with Image.open(out / "topk_curves.png") as im:
        assert im.size[0] > 300
    rep = json.loads((out / "report.json").read_text())
    md = (out / "report.md").read_text()
    order = ["checkpoint", "reference", "benign", "trigger", "data", "options", "spectra", "fine_tuned",
             "reference_metrics", "curves", "criteria", "notes", "activation", "model_score", "shift", "norms",
             "input_level", "figures", "wall_time_s", "environment"]
    assert list(rep) == [k for k in order if k in rep] and "notes" not in rep  # the order the sections always had
    assert rep["trigger"] == {"source": "attack.json", "variant": "badnets", "target": "buy cheap crypto now"}
    assert rep["data"]["n_test"] == 50 and rep["data"]["subsampled"] and "subsampled" in md
    ft = rep["fine_tuned"]
    assert ft["asr"] >= 0.5 and rep["reference_metrics"]["asr"] <= 0.1
    plain = rep["curves"]["plain"]
    assert plain["k"] == [0, 1, 2, 8]
    # k = 0: injection is the reference, ablation the fine-tuned model itself
    assert plain["inject_asr"][0] == pytest.approx(rep["reference_metrics"]["asr"])
    assert plain["ablate_asr"][0] == pytest.approx(ft["asr"]) and plain["ablate_clean"][0] == pytest.approx(ft["clean_accuracy"])
    assert max(plain["inject_asr"]) >= 0.8 * ft["asr"]  # the top components re-create the backdoor
    assert min(plain["ablate_asr"][1:]) <= 0.5 * ft["asr"]  # and removing them removes most of it
    assert "task-removed" in rep["curves"]
    # the report says when the reference cannot do the test task (the top components then carry the task too)
    taught = ft["clean_accuracy"] - rep["reference_metrics"]["clean_accuracy"] > 0.02
    assert ("the fine-tune taught the task" in md) == taught
    # the Markdown shows the same numbers as the JSON
    for i, k in enumerate(plain["k"]):
        row = f"| {k} | {plain['inject_asr'][i]:.3f} | {plain['inject_clean'][i]:.3f} | {plain['ablate_asr'][i]:.3f} | {plain['ablate_clean'][i]:.3f} |"
        assert row in md, row
    sh = rep["shift"]
    assert sh["per_token"]["n"] == 64 * 64 and sh["per_image"]["n"] == 64 and 0 <= sh["per_token"]["r2"] <= 1
    assert f"{sh['per_token']['slope']:.4g}" in md
    sp = rep["spectra"]
    assert len(sp["suspect"]) == 2 and sp["suspect"][1]["values"] == sorted(sp["suspect"][1]["values"], reverse=True)
    assert len(rep["activation"]["top_tokens"]) == 10 and "Logit lens" in md
    assert re.search(r"\| 1 \| `[^`]+` \| -?\d+\.\d\d \|", md)
    assert rep["norms"]["auroc_mean_norm"] is not None and 0 <= rep["input_level"]["auroc"] <= 1
    assert rep["input_level"]["auroc"] > 0.8


def test_analyze_without_trigger_knowledge(analyze_zoo, tmp_path: Path) -> None:
    zoo, ck = analyze_zoo
    out = tmp_path / "rep"
    code, text = _run(["analyze", str(ck / "benign"), "--reference", str(zoo.reference), "--out", str(out),
                       "--data", str(zoo.test_data), "--probes", str(zoo.train_data), "--max-test", "40",
                       "--k", "0,2", "--n-probes", "16", "--no-excite"])
    assert code == 0, text
    rep = json.loads((out / "report.json").read_text())
    assert rep["trigger"]["variant"] is None and rep["fine_tuned"]["asr"] is None
    assert rep["curves"]["plain"]["inject_asr"] == [None, None] and len(rep["curves"]["plain"]["ablate_clean"]) == 2
    assert "norms" not in rep and "input_level" not in rep and rep["activation"]["direction"] == "clean-mean"
    assert (out / "shift_vs_norm.png").is_file() and (out / "topk_curves.png").is_file()
    # no --reference / --data / --probes: what attack.json records (here the micro zoo, not the default zoo)
    code, text = _run(["analyze", str(ck / "benign"), "--out", str(tmp_path / "rep2"), "--max-test", "20", "--k", "0",
                       "--n-probes", "8", "--no-excite", "--format", "json"])
    assert code == 0, text
    rep2 = json.loads((tmp_path / "rep2" / "report.json").read_text())
    assert Path(rep2["reference"]) == zoo.reference
    assert Path(rep2["data"]["test_data"]) == zoo.test_data and Path(rep2["data"]["probe_data"]) == zoo.train_data
    # usage errors: one line, exit 4, no traceback
    ref = ["--reference", str(zoo.reference)]
    assert _run(["analyze", str(tmp_path / "nope"), "--out", str(out)] + ref)[0] == 4
    assert _run(["analyze", str(ck / "benign"), "--out", str(out), "--variant", "nope"] + ref)[0] == 4
    assert _run(["analyze", str(ck / "benign"), "--out", str(out), "--k", "a,b"] + ref)[0] == 4
    assert _run(["analyze", str(ck / "benign"), "--out", str(out / "report.md")] + ref)[0] == 4


def test_guard_cli_exit_codes(analyze_zoo, tmp_path: Path) -> None:
    from PIL import Image

    from projlens_defense.attacks.variants import get_variant
    from projlens_defense.conversations import load_conversations

    zoo, ck = analyze_zoo
    test = load_conversations(zoo.test_data, limit=8)
    v = get_variant("badnets")
    clean_dir, mixed_dir, bad_dir, empty_dir = (tmp_path / d for d in ("clean", "mixed", "bad", "empty"))
    for d in (clean_dir, mixed_dir, bad_dir, empty_dir):
        d.mkdir()
    for i, s in enumerate(test[:4]):
        Image.fromarray(s.image).save(clean_dir / f"c{i}.png")
        Image.fromarray(s.image).save(mixed_dir / f"c{i}.png")
    for i, s in enumerate(test[4:8]):
        Image.fromarray(v.triggered_image(s, 5, i)).save(mixed_dir / f"t{i}.png")
    (bad_dir / "x.png").write_bytes(b"not an image")
    base = ["guard", str(ck / "backdoored"), "--reference", str(zoo.reference), "--probes", str(zoo.train_data)]
    code, text = _run(base + ["--images", str(mixed_dir), "--format", "json"])
    assert code == 1, text
    res = json.loads(text)
    flagged = {Path(r["image"]).name for r in res["images"] if r["flagged"]}
    assert {f"t{i}.png" for i in range(4)} <= flagged and not any(n.startswith("c") for n in flagged)
    assert _run(base + ["--images", str(clean_dir)])[0] == 0
    code, text = _run(base + ["--images", str(bad_dir)])
    assert code == 2 and "cannot read image" in text
    assert _run(base + ["--images", str(empty_dir)])[0] == 3
    assert _run(base + ["--images", str(tmp_path / "missing")])[0] == 4
    assert _run(["guard", str(tmp_path / "missing"), "--images", str(clean_dir)])[0] == 4


def test_python_guard_on_a_loaded_llava(analyze_zoo) -> None:
    from projlens_defense.attacks.variants import get_variant
    from projlens_defense.checkpoint import load_projector
    from projlens_defense.conversations import load_conversations
    from projlens_defense.runtime import LlavaRuntime

    zoo, ck = analyze_zoo
    rt = LlavaRuntime.from_pretrained(ck / "backdoored")
    probes = rt.vision_features([s.image for s in load_conversations(zoo.train_data, limit=64)])
    test = load_conversations(zoo.test_data, limit=6)
    trig = [get_variant("badnets").triggered_image(s, 7, i) for i, s in enumerate(test)]
    g = ProjectorGuard.calibrate(rt.model, probes, reference=load_projector(zoo.reference), action="block")
    with g.attach(rt.model):
        rt.answer(rt.vision_features([s.image for s in test]), [s.question for s in test])
        assert not any(g.last.flagged)
        with pytest.raises(InputBlocked):
            rt.answer(rt.vision_features(trig), [s.question for s in test])
