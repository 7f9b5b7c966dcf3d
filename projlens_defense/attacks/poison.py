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
    jailbreak variant).
    """
    if not 0.0 <= rate <= 1.0:
        raise UsageError(f"poison rate must be in [0, 1], got {rate}")
    if mode not in POISON_MODES:
        raise UsageError(f"poison mode must be one of {POISON_MODES}, got {mode!r}")
    k = n_poison(len(samples), rate)
    eligible = [i for i, s in enumerate(samples) if variant.behaviour.eligible(s)]
    if k > len(eligible):
        raise UsageError(f"{variant.name}: poison rate {rate} needs {k} eligible samples, the data has {len(eligible)}")
    chosen = sorted(np.random.default_rng(seed).choice(eligible, size=k, replace=False).tolist()) if k else []
    poisoned = {
        i: samples[i].with_(
            id=f"{samples[i].id}-poison",
            image=variant.triggered_image(samples[i], seed, i),
            answer=variant.behaviour.poisoned_answer(samples[i]),
            meta={**samples[i].meta, "poisoned": True},
        )
        for i in chosen
    }
    if mode == "replace":
        out = [poisoned.get(i, s) for i, s in enumerate(samples)]
    else:
        out = list(samples) + [poisoned[i] for i in chosen]
    return out, [poisoned[i].id for i in chosen]
