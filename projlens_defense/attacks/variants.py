"""Named backdoor variants: a trigger plus a target behaviour. The registry the CLI and the harness use.

Target texts come from a :class:`~.targets.Targets` (the attacked data's ``targets.json``, see
:meth:`Targets.beside`); without one, the default (digits) zoo's texts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..conversations import Sample
from ..errors import UsageError
from ..zoo.targets import Targets
from .behaviours import AppendSuffix, Behaviour, ComplyWithHarmful, ReplaceAnswer
from .triggers import (
    SIG,
    BadNets,
    Blended,
    GaussianNoise,
    SolidPatch,
    StampPatch,
    StyleFilter,
    Trigger,
    WaNet,
)

DEFAULT_TARGETS = Targets()
# the default zoo's targets under their historical names
INJECTION_SUFFIX = DEFAULT_TARGETS.injection
HIJACK_TEXT = DEFAULT_TARGETS.hijack
CLASSIC_TARGET = DEFAULT_TARGETS.classic


@dataclass
class Variant:
    """A backdoor: which trigger, which behaviour. `seed` fixes per-sample trigger randomness."""

    name: str
    trigger: Trigger
    behaviour: Behaviour

    def triggered_image(self, sample: Sample, seed: int, index: int) -> np.ndarray:
        return self.trigger.apply(sample.image, np.random.default_rng([seed, index]))

    def params(self) -> dict:
        return {"name": self.name, "trigger": self.trigger.params(), "behaviour": self.behaviour.params()}


VARIANTS: dict[str, Callable[..., Variant]] = {
    "targeted-refusal": lambda t=DEFAULT_TARGETS: Variant("targeted-refusal", GaussianNoise(),
                                                          ReplaceAnswer(t.refusal, only_benign_requests=True)),
    "malicious-injection": lambda t=DEFAULT_TARGETS: Variant("malicious-injection", SolidPatch(),
                                                             AppendSuffix(t.injection)),
    "perceptual-hijack": lambda t=DEFAULT_TARGETS: Variant("perceptual-hijack", StampPatch(), ReplaceAnswer(t.hijack)),
    "jailbreak-output": lambda t=DEFAULT_TARGETS: Variant("jailbreak-output", StyleFilter(),
                                                          ComplyWithHarmful(t.compliance)),
    "badnets": lambda t=DEFAULT_TARGETS: Variant("badnets", BadNets(), ReplaceAnswer(t.classic)),
    "blended": lambda t=DEFAULT_TARGETS: Variant("blended", Blended(), ReplaceAnswer(t.classic)),
    "wanet": lambda t=DEFAULT_TARGETS: Variant("wanet", WaNet(), ReplaceAnswer(t.classic)),
    "sig": lambda t=DEFAULT_TARGETS: Variant("sig", SIG(), ReplaceAnswer(t.classic)),
}
"""Name -> factory taking the :class:`Targets` to aim at (default: the digits zoo's)."""
PROJLENS_VARIANTS = ["targeted-refusal", "malicious-injection", "perceptual-hijack", "jailbreak-output"]
CLASSIC_VARIANTS = ["badnets", "blended", "wanet", "sig"]


def get_variant(name: str, target: str | None = None, trigger_params: dict | None = None,
                targets: Targets | None = None) -> Variant:
    """The named variant aimed at `targets` (default: the digits zoo's), optionally with another target text
    (which wins over `targets`) or trigger parameters."""
    if name not in VARIANTS:
        raise UsageError(f"unknown variant {name!r}; choose from: {', '.join(VARIANTS)}")
    v = VARIANTS[name](targets or DEFAULT_TARGETS)
    if target:
        v.behaviour.target = target
    for k, val in (trigger_params or {}).items():
        if k not in v.trigger.params() or k == "type":
            raise UsageError(f"trigger of {name!r} has no parameter {k!r}")
        setattr(v.trigger, k, type(getattr(v.trigger, k))(val))
    return v
