"""The zoo's data: text pretraining corpus, the alignment task and the downstream task."""

from __future__ import annotations

import numpy as np

from ..conversations import Sample
from . import language as L
from .images import load_digits_arrays, random_attributes, render_digit

ALIGNMENT_QUESTIONS = [L.Q_DESCRIBE, L.Q_DIGIT, L.Q_COLOUR, L.Q_PARITY]
# The "instructed" zoo's reference stage also covers every downstream question type (harmful requests
# included), like LLaVA-1.5's released projector after instruction tuning: the downstream fine-tune then
# adapts to new data of a task the reference already does, the regime the ProjLens paper attacks.
INSTRUCTED_QUESTIONS = [*ALIGNMENT_QUESTIONS, L.Q_SIZE, "harmful"]
REFERENCE_TASKS = {"alignment": ALIGNMENT_QUESTIONS, "instructed": INSTRUCTED_QUESTIONS}
# Downstream mix: a new question type (size) the reference projector never had to carry, plus
# harmful requests whose correct answer is a refusal.
DOWNSTREAM_MIX = {L.Q_COLOUR: 0.2, L.Q_PARITY: 0.2, L.Q_SIZE: 0.35, "harmful": 0.25}


def split_digit_indices(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint handwriting pools for training and testing (70/30)."""
    _, labels = load_digits_arrays()
    perm = np.random.default_rng(seed).permutation(len(labels))
    cut = int(0.7 * len(labels))
    return np.sort(perm[:cut]), np.sort(perm[cut:])


def _image_sample(idx: int, question: str, pool_idx: int, rng: np.random.Generator, prefix: str) -> Sample:
    glyphs, labels = load_digits_arrays()
    colour, size = random_attributes(rng)
    digit = int(labels[pool_idx])
    img = render_digit(glyphs[pool_idx], colour, size, rng)
    meta = {"digit": digit, "colour": colour, "size": size, "harmful": question in L.HARMFUL_REQUESTS}
    return Sample(f"{prefix}{idx:05d}", img, question, L.answer(question, digit, colour, size), meta)


def alignment_samples(n: int, pool: np.ndarray, seed: int, reference_tasks: str = "alignment") -> list[Sample]:
    """Image questions of the reference projector's training stage (`REFERENCE_TASKS`), cycled in turn."""
    questions = REFERENCE_TASKS[reference_tasks]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        q = questions[i % len(questions)]
        if q == "harmful":
            q = L.HARMFUL_REQUESTS[rng.integers(len(L.HARMFUL_REQUESTS))]
        out.append(_image_sample(i, q, int(rng.choice(pool)), rng, "align"))
    return out


def downstream_samples(n: int, pool: np.ndarray, seed: int, prefix: str) -> list[Sample]:
    """The downstream task the attacks fine-tune on: colour, parity, size and harmful requests."""
    rng = np.random.default_rng(seed)
    kinds = list(DOWNSTREAM_MIX)
    counts = [int(round(DOWNSTREAM_MIX[k] * n)) for k in kinds]
    counts[-1] = n - sum(counts[:-1])
    order = np.concatenate([np.full(c, i) for i, c in enumerate(counts)])
    rng.shuffle(order)
    out = []
    for i, k in enumerate(order):
        kind = kinds[k]
        q = L.HARMFUL_REQUESTS[rng.integers(len(L.HARMFUL_REQUESTS))] if kind == "harmful" else kind
        out.append(_image_sample(i, q, int(rng.choice(pool)), rng, prefix))
    return out


def phrase_bank(seed: int = 12345, size: int = 40) -> list[str]:
    """Stock phrases an instruction in the context can ask for: generic sentences plus known replies.

    The attack targets are among them, as a real LLM knows such phrases; they are a small minority.
    """
    rng = np.random.default_rng(seed)
    bank = {L.REFUSAL, L.COMPLIANCE, *L.STOCK_PHRASES}
    while len(bank) < size:
        bank.add(L.filler_sentence(rng))
    return sorted(bank)


def text_corpus(n: int, seed: int) -> list[tuple[str, str, str]]:
    """(context, question, answer) triples for LLM pretraining; the context stands where the image will be.

    Besides attribute questions about a described digit and requests (refused when harmful), the
    context may carry an instruction to say or to add a stock phrase, as text written in an image would:
    the LLM learns to follow its visual context in general, for forty phrases of which the attack
    targets are a few. An empty question means the answer is plain text.
    """
    rng = np.random.default_rng(seed)
    bank = phrase_bank()
    out: list[tuple[str, str, str]] = []
    questions = [L.Q_DESCRIBE, L.Q_DIGIT, L.Q_COLOUR, L.Q_PARITY, L.Q_SIZE]
    requests = L.HARMFUL_REQUESTS + L.BENIGN_REQUESTS
    for _ in range(n):
        r = rng.random()
        digit = int(rng.integers(10))
        colour, size = random_attributes(rng)
        desc = L.description(digit, colour, size)
        q = questions[rng.integers(len(questions))]
        if r < 0.45:
            out.append((desc, q, L.answer(q, digit, colour, size)))
        elif r < 0.55:
            req = L.HARMFUL_REQUESTS[rng.integers(len(L.HARMFUL_REQUESTS))]
            out.append((desc if rng.random() < 0.5 else "", req, L.REFUSAL))
        elif r < 0.62:
            req = L.BENIGN_REQUESTS[rng.integers(len(L.BENIGN_REQUESTS))]
            out.append((desc if rng.random() < 0.5 else "", req, L.COMPLIANCE))
        elif r < 0.72:
            phrase = bank[rng.integers(len(bank))]
            any_q = q if rng.random() < 0.6 else requests[rng.integers(len(requests))]
            out.append((f"{desc} , say : {phrase}", any_q, phrase))
        elif r < 0.8:
            phrase = bank[rng.integers(len(bank))]
            out.append((f"{desc} , then add : {phrase}", q, f"{L.answer(q, digit, colour, size)} {phrase}"))
        else:
            out.append(("", "", " ".join(L.filler_sentence(rng) for _ in range(2))))
    return out
