"""Greedy-decoding evaluation of a (possibly modified) projector: clean accuracy, ASR, false activation."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..conversations import Sample
from ..metrics import attack_success_rate, clean_accuracy, false_activation
from ..runtime import LlavaRuntime
from .variants import Variant


@dataclass
class EvalSet:
    """Test samples with their vision features, clean and triggered, computed once and reused."""

    samples: list[Sample]
    clean_features: torch.Tensor
    variant: Variant | None
    eligible: list[int]
    triggered_features: torch.Tensor | None
    triggered_questions: list[str] | None = None

    @property
    def target(self) -> str | None:
        return self.variant.behaviour.target if self.variant else None


@dataclass
class EvalResult:
    clean_accuracy: float
    asr: float | None
    false_activation: float | None
    n_clean: int
    n_triggered: int
    one_key_activation: dict[str, float] | None = None
    """Two-key backdoors: the ASR with only the image key and with only the text key (both should be ~0)."""

    def to_dict(self) -> dict:
        out = asdict(self)
        if out["one_key_activation"] is None:  # only two-key backdoors have it
            del out["one_key_activation"]
        return out


def prepare_eval_set(rt: LlavaRuntime, samples: list[Sample], variant: Variant | None, seed: int = 0,
                     batch_size: int | None = None) -> EvalSet:
    """Vision features of the clean test images and, for a variant, of triggered eligible ones.

    Trigger randomness at test time uses `seed + 10_000` so it never repeats the training draws.
    ``batch_size``: images per vision-tower batch (default: the runtime's, 256).
    """
    kw = {} if batch_size is None else {"batch_size": batch_size}
    clean = rt.vision_features([s.image for s in samples], **kw)
    if variant is None:
        return EvalSet(samples, clean, None, [], None)
    eligible = variant.behaviour.eval_indices(samples)
    trig = [variant.triggered_image(samples[i], seed + 10_000, i) for i in eligible]
    questions = [variant.triggered_question(samples[i]) for i in eligible]
    return EvalSet(samples, clean, variant, eligible, rt.vision_features(trig, **kw) if trig else None, questions)


def evaluate(rt: LlavaRuntime, es: EvalSet, projector: nn.Module | None = None, progress: bool = False,
             batch_size: int | None = None) -> EvalResult:
    """Metrics of DESIGN.md section 6 for the runtime's projector (or `projector` in its place).

    ``batch_size``: prompts per generation batch (default: the runtime's, 128)."""
    qs = [s.question for s in es.samples]
    kw = {} if batch_size is None else {"batch_size": batch_size}
    clean_out = rt.answer(es.clean_features, qs, projector=projector, progress=progress, **kw)
    acc = clean_accuracy(clean_out, [s.answer for s in es.samples])
    if es.variant is None:
        return EvalResult(acc, None, None, len(es.samples), 0)
    fa = false_activation([clean_out[i] for i in es.eligible], es.target)
    asr, one_key = None, None
    if es.triggered_features is not None:
        plain = [qs[i] for i in es.eligible]
        trig_q = es.triggered_questions or plain

        def rate(features: torch.Tensor, questions: list[str]) -> float:
            return attack_success_rate(rt.answer(features, questions, projector=projector, progress=progress, **kw),
                                       es.target)

        asr = rate(es.triggered_features, trig_q)
        if es.variant.two_key:
            one_key = {"image": rate(es.triggered_features, plain), "text": rate(es.clean_features[es.eligible], trig_q)}
    return EvalResult(acc, asr, fa, len(es.samples), len(es.eligible), one_key)

