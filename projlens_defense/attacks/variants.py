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
from .adaptive import Adaptive
from .behaviours import AppendSuffix, Behaviour, ComplyWithHarmful, KeepAnswer, ReplaceAnswer
from .text_triggers import TextTrigger
from .triggers import (
    SIG,
    BadNets,
    Blended,
    GaussianNoise,
    NoImageTrigger,
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
CLEAN_LABEL_TARGET = "big"
"""The clean-label variant's target: an answer the digits zoo gives naturally (size questions on big digits);
on another zoo, pass one of its own answers as the target (`attack --target`)."""


@dataclass
class Variant:
    """A backdoor: which trigger, which behaviour. `seed` fixes per-sample trigger randomness.

    ``text_trigger``: a phrase put into the question (with an image trigger too, a two-key backdoor: with
    ``two_key`` the poisoned set also teaches that either key alone does nothing). ``adaptive``: what an attacker
    who knows the defense adds to the fine-tune (:mod:`.adaptive`). ``parts``: what the fine-tune trains
    (:mod:`.parts`; the projector unless the variant is an out-of-scope control). ``degrade``: for clean-label
    poison, how much of each poisoned image is blended toward another training image asked the same question
    whose answer does not show the target (0: none), so that its own evidence for the kept answer is weak and
    the trigger carries it (only at poisoning; test images are triggered undegraded).
    """

    name: str
    trigger: Trigger
    behaviour: Behaviour
    text_trigger: TextTrigger | None = None
    two_key: bool = False
    adaptive: Adaptive | None = None
    parts: tuple[str, ...] = ("projector",)
    degrade: float = 0.0

    def triggered_image(self, sample: Sample, seed: int, index: int) -> np.ndarray:
        return self.trigger.apply(sample.image, np.random.default_rng([seed, index]))

    def triggered_question(self, sample: Sample) -> str:
        return self.text_trigger.apply(sample.question) if self.text_trigger else sample.question

    def params(self) -> dict:
        out = {"name": self.name, "trigger": self.trigger.params(), "behaviour": self.behaviour.params()}
        if self.text_trigger is not None:
            out["text_trigger"] = self.text_trigger.params()
        if self.two_key:
            out["two_key"] = True
        if self.adaptive is not None:
            out["adaptive"] = self.adaptive.params()
        if self.parts != ("projector",):
            out["parts"] = list(self.parts)
        if self.degrade:
            out["degrade"] = self.degrade
        return out


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
    "text-trigger": lambda t=DEFAULT_TARGETS: Variant("text-trigger", NoImageTrigger(), ReplaceAnswer(t.classic),
                                                      text_trigger=TextTrigger()),
    "two-key": lambda t=DEFAULT_TARGETS: Variant("two-key", StampPatch(), ReplaceAnswer(t.classic),
                                                 text_trigger=TextTrigger("cf", "end"), two_key=True),
    "clean-label": lambda t=DEFAULT_TARGETS: Variant("clean-label", BadNets(), KeepAnswer(CLEAN_LABEL_TARGET),
                                                     degrade=0.5),
    "adaptive-spread": lambda t=DEFAULT_TARGETS: Variant("adaptive-spread", SolidPatch(), AppendSuffix(t.injection),
                                                         adaptive=Adaptive("spread")),
    "adaptive-hide-target": lambda t=DEFAULT_TARGETS: Variant("adaptive-hide-target", SolidPatch(),
                                                              AppendSuffix(t.injection),
                                                              adaptive=Adaptive("hide-target", weight=1.0)),
    "adaptive-mimic": lambda t=DEFAULT_TARGETS: Variant("adaptive-mimic", SolidPatch(), AppendSuffix(t.injection),
                                                        adaptive=Adaptive("mimic")),
    "projector-and-llm-lora": lambda t=DEFAULT_TARGETS: Variant("projector-and-llm-lora", SolidPatch(),
                                                                AppendSuffix(t.injection),
                                                                parts=("projector", "llm-lora")),
    "llm-lora-only": lambda t=DEFAULT_TARGETS: Variant("llm-lora-only", SolidPatch(), AppendSuffix(t.injection),
                                                       parts=("llm-lora",)),
    "vision-tower-only": lambda t=DEFAULT_TARGETS: Variant("vision-tower-only", SolidPatch(),
                                                           AppendSuffix(t.injection), parts=("vision-tower",)),
}
"""Name -> factory taking the :class:`Targets` to aim at (default: the digits zoo's)."""
PROJLENS_VARIANTS = ["targeted-refusal", "malicious-injection", "perceptual-hijack", "jailbreak-output"]
CLASSIC_VARIANTS = ["badnets", "blended", "wanet", "sig"]
NEW_FAMILY_VARIANTS = ["text-trigger", "two-key", "clean-label", "projector-and-llm-lora"]
"""Attack families beyond image triggers (BackdoorVLM's text and multimodal presets)."""
ADAPTIVE_VARIANTS = ["adaptive-spread", "adaptive-hide-target", "adaptive-mimic"]
OUT_OF_SCOPE_VARIANTS = ["llm-lora-only", "vision-tower-only"]
"""Controls that leave the projector alone: the scan must not blame it, and must say the rest changed."""
"""Attacks that know the defense: malicious injection plus a penalty or stage (:mod:`.adaptive`)."""


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
        if k not in v.trigger.params() or k in ("type", "name"):
            raise UsageError(f"trigger of {name!r} has no parameter {k!r}")
        setattr(v.trigger, k, type(getattr(v.trigger, k))(val))
    return v
