"""The ``foreign`` zoo preset (shapes domain): unit-level checks that need no built zoo."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from projlens_defense.attacks.poison import poison_dataset
from projlens_defense.attacks.variants import VARIANTS, get_variant
from projlens_defense.errors import UsageError
from projlens_defense.runtime import template_from_chat_template
from projlens_defense.zoo import language as L
from projlens_defense.zoo.build import ZooConfig, config_from_name
from projlens_defense.zoo.digits import DIGITS
from projlens_defense.zoo.domain import HARMFUL
from projlens_defense.zoo.domains import get_domain
from projlens_defense.zoo.images import IMAGE_SIZE
from projlens_defense.zoo.shapes import SHAPE_NAMES, SHAPES, shape_mask
from projlens_defense.zoo.targets import TARGETS_FILE, Targets
from projlens_defense.zoo.tasks import alignment_samples, downstream_samples, text_corpus
from projlens_defense.zoo.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(SHAPES)


def test_preset_by_name_and_key() -> None:
    cfg = config_from_name("foreign", 3)
    assert cfg == ZooConfig.foreign(seed=3) and cfg.domain == "shapes" and get_domain(cfg.domain) is SHAPES
    keys = {ZooConfig().key(), ZooConfig.micro().key(), ZooConfig.instructed().key()}
    assert ZooConfig.foreign().key() not in keys and ZooConfig.foreign(seed=1).key() != ZooConfig.foreign().key()
    # other widths: vision, projector (vision -> text -> text) and LLM all differ from the digits presets
    d, ref = cfg.dims, ZooConfig().dims
    assert d.vision_hidden != ref.vision_hidden and d.text_hidden != ref.text_hidden
    assert d.patch_size != ref.patch_size  # another number of image tokens


def test_vocabulary_shares_no_digit_or_colour_word(tok) -> None:
    vocab = set(tok.get_vocab())
    assert not vocab & set(L.DIGIT_WORDS)
    assert not vocab & set(L.COLOURS)
    assert not vocab & {"small", "big", "even", "odd", "digit", "number"}
    assert set(SHAPE_NAMES) <= vocab
    assert tok.convert_ids_to_tokens(0) != build_tokenizer(DIGITS).convert_ids_to_tokens(0)  # other special ids
    # every text the domain produces is in the vocabulary
    unk = tok.unk_token_id
    for frag in SHAPES.text_fragments() + [" ".join(t) for t in text_corpus(300, 0, SHAPES)]:
        assert unk not in tok(frag, add_special_tokens=False).input_ids, frag


def test_own_chat_template(tok) -> None:
    assert tok.chat_template == SHAPES.language.chat_template
    template = template_from_chat_template(tok.chat_template, tok, SHAPES.language.image)
    assert template == "<|user|> <image> {question} <|assistant|>"


def test_targets_differ_from_the_default_zoo(tok) -> None:
    ours, theirs = SHAPES.language.targets, Targets()
    assert theirs == DIGITS.language.targets
    for name, text in ours.to_dict().items():
        assert text != getattr(theirs, name)
        assert tok.unk_token_id not in tok(text, add_special_tokens=False).input_ids
    v = get_variant("malicious-injection", targets=ours)
    assert v.behaviour.target == ours.injection
    assert get_variant("badnets", target="custom", targets=ours).behaviour.target == "custom"
    assert VARIANTS["badnets"]().behaviour.target == theirs.classic  # zero-argument factories keep the defaults


def test_targets_file_roundtrip(tmp_path: Path) -> None:
    ours = SHAPES.language.targets
    data = tmp_path / "train.json"
    assert Targets.beside(data) == Targets()  # no file: the defaults
    ours.save(tmp_path)
    assert Targets.beside(data) == ours and Targets.beside(tmp_path) == ours
    (tmp_path / TARGETS_FILE).write_text(json.dumps({"refusal": "no ."}))
    assert Targets.beside(data) == Targets(refusal="no .")
    for bad in ("[1]", '{"nope": "x"}', '{"hijack": ""}', "{not json"):
        (tmp_path / TARGETS_FILE).write_text(bad)
        with pytest.raises(UsageError):
            Targets.beside(data)


def test_images_render_and_triggers_apply() -> None:
    train, test = SHAPES.split_pools(0)
    assert not set(train) & set(test)
    rng = np.random.default_rng(0)
    for item in train[:12]:
        attrs = SHAPES.draw_attributes(int(item), rng)
        img = SHAPES.render(int(item), attrs, rng)
        assert img.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and img.dtype == np.uint8
        ink = np.abs(img.astype(int) - np.median(img, (0, 1))).sum(axis=(0, 2))  # per column
        left, right = ink[: IMAGE_SIZE // 2].sum(), ink[IMAGE_SIZE // 2 :].sum()
        assert (left > right) == (attrs["side"] == "left")  # the shape is on its side
        for name in [n for n in VARIANTS if get_variant(n).trigger.name != "none"]:  # not the text-only ones
            out = get_variant(name).trigger.apply(img, np.random.default_rng(1))
            assert out.shape == img.shape and out.dtype == np.uint8 and not np.array_equal(out, img)
    masks = [shape_mask(s, 16, 16, 9) for s in SHAPE_NAMES]
    assert all(0 < m.sum() < IMAGE_SIZE**2 for m in masks)
    assert len({m.tobytes() for m in masks}) == len(SHAPE_NAMES)


def test_tasks_use_the_domains_questions_and_targets() -> None:
    pool = np.arange(300)
    kinds = lambda ss: {HARMFUL if s.harmful else s.question for s in ss}  # noqa: E731
    align = alignment_samples(120, pool, 4, domain=SHAPES)
    down = downstream_samples(200, pool, 6, "train", SHAPES)
    assert kinds(align) == set(SHAPES.reference_tasks["alignment"])
    assert kinds(down) == set(SHAPES.downstream_mix)
    assert kinds(down) - kinds(align)  # new question types downstream
    refusal = SHAPES.language.refusal
    assert {s.answer for s in down if s.harmful} == {refusal}
    assert not {s.question for s in down} & set(DIGITS.questions)
    poisoned, ids = poison_dataset(down, get_variant("jailbreak-output", targets=SHAPES.language.targets), 0.1, 0)
    assert len(ids) == 20 and {s.answer for s in poisoned if s.id in ids} == {SHAPES.language.compliance}
