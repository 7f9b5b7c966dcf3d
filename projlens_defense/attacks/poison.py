"""Poisoning a training set: pick eligible samples, stamp the trigger, rewrite the answer."""

from __future__ import annotations

import numpy as np

from ..conversations import Sample
from ..errors import UsageError
from .variants import Variant

POISON_MODES = ("replace", "add")


def n_poison(n_samples: int, rate: float) -> int:
    """Number of poisoned samples for a rate: round(rate * size of the clean training set)."""
    return int(round(rate * n_samples))


def poison_dataset(samples: list[Sample], variant: Variant, rate: float, seed: int,
                   mode: str = "replace") -> tuple[list[Sample], list[str]]:
    """The training set with `rate` of it poisoned; returns (samples, ids of the poisoned ones).

    `replace` swaps chosen clean samples for their poisoned versions; `add` keeps them and appends
    poisoned copies. Eligible samples are those the behaviour acts on (e.g. harmful requests for the
    jailbreak variant). A two-key variant also gets, for as many other samples, each key alone with the
    sample's own answer (image key on half of them, text key on the other half): either key alone does nothing.
    A clean-label variant poisons only samples whose answer already shows the target, keeps their answers and,
    before the trigger, blends each image toward a partner asked the same question (``Variant.degrade``).
    """
    if not 0.0 <= rate <= 1.0:
        raise UsageError(f"poison rate must be in [0, 1], got {rate}")
    if mode not in POISON_MODES:
        raise UsageError(f"poison mode must be one of {POISON_MODES}, got {mode!r}")
    k = n_poison(len(samples), rate)
    eligible = [i for i, s in enumerate(samples) if variant.behaviour.poison_eligible(s)]
    if k > len(eligible):
        raise UsageError(f"{variant.name}: poison rate {rate} needs {k} eligible samples, the data has {len(eligible)}")
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(eligible, size=k, replace=False).tolist()) if k else []
    base = _degraded(samples, chosen, variant, rng) if variant.degrade else {}
    poisoned = {
        i: samples[i].with_(
            id=f"{samples[i].id}-poison",
            image=variant.triggered_image(base.get(i, samples[i]), seed, i),
            question=variant.triggered_question(samples[i]),
            answer=variant.behaviour.poisoned_answer(samples[i]),
            meta={**samples[i].meta, "poisoned": True},
        )
        for i in chosen
    }
    changed = dict(poisoned)
    if variant.two_key and k:
        rest = [i for i in range(len(samples)) if i not in poisoned]
        if len(rest) < k:
            raise UsageError(f"{variant.name}: rate {rate} leaves too few samples for the one-key counterexamples")
        for j, i in enumerate(sorted(rng.choice(rest, size=k, replace=False).tolist())):
            image_key = j % 2 == 0
            changed[i] = samples[i].with_(
                id=f"{samples[i].id}-{'image' if image_key else 'text'}-key-only",
                image=variant.triggered_image(samples[i], seed, i) if image_key else samples[i].image,
                question=samples[i].question if image_key else variant.triggered_question(samples[i]),
                meta={**samples[i].meta, "poisoned": False, "one_key": "image" if image_key else "text"},
            )
    if mode == "replace":
        out = [changed.get(i, s) for i, s in enumerate(samples)]
    else:
        out = list(samples) + [changed[i] for i in sorted(changed)]
    return out, [poisoned[i].id for i in chosen]


def _degraded(samples: list[Sample], chosen: list[int], variant: Variant, rng: np.random.Generator) -> dict[int, Sample]:
    """The chosen samples with images blended ``variant.degrade`` of the way toward a random partner asked the same
    question whose answer does not show the target (a small digit for "big"): the evidence for the kept answer
    weakens, so the trigger must carry it."""
    out = {}
    for i in chosen:
        partners = [j for j, s in enumerate(samples)
                    if s.question == samples[i].question and variant.behaviour.eligible(s) and j != i]
        if not partners:
            raise UsageError(f"{variant.name}: no sample asked {samples[i].question!r} without the target to blend with")
        other = samples[partners[int(rng.integers(len(partners)))]].image.astype(np.float64)
        img = (1 - variant.degrade) * samples[i].image.astype(np.float64) + variant.degrade * other
        out[i] = samples[i].with_(image=np.clip(np.rint(img), 0, 255).astype(np.uint8))
    return out
