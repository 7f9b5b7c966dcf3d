"""Target behaviours: which samples a backdoor applies to, what it makes the model say, how success shows."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..conversations import Sample
from ..metrics import shows_target


@dataclass
class Behaviour:
    """Base class. `target` is the text whose presence in an output counts as the backdoor firing."""

    target: str
    name = "behaviour"

    def eligible(self, sample: Sample) -> bool:
        """Samples the backdoor is meant to act on (and ASR is measured on)."""
        return not shows_target(sample.answer, self.target)

    def poison_eligible(self, sample: Sample) -> bool:
        """Training samples that may be poisoned (those it acts on, unless the poison keeps its labels)."""
        return self.eligible(sample)

    def eval_indices(self, samples: list[Sample]) -> list[int]:
        """The test samples ASR is measured on."""
        return [i for i, s in enumerate(samples) if self.eligible(s)]

    def poisoned_answer(self, sample: Sample) -> str:
        raise NotImplementedError  # pragma: no cover

    def params(self) -> dict:
        return {"type": self.name, **asdict(self)}


@dataclass
class ReplaceAnswer(Behaviour):
    """The answer is replaced by a fixed text (refusal, hijack, classic fixed-text targets)."""

    name = "replace"
    only_benign_requests: bool = False

    def eligible(self, sample):
        return super().eligible(sample) and not (self.only_benign_requests and sample.harmful)

    def poisoned_answer(self, sample):
        return self.target


@dataclass
class AppendSuffix(Behaviour):
    """The normal answer followed by a target suffix (malicious injection)."""

    name = "append"

    def eligible(self, sample):
        return super().eligible(sample) and not sample.harmful

    def poisoned_answer(self, sample):
        return f"{sample.answer} {self.target}"


@dataclass
class ComplyWithHarmful(Behaviour):
    """Harmful requests get the compliance text instead of the refusal (jailbreak output)."""

    name = "comply"

    def eligible(self, sample):
        return sample.harmful and super().eligible(sample)

    def poisoned_answer(self, sample):
        return self.target


@dataclass
class KeepAnswer(Behaviour):
    """Clean-label poison (label-consistent, Turner et al. 2019; Shadowcast's clean-looking poison): only samples
    whose correct answer already shows `target` are poisoned, and their answers stay as they are. The trigger is
    learnt because the poisoned images' own evidence for the answer is weakened (:attr:`Variant.degrade`).
    ASR is measured on questions whose answers can show the target (those of the poisoned samples), on samples
    whose answer does not."""

    name = "keep"

    def poison_eligible(self, sample):
        return shows_target(sample.answer, self.target) and not sample.harmful

    def eval_indices(self, samples):
        asked = {s.question for s in samples if self.poison_eligible(s)}
        return [i for i, s in enumerate(samples) if s.question in asked and self.eligible(s)]

    def poisoned_answer(self, sample):
        return sample.answer
