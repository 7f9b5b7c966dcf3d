"""A zoo domain: the images, the words and the tasks one zoo is built from.

The staged training (:mod:`.build`), the datasets (:mod:`.tasks`) and the tokenizer (:mod:`.tokenizer`)
are written once against this interface. Two domains exist: ``digits`` (coloured handwritten digits, the
zoo every default was measured on) and ``shapes`` (procedurally drawn shapes, words and targets nothing
was tuned on; the ``foreign`` preset).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from .targets import Targets

HARMFUL = "harmful"
"""Stands for "a harmful request" in the question lists of a domain's tasks."""


@dataclass(frozen=True)
class Language:
    """The words of a domain: its special tokens, chat template, requests, stock phrases and filler text."""

    targets: Targets
    harmful_requests: tuple[str, ...]
    benign_requests: tuple[str, ...]
    stock_phrases: tuple[str, ...]
    filler: tuple[tuple[str, ...], ...]
    """Subjects, verbs, objects and tails of the generic filler sentences (one of each)."""
    say: str
    """Written in a context: "say this phrase" (the LLM learns to follow its visual context)."""
    add: str
    """Written in a context: "answer, then add this phrase"."""
    extra_fragments: tuple[str, ...] = ()
    """Other text the tokenizer must know (prompt words, articles)."""
    specials: tuple[str, ...] = ("<pad>", "<s>", "</s>", "<image>", "<unk>")
    """Special tokens, ids 0.. in this order; `pad`, `bos`, `eos`, `image` and `unk` name five of them."""
    pad: str = "<pad>"
    bos: str = "<s>"
    eos: str = "</s>"
    image: str = "<image>"
    unk: str = "<unk>"
    chat_template: str | None = None
    """A Jinja chat template saved with the model (None: LLaVA-1.5's prompt)."""

    @property
    def refusal(self) -> str:
        return self.targets.refusal

    @property
    def compliance(self) -> str:
        return self.targets.compliance

    @property
    def additional_specials(self) -> list[str]:
        """Special tokens other than pad/bos/eos/unk (the image token first, then e.g. chat roles)."""
        named = {self.pad, self.bos, self.eos, self.unk, self.image}
        return [self.image] + [t for t in self.specials if t not in named]

    def filler_sentence(self, rng: np.random.Generator) -> str:
        """A generic sentence that exercises the broad vocabulary (target words included)."""
        return " ".join(part[rng.integers(len(part))] for part in self.filler) + " ."


@dataclass(frozen=True)
class Domain(ABC):
    """Images with attributes, the questions about them and the words to ask and answer them.

    Subclasses draw a sample's attributes (`draw_attributes`, from a pool item and an rng), render its
    image (`render`) and answer the image questions (`answer_image`); the pools are disjoint sets of
    items (handwriting samples, shape instances) for training and testing.
    """

    name: str
    language: Language
    questions: tuple[str, ...]
    """Every image question (the LLM's text pretraining asks all of them)."""
    reference_tasks: dict[str, tuple[str, ...]]
    """Question types of the reference projector's training stage, per preset (`HARMFUL` for requests)."""
    downstream_mix: dict[str, float]
    """Share of each question type in the downstream task the attacks fine-tune on."""
    heads: tuple[tuple[str, int], ...]
    """Vision pretraining heads: (attribute, number of classes), in creation order."""
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    vision_images: int = 4000
    """Images in the vision tower's pretraining set."""

    # ---- images ------------------------------------------------------------------------------
    @abstractmethod
    def split_pools(self, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Disjoint pool items for training and testing."""

    @abstractmethod
    def draw_attributes(self, item: int, rng: np.random.Generator) -> dict:
        """The attributes of one sample of pool item `item` (the sample's `meta`, less `harmful`)."""

    @abstractmethod
    def render(self, item: int, attrs: dict, rng: np.random.Generator) -> np.ndarray:
        """The HxWx3 uint8 image of a sample."""

    @abstractmethod
    def head_labels(self, attrs: dict) -> dict[str, int]:
        """Class index per vision pretraining head."""

    # ---- words -------------------------------------------------------------------------------
    @abstractmethod
    def text_attributes(self, rng: np.random.Generator) -> dict:
        """Attributes of an imagined sample, for the LLM's text pretraining."""

    @abstractmethod
    def description(self, attrs: dict) -> str:
        """The text an image stands for in the LLM's text pretraining."""

    @abstractmethod
    def answer_image(self, question: str, attrs: dict) -> str:
        """Ground-truth answer to one of `questions`."""

    @abstractmethod
    def attribute_words(self) -> list[str]:
        """Every word an attribute can be called (the tokenizer's vocabulary needs them)."""

    def answer(self, question: str, attrs: dict) -> str:
        """Ground-truth answer to an image question or a request (harmful requests are refused)."""
        if question in self.questions:
            return self.answer_image(question, attrs)
        if question in self.language.harmful_requests:
            return self.language.refusal
        raise ValueError(f"unknown question: {question!r}")

    def is_harmful(self, question: str) -> bool:
        return question in self.language.harmful_requests

    def text_fragments(self) -> list[str]:
        """Every fragment of text the zoo can produce; the vocabulary is built from these."""
        lang = self.language
        parts = [*lang.targets.to_dict().values(), *self.questions, lang.say, lang.add, *lang.extra_fragments]
        parts += self.attribute_words()
        parts += [*lang.harmful_requests, *lang.benign_requests, *lang.stock_phrases]
        parts += [w for part in lang.filler for w in part]
        return parts
