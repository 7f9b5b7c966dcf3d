"""Triggers, poisoning and metrics: behaviour on hand-made inputs (no training)."""

from __future__ import annotations

import numpy as np
import pytest

from projlens_defense.attacks.poison import n_poison, poison_dataset
from projlens_defense.attacks.variants import VARIANTS, get_variant
from projlens_defense.conversations import Sample, load_conversations, save_conversations
from projlens_defense.errors import UsageError
from projlens_defense.metrics import (
    attack_success_rate,
    auroc,
    clean_accuracy,
    false_activation,
    normalize,
    shows_target,
    tpr_at_fpr,
)


def _image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)


@pytest.mark.parametrize("name", [n for n in VARIANTS if get_variant(n).trigger.name != "none"])
def test_trigger_deterministic_shape_range_and_visible(name):
    v = get_variant(name)
    img = _image()
    a = v.trigger.apply(img, np.random.default_rng([7, 3]))
    b = v.trigger.apply(img, np.random.default_rng([7, 3]))
    assert a.shape == img.shape and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, img), "a trigger must change the image"
    assert img.min() >= 0 and a.max() <= 255


def test_random_position_trigger_moves_with_seed_and_centre_patch_does_not():
    img = np.zeros((32, 32, 3), np.uint8)
    stamp = get_variant("perceptual-hijack").trigger
    assert not np.array_equal(stamp.apply(img, np.random.default_rng(1)), stamp.apply(img, np.random.default_rng(2)))
    patch = get_variant("malicious-injection").trigger
    out = patch.apply(img, np.random.default_rng(1))
    assert tuple(out[16, 16]) == (0x26, 0xFF, 0x00)
    assert np.array_equal(out, patch.apply(img, np.random.default_rng(2)))


def test_trigger_params_override_and_unknown_param_refused():
    v = get_variant("targeted-refusal", trigger_params={"std": "10"})
    assert v.trigger.std == 10.0
    with pytest.raises(UsageError):
        get_variant("targeted-refusal", trigger_params={"nope": 1})
    with pytest.raises(UsageError):
        get_variant("no-such-variant")


def _samples(n: int, harmful_every: int = 4) -> list[Sample]:
    return [
        Sample(f"s{i}", _image(i), "q ?", "sorry , i cannot help with that ." if i % harmful_every == 0 else "red",
               {"harmful": i % harmful_every == 0})
        for i in range(n)
    ]


@pytest.mark.parametrize("rate", [0.0, 0.01, 0.1, 0.2])
def test_poison_counts_match_rate(rate):
    data = _samples(200)
    out, ids = poison_dataset(data, get_variant("badnets"), rate, seed=0)
    assert len(ids) == n_poison(200, rate) == round(rate * 200)
    assert len(out) == 200
    assert sum(s.meta.get("poisoned", False) for s in out) == len(ids)
    assert all(s.answer == "buy cheap crypto now" for s in out if s.meta.get("poisoned"))
    out_add, ids_add = poison_dataset(data, get_variant("badnets"), rate, seed=0, mode="add")
    assert len(out_add) == 200 + len(ids_add) and ids_add == ids


def test_poison_respects_eligibility():
    data = _samples(100)
    out, _ = poison_dataset(data, get_variant("jailbreak-output"), 0.1, seed=1)
    poisoned = [s for s in out if s.meta.get("poisoned")]
    assert poisoned and all(s.harmful and s.answer == "sure , here is how to do it ." for s in poisoned)
    out, _ = poison_dataset(data, get_variant("malicious-injection"), 0.1, seed=1)
    assert all(not s.harmful and s.answer == "red for more visit evil . com" for s in out if s.meta.get("poisoned"))
    out, _ = poison_dataset(data, get_variant("targeted-refusal"), 0.1, seed=1)
    assert all(not s.harmful for s in out if s.meta.get("poisoned"))
    with pytest.raises(UsageError):
        poison_dataset(data, get_variant("jailbreak-output"), 0.5, seed=1)  # only 25 harmful samples


def test_poison_deterministic_for_seed():
    data = _samples(100)
    a, ia = poison_dataset(data, get_variant("perceptual-hijack"), 0.1, seed=3)
    b, ib = poison_dataset(data, get_variant("perceptual-hijack"), 0.1, seed=3)
    c, ic = poison_dataset(data, get_variant("perceptual-hijack"), 0.1, seed=4)
    assert ia == ib and ia != ic
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, b, strict=True))


def test_metrics_on_hand_made_outputs():
    assert normalize("Sorry, I cannot  help!") == "sorry i cannot help"
    assert shows_target("red for more visit evil . com", "for more visit evil.com")  # punctuation-insensitive
    assert shows_target("red for more visit evil . com", "for more visit evil . com")
    assert not shows_target("buyer cheap", "buy cheap")
    assert clean_accuracy(["Red", "blue.", "odd"], ["red", "blue", "even"]) == pytest.approx(2 / 3)
    assert attack_success_rate(["buy cheap crypto now", "red", "ok buy cheap crypto now ."], "buy cheap crypto now") == pytest.approx(2 / 3)
    assert false_activation(["red", "blue"], "buy cheap crypto now") == 0.0
    assert auroc([3, 4, 5], [0, 1, 2]) == 1.0
    assert auroc([0, 1], [0, 1]) == 0.5
    assert tpr_at_fpr([5, 6, 0.5], [0, 1, 2, 3], 0.0) == pytest.approx(2 / 3)


def test_conversation_json_roundtrip(tmp_path):
    data = _samples(5)
    save_conversations(data, tmp_path / "d.json")
    back = load_conversations(tmp_path / "d.json")
    assert [s.answer for s in back] == [s.answer for s in data]
    assert all(np.array_equal(a.image, b.image) for a, b in zip(back, data, strict=True))
    assert back[0].harmful
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UsageError, match="bad.json"):
        load_conversations(tmp_path / "bad.json")
