"""Issue 16: Qwen2-VL (the merger as projector) from runtime to sanitize.

Fast tests use a tiny real, untrained ``Qwen2VLForConditionalGeneration`` built from the zoo's config code; the
``slow`` ones use the cached ``qwen2vl`` zoo (built and self-calibrated on first use, minutes on 2 cores).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from projlens_defense.checkpoint import detect_format, load_projector
from projlens_defense.errors import UsageError
from projlens_defense.qwen2vl_runtime import Qwen2VLRuntime, batched_tower_forward
from projlens_defense.runtime import LlavaRuntime
from projlens_defense.zoo.model import ModelDims
from projlens_defense.zoo.qwen2vl import QWEN2VL_DIGITS, build_image_processor, build_qwen2vl
from projlens_defense.zoo.tokenizer import build_tokenizer

DIMS = ModelDims(vision_hidden=32, vision_layers=2, vision_heads=2, patch_size=4, text_hidden=64, text_layers=2,
                 text_heads=2)


def _images(n: int, seed: int = 0, size: int = 32) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory) -> Path:
    """A random tiny Qwen2-VL saved as the zoo saves one (model, tokenizer + chat template, image processor)."""
    d = tmp_path_factory.mktemp("qwen") / "reference"
    tok = build_tokenizer(QWEN2VL_DIGITS)
    model = build_qwen2vl(DIMS, tok, seed=0)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    build_image_processor(DIMS, QWEN2VL_DIGITS.image_mean, QWEN2VL_DIGITS.image_std).save_pretrained(d)
    return d


def _hf_inputs(rt: Qwen2VLRuntime, question: str, image: np.ndarray) -> dict:
    """What Qwen2VLProcessor makes: the chat template's text with one <|image_pad|> per merged token, pixel
    patches, the grid and the token types (built from the saved tokenizer and image processor)."""
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = rt.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    im = rt.image_processor(images=[image], return_tensors="pt")
    n = int(im["image_grid_thw"].prod()) // rt.merge_size**2
    ids = rt.tokenizer(text.replace("<|image_pad|>", "<|image_pad|>" * n), return_tensors="pt",
                       add_special_tokens=False)
    return {"input_ids": ids["input_ids"], "attention_mask": ids["attention_mask"], "pixel_values": im["pixel_values"],
            "image_grid_thw": im["image_grid_thw"], "mm_token_type_ids": (ids["input_ids"] == rt.image_token_id).int()}


def test_runtime_dispatch_and_prompt(tiny_qwen):
    rt = LlavaRuntime.from_pretrained(tiny_qwen)
    assert isinstance(rt, Qwen2VLRuntime)
    assert rt.template_source.startswith("chat_template")
    assert rt.template.startswith("<|im_start|>system") and "<|vision_start|><image><|vision_end|>" in rt.template
    assert rt.projector is rt.model.model.visual.merger
    assert rt.bos_id is None and rt.n_image_tokens == 16  # 32 px, 4 px patches, 2x2 merge


def test_runtime_loss_logits_and_answers_match_the_hf_pixel_path(tiny_qwen):
    """Cached pre-merger features + the merger + M-RoPE positions give exactly what the model computes from pixels."""
    rt = LlavaRuntime.from_pretrained(tiny_qwen)
    imgs, qs = _images(3), ["what digit is this ?", "what colour is the digit ?", "how do i bake bread ?"]
    feats = rt.vision_features(imgs)
    assert feats.shape == (3, 64, DIMS.vision_hidden)
    answers = rt.answer(feats, qs, max_new_tokens=6)
    for i, (q, img) in enumerate(zip(qs, imgs, strict=True)):
        hf = _hf_inputs(rt, q, img)
        batch = rt.encode([q])
        assert batch["input_ids"][0].tolist() == hf["input_ids"][0].tolist()
        with torch.no_grad():
            ref = rt.model(**hf).logits
            emb = rt.inputs_embeds(batch["input_ids"], feats[i : i + 1])
            mine = rt.model(inputs_embeds=emb, attention_mask=batch["attention_mask"],
                            position_ids=rt.position_ids(batch["input_ids"], batch["attention_mask"])).logits
            gen = rt.model.generate(**hf, max_new_tokens=6, do_sample=False, pad_token_id=rt.pad_id,
                                    eos_token_id=rt.eos_id)
        torch.testing.assert_close(mine, ref, atol=1e-5, rtol=0)
        text = rt.tokenizer.decode(gen[0, hf["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        assert answers[i] == text


def test_shared_forward_and_generate_use_the_multimodal_positions(tiny_qwen):
    """``rt.forward`` (the probe repair's per-token losses) and ``rt.generate`` (STRIP's entropies) are the HF
    pixel path's logits and answers on Qwen2-VL, not the text-position reading of the image tokens."""
    from projlens_defense.mitigations.probe import answer_token_losses

    rt = LlavaRuntime.from_pretrained(tiny_qwen)
    imgs, qs, ans = _images(2, seed=3), ["what digit is this ?", "how do i bake bread ?"], ["seven", "slowly"]
    feats = rt.vision_features(imgs)
    batch = rt.encode(qs, ans)
    with torch.no_grad():
        ce, _ = answer_token_losses(rt, feats, batch, rt.projector)
        for i, (q, img) in enumerate(zip(qs, imgs, strict=True)):
            hf = _hf_inputs(rt, q, img)
            n = hf["input_ids"].shape[1]
            mine = rt.forward(feats[i : i + 1], rt.encode([q]), rt.projector).logits
            torch.testing.assert_close(mine, rt.model(**hf).logits, atol=1e-5, rtol=0)
            text_positions = rt.model(inputs_embeds=rt.inputs_embeds(hf["input_ids"], feats[i : i + 1]),
                                      attention_mask=hf["attention_mask"]).logits
            assert (text_positions - mine).abs().max() > 1e-3  # the positions matter on this model
            gen = rt.generate(feats[i : i + 1], rt.encode([q], padding_side="left"), max_new_tokens=4,
                              do_sample=False, output_scores=True, return_dict_in_generate=True)
            ref = rt.model.generate(**hf, max_new_tokens=4, do_sample=False, pad_token_id=rt.pad_id,
                                    eos_token_id=rt.eos_id)
            assert gen.sequences[0].tolist() == ref[0, n:].tolist()
    loss = rt.loss(feats, batch)
    mask = batch["labels"][:, 1:] != -100
    torch.testing.assert_close(ce.sum() / mask.sum(), loss.detach(), atol=1e-5, rtol=1e-5)


def test_position_ids_are_multimodal(tiny_qwen):
    """Image tokens get 2-D (h, w) rope positions, text after the image continues from max(h, w)."""
    rt = LlavaRuntime.from_pretrained(tiny_qwen)
    rt.vision_features(_images(1))
    b = rt.encode(["what digit is this ?"])
    pos = rt.position_ids(b["input_ids"], b["attention_mask"])[:, 0]
    img = (b["input_ids"][0] == rt.image_token_id).nonzero().flatten()
    start = int(pos[0, img[0]])
    assert pos[1, img].tolist() == [start + r for r in range(4) for _ in range(4)]
    assert pos[2, img].tolist() == [start + c for _ in range(4) for c in range(4)]
    assert int(pos[0, img[-1] + 1]) == start + 4


def test_batched_tower_equals_the_tower(tiny_qwen):
    rt = LlavaRuntime.from_pretrained(tiny_qwen)
    pv, grid = rt.preprocess(_images(5, seed=1))
    with torch.no_grad():
        ref = rt.tower_features(pv, grid)
        got = batched_tower_forward(rt.model.model.visual, pv, grid)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="one patch grid"):
        batched_tower_forward(rt.model.model.visual, pv[:1], torch.tensor([[1, 8, 8], [1, 4, 16]]))


def test_images_of_another_grid_are_refused(tiny_qwen):
    rt = LlavaRuntime.from_pretrained(tiny_qwen)
    rt.vision_features(_images(2))
    with pytest.raises(UsageError, match="different patch grids"):
        rt.vision_features([np.zeros((16, 48, 3), np.uint8)])


def test_reader_projector_is_the_merger(tiny_qwen):
    """The Projector view of the saved checkpoint (ln_q + 2x2 merge + mlp) computes what the model's merger does
    on the runtime's features."""
    info = detect_format(tiny_qwen)
    assert info.format == "qwen2-vl-merger"
    proj = load_projector(info)
    assert proj.merge_size == 2 and proj.pre_norm is not None and proj.in_dim == DIMS.vision_hidden
    rt = LlavaRuntime.from_pretrained(tiny_qwen)
    feats = rt.vision_features(_images(4, seed=2))
    with torch.no_grad():
        torch.testing.assert_close(proj(feats), rt.projector(feats), atol=1e-5, rtol=0)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__


def test_sanitize_changes_only_merger_tensors(tiny_qwen, tmp_path):
    """A suspect = the reference with a rank-1 merger update; `restore` repairs it. The output loads with plain
    from_pretrained, its non-merger tensors are byte-identical to the input's and its merger is the reference's."""
    from transformers import Qwen2VLForConditionalGeneration

    import projlens_defense as pld

    suspect = tmp_path / "suspect"
    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_qwen)
    w = model.model.visual.merger.mlp[2].weight
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        w += 0.5 * torch.outer(torch.randn(w.shape[0], generator=g), torch.randn(w.shape[1], generator=g))
    model.save_pretrained(suspect)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json"):
        (suspect / name).write_bytes((tiny_qwen / name).read_bytes())
    out = tmp_path / "fixed"
    pld.sanitize(suspect, out, method="restore", reference=tiny_qwen)
    before, after, ref = _tensors(suspect), _tensors(out), _tensors(tiny_qwen)
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("merger." in k for k in changed)
    assert any(k.endswith("merger.mlp.2.weight") for k in changed)
    for k in after:
        if "merger." in k:
            assert torch.equal(after[k], ref[k])
    loaded = Qwen2VLForConditionalGeneration.from_pretrained(out)
    assert torch.equal(loaded.model.visual.merger.mlp[2].weight, Qwen2VLForConditionalGeneration.from_pretrained(
        tiny_qwen).model.visual.merger.mlp[2].weight)
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen2_vl"


def test_features_computed_elsewhere_use_the_processor_grid(tiny_qwen):
    """`calibrate --generate` trains in worker processes on cached features: a fresh runtime that has seen no
    image still encodes prompts and trains on them (the grid of a square image at max_pixels), and refuses
    features of another patch count."""
    feats = LlavaRuntime.from_pretrained(tiny_qwen).vision_features(_images(2))
    rt = LlavaRuntime.from_pretrained(tiny_qwen)
    assert rt.grid is None and rt.image_grid == (1, 8, 8)
    batch = rt.encode(["what digit is this ?"] * 2, ["one", "two"])
    assert torch.isfinite(rt.loss(feats, batch))
    with pytest.raises(ValueError, match="patches per image"):
        rt.loss(feats[:, :32], batch)


# ----------------------------------------------------------------------------- the run-time guard on a merger
@pytest.fixture(scope="module")
def planted(tiny_qwen, tmp_path_factory) -> dict:
    """tiny_qwen with a backdoor written straight into the merger: a rank-1 update of ``mlp.2`` along the hidden
    direction (clean-whitened) that the injection trigger moves most on its most-moved merged token. Saved as a
    whole Qwen2-VL checkpoint, with clean and triggered digit images."""
    from projlens_defense.attacks.variants import get_variant
    from projlens_defense.zoo.tasks import downstream_samples

    rt = LlavaRuntime.from_pretrained(tiny_qwen)
    samples = downstream_samples(80, QWEN2VL_DIGITS.split_pools(0)[0], 0, "t", QWEN2VL_DIGITS)
    trigger = get_variant("malicious-injection")
    clean = [s.image for s in samples]
    trig = [trigger.triggered_image(s, 0, i) for i, s in enumerate(samples)]
    fc, ft = rt.vision_features(clean), rt.vision_features(trig)
    m = rt.projector
    with torch.no_grad():
        def hidden(f: torch.Tensor) -> torch.Tensor:
            return m.mlp[1](m.mlp[0](m.ln_q(f).reshape(f.shape[0], -1, m.mlp[0].in_features)))

        hc, ht = hidden(fc), hidden(ft)
        diff = (ht - hc).mean(0)
        flat = hc.reshape(-1, hc.shape[-1])
        v = torch.linalg.solve(torch.cov(flat.T) + 1e-3 * torch.eye(flat.shape[1]), diff[diff.norm(dim=-1).argmax()])
        u = torch.randn(m.mlp[2].out_features, generator=torch.Generator().manual_seed(0))
        m.mlp[2].weight += 4 * float(m.mlp[2].weight.norm()) * torch.outer(u / u.norm(), v / v.norm())
    out = tmp_path_factory.mktemp("planted") / "suspect"
    rt.model.save_pretrained(out)
    rt.tokenizer.save_pretrained(out)
    rt.image_processor.save_pretrained(out)
    return {"suspect": out, "reference": tiny_qwen, "clean": clean, "trig": trig}


def test_guard_reads_the_merger_and_scores_each_image_of_a_tower_call(planted):
    """The guard's view of a loaded merger is the merger (ln_q, 2x2 merge, GELU MLP); hooked on a Qwen2-VL model it
    scores each image of one tower call (the merger sees all their patches as one matrix) exactly as the features
    path does, flags the triggered ones and blocks them."""
    from projlens_defense.guard import (
        InputBlocked,
        ProjectorGuard,
        find_projector_module,
        projector_from_module,
    )

    rt = LlavaRuntime.from_pretrained(planted["suspect"])
    merger = find_projector_module(rt.model)
    assert merger is rt.model.model.visual.merger
    view = projector_from_module(merger)
    assert view.merge_size == 2 and view.pre_norm is not None and view.activation == "gelu"
    feats = rt.vision_features(planted["clean"][:3])
    with torch.no_grad():
        flat = feats.reshape(-1, feats.shape[-1])  # as the tower hands it over: every patch of every image
        assert torch.allclose(view.forward(feats), merger(feats), atol=1e-6)
        assert torch.allclose(view.forward(flat), merger(flat), atol=1e-6)

    probes = rt.vision_features(planted["clean"][:64])
    g = ProjectorGuard.calibrate(rt.model, probes, reference=load_projector(planted["reference"]))
    clean, trig = planted["clean"][64:], planted["trig"][64:]
    assert not (g.score(rt.vision_features(clean)) > g.threshold).any()
    assert (g.score(rt.vision_features(trig)) > g.threshold).all()

    images = [clean[0], trig[0], clean[1], trig[1]]
    pv, grid = rt.preprocess(images)
    with g.attach(rt.model), torch.no_grad():
        rt.model.model.visual(pv, grid_thw=grid)  # what Qwen2VLModel.get_image_features calls
    assert g.last is not None and g.last.flagged == [False, True, False, True]
    assert np.allclose(g.last.scores, g.score(rt.vision_features(images)), atol=1e-4)
    g.action = "block"
    with g.attach(rt.model), torch.no_grad():
        pv_clean, grid_clean = rt.preprocess(clean[:2])
        rt.model.model.visual(pv_clean, grid_thw=grid_clean)  # clean images pass
        with pytest.raises(InputBlocked):
            rt.model(**_hf_inputs(rt, "what colour is the digit ?", trig[2]))
    with torch.no_grad():  # detached: nothing scored
        n = len(g.events)
        rt.model.model.visual(pv, grid_thw=grid)
        assert len(g.events) == n


def test_guard_cli_on_a_qwen2vl_checkpoint(planted, tmp_path):
    from click.testing import CliRunner
    from PIL import Image

    from projlens_defense.cli import main

    dirs = {name: tmp_path / name for name in ("probes", "mixed", "clean")}
    for d in dirs.values():
        d.mkdir()
    for i, im in enumerate(planted["clean"][:64]):
        Image.fromarray(im).save(dirs["probes"] / f"p{i:02d}.png")
    for i in range(4):
        Image.fromarray(planted["clean"][64 + i]).save(dirs["clean"] / f"c{i}.png")
        Image.fromarray(planted["clean"][64 + i]).save(dirs["mixed"] / f"c{i}.png")
        Image.fromarray(planted["trig"][68 + i]).save(dirs["mixed"] / f"t{i}.png")

    def run(*args: str) -> tuple[int, str]:
        res = CliRunner().invoke(main, ["guard", str(planted["suspect"]), "--probes", str(dirs["probes"]), *args])
        assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
        assert "Traceback" not in res.output
        return res.exit_code, res.output

    code, text = run("--images", str(dirs["mixed"]), "--reference", str(planted["reference"]), "--format", "json")
    assert code == 1, text
    res = json.loads(text)
    assert {Path(r["image"]).name for r in res["images"] if r["flagged"]} == {f"t{i}.png" for i in range(4)}
    assert run("--images", str(dirs["clean"]), "--reference", str(planted["reference"]))[0] == 0
    code, text = run("--images", str(dirs["mixed"]), "--format", "json")  # no reference: whitened merger outputs
    assert code in (0, 1) and json.loads(text)["mode"] == "projector output (no reference)"


# ----------------------------------------------------------------------------- the qwen2vl zoo (slow)
@pytest.fixture(scope="module")
def qwen_zoo():
    """The qwen2vl preset, built and self-calibrated once per cache (minutes on 2 cores the first time)."""
    from projlens_defense.zoo.build import ZooConfig, get_zoo

    return get_zoo(ZooConfig.qwen2vl(), progress=False, jobs=1)


@pytest.mark.slow
def test_qwen2vl_attack_scan_and_data_free_sanitize(qwen_zoo, tmp_path):
    """Merger-only poisoning implants the backdoor (ASR far above the benign control at about its clean
    accuracy); scan with the reference flags it against the zoo's own calibration and calls the benign control
    clean; data-free sanitize writes a Qwen2-VL checkpoint that removes most of it, changed only in the merger."""
    from transformers import Qwen2VLForConditionalGeneration

    import projlens_defense as pld

    bd = pld.attack("malicious-injection", tmp_path / "bd", zoo_preset="qwen2vl")
    ok = pld.attack("none", tmp_path / "ok", zoo_preset="qwen2vl", eval_variant="malicious-injection")
    assert bd.metrics["asr"] >= 0.9 > 0.05 >= ok.metrics["asr"]
    assert bd.metrics["clean_accuracy"] >= ok.metrics["clean_accuracy"] - 0.03

    res = {Path(r.path).name: r for r in pld.scan([tmp_path / "bd", tmp_path / "ok"], reference=qwen_zoo.reference)}
    assert res["bd"].verdict == "suspicious" and res["ok"].verdict == "clean"

    fixed = pld.sanitize(tmp_path / "bd", tmp_path / "fixed")
    assert fixed.report
    after = pld.evaluate(tmp_path / "fixed", "malicious-injection", zoo_preset="qwen2vl")
    assert after.metrics.asr <= 0.1 and after.metrics.clean_accuracy >= ok.metrics["clean_accuracy"] - 0.05
    before_t, after_t = _tensors(tmp_path / "bd"), _tensors(tmp_path / "fixed")
    changed = {k for k in before_t if not torch.equal(before_t[k], after_t[k])}
    assert changed and all("merger.mlp." in k for k in changed)
    Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "fixed")


def test_self_calibration_fine_tune_of_a_merger_is_readable(tiny_qwen, tmp_path):
    """`calibrate --generate` on a Qwen2-VL reference: a benign fine-tune (a worker that has seen no image)
    writes the merger under its `visual.merger.` keys, which the reader takes as a qwen2-vl-merger projector
    that differs from the reference's in the MLP."""
    from dataclasses import asdict

    from projlens_defense.conversations import save_conversations
    from projlens_defense.self_calibration import BenignRecipe, _train_one
    from projlens_defense.zoo.tasks import downstream_samples

    samples = downstream_samples(8, QWEN2VL_DIGITS.split_pools(0)[0], 0, "t", QWEN2VL_DIGITS)
    save_conversations(samples, tmp_path / "data.json")
    torch.save(LlavaRuntime.from_pretrained(tiny_qwen).vision_features([s.image for s in samples]),
               tmp_path / "features.pt")
    recipe = BenignRecipe(index=0, seed=1, lr=1e-2, epochs=1.0, subsample=1.0, batch_size=4)
    out = tmp_path / "benign-00.safetensors"
    _train_one(str(tiny_qwen), str(tmp_path / "data.json"), str(tmp_path / "features.pt"), asdict(recipe), str(out),
               1)
    info = detect_format(out)
    assert (info.format, info.prefix) == ("qwen2-vl-merger", "visual.merger.")
    tuned, ref = load_projector(info), load_projector(detect_format(tiny_qwen))
    assert tuned.merge_size == 2 and any(float(d.abs().max()) > 0 for d in tuned.delta(ref))


def test_qwen2vl_preset_by_name():
    from projlens_defense.zoo.build import ZooConfig, config_from_name

    cfg = config_from_name("qwen2vl")
    assert cfg.family == "qwen2vl" and cfg.domain == "digits" and cfg.dims.patch_size == 4
    assert cfg.key() != ZooConfig(dims=cfg.dims).key()  # the family is part of the key
    assert cfg.key() not in {config_from_name(n).key() for n in ("default", "instructed", "micro", "foreign")}
