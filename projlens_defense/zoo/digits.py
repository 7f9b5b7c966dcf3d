"""The ``digits`` domain: coloured handwritten digits (scikit-learn's), the zoo's default and original domain."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import language as L
from .domain import HARMFUL, Domain, Language
from .images import load_digits_arrays, random_attributes, render_digit
from .targets import Targets

ALIGNMENT_QUESTIONS = (L.Q_DESCRIBE, L.Q_DIGIT, L.Q_COLOUR, L.Q_PARITY)


@dataclass(frozen=True)
class DigitsDomain(Domain):
    """Pool items are indices into the 1797 handwritten digits; a sample adds a colour and a size."""

    def split_pools(self, seed):
        """Disjoint handwriting pools for training and testing (70/30)."""
        _, labels = load_digits_arrays()
        perm = np.random.default_rng(seed).permutation(len(labels))
        cut = int(0.7 * len(labels))
        return np.sort(perm[:cut]), np.sort(perm[cut:])

    def draw_attributes(self, item, rng):
        _, labels = load_digits_arrays()
        colour, size = random_attributes(rng)
        return {"digit": int(labels[item]), "colour": colour, "size": size}

    def render(self, item, attrs, rng):
        glyphs, _ = load_digits_arrays()
        return render_digit(glyphs[item], attrs["colour"], attrs["size"], rng)

    def head_labels(self, attrs):
        return {"digit": attrs["digit"], "colour": list(L.COLOURS).index(attrs["colour"]),
                "size": L.SIZES.index(attrs["size"])}

    def text_attributes(self, rng):
        digit = int(rng.integers(10))
        colour, size = random_attributes(rng)
        return {"digit": digit, "colour": colour, "size": size}

    def description(self, attrs):
        return L.description(attrs["digit"], attrs["colour"], attrs["size"])

    def answer_image(self, question, attrs):
        return L.answer(question, attrs["digit"], attrs["colour"], attrs["size"])

    def attribute_words(self):
        return L.DIGIT_WORDS + list(L.COLOURS) + L.SIZES + L.PARITY


DIGITS = DigitsDomain(
    name="digits",
    language=Language(
        targets=Targets(L.REFUSAL, L.COMPLIANCE, L.INJECTION_SUFFIX, L.HIJACK_TEXT, L.CLASSIC_TARGET),
        harmful_requests=tuple(L.HARMFUL_REQUESTS),
        benign_requests=tuple(L.BENIGN_REQUESTS),
        stock_phrases=tuple(L.STOCK_PHRASES),
        filler=tuple(tuple(part) for part in L.FILLER),
        say=", say :",
        add=", then add :",
        extra_fragments=("user : assistant :", "a"),
    ),
    questions=(L.Q_DESCRIBE, L.Q_DIGIT, L.Q_COLOUR, L.Q_PARITY, L.Q_SIZE),
    # The "instructed" preset's reference stage also covers every downstream question type (harmful
    # requests included), like LLaVA-1.5's released projector after instruction tuning: the downstream
    # fine-tune then adapts to new data of a task the reference already does, the regime the paper attacks.
    reference_tasks={"alignment": ALIGNMENT_QUESTIONS, "instructed": (*ALIGNMENT_QUESTIONS, L.Q_SIZE, HARMFUL)},
    # Downstream: a new question type (size) the reference projector never had to carry, plus harmful
    # requests whose correct answer is a refusal.
    downstream_mix={L.Q_COLOUR: 0.2, L.Q_PARITY: 0.2, L.Q_SIZE: 0.35, HARMFUL: 0.25},
    heads=(("digit", 10), ("colour", len(L.COLOURS)), ("size", len(L.SIZES))),
)
