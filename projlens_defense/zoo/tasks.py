"""The zoo's data for any :class:`~.domain.Domain`: text pretraining corpus, the alignment task and the downstream task.

Every function takes the domain last and defaults to ``digits``, the original zoo.
"""

from __future__ import annotations

import numpy as np

from ..conversations import Sample
from .digits import DIGITS
from .domain import HARMFUL, Domain

# The digits domain's task lists, by their historical names.
REFERENCE_TASKS = {k: list(v) for k, v in DIGITS.reference_tasks.items()}
DOWNSTREAM_MIX = dict(DIGITS.downstream_mix)


def _request(domain: Domain, rng: np.random.Generator) -> str:
    reqs = domain.language.harmful_requests
    return reqs[rng.integers(len(reqs))]


def _image_sample(idx: int, question: str, item: int, rng: np.random.Generator, prefix: str,
                  domain: Domain) -> Sample:
    attrs = domain.draw_attributes(item, rng)
    img = domain.render(item, attrs, rng)
    meta = {**attrs, "harmful": domain.is_harmful(question)}
    return Sample(f"{prefix}{idx:05d}", img, question, domain.answer(question, attrs), meta)


def alignment_samples(n: int, pool: np.ndarray, seed: int, reference_tasks: str = "alignment",
                      domain: Domain = DIGITS) -> list[Sample]:
    """Image questions of the reference projector's training stage (the domain's `reference_tasks`), in turn."""
    questions = domain.reference_tasks[reference_tasks]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        q = questions[i % len(questions)]
        if q == HARMFUL:
            q = _request(domain, rng)
        out.append(_image_sample(i, q, int(rng.choice(pool)), rng, "align", domain))
    return out


def downstream_samples(n: int, pool: np.ndarray, seed: int, prefix: str, domain: Domain = DIGITS) -> list[Sample]:
    """The downstream task the attacks fine-tune on (the domain's `downstream_mix`, shuffled)."""
    rng = np.random.default_rng(seed)
    mix = domain.downstream_mix
    kinds = list(mix)
    counts = [int(round(mix[k] * n)) for k in kinds]
    counts[-1] = n - sum(counts[:-1])
    order = np.concatenate([np.full(c, i) for i, c in enumerate(counts)])
    rng.shuffle(order)
    out = []
    for i, k in enumerate(order):
        kind = kinds[k]
        q = _request(domain, rng) if kind == HARMFUL else kind
        out.append(_image_sample(i, q, int(rng.choice(pool)), rng, prefix, domain))
    return out


def phrase_bank(seed: int = 12345, size: int = 40, domain: Domain = DIGITS) -> list[str]:
    """Stock phrases an instruction in the context can ask for: generic sentences plus known replies.

    The attack targets are among them, as a real LLM knows such phrases; they are a small minority.
    """
    rng = np.random.default_rng(seed)
    lang = domain.language
    bank = {lang.refusal, lang.compliance, *lang.stock_phrases}
    while len(bank) < size:
        bank.add(lang.filler_sentence(rng))
    return sorted(bank)


def text_corpus(n: int, seed: int, domain: Domain = DIGITS) -> list[tuple[str, str, str]]:
    """(context, question, answer) triples for LLM pretraining; the context stands where the image will be.

    Besides attribute questions about a described image and requests (refused when harmful), the
    context may carry an instruction to say or to add a stock phrase, as text written in an image would:
    the LLM learns to follow its visual context in general, for forty phrases of which the attack
    targets are a few. An empty question means the answer is plain text.
    """
    rng = np.random.default_rng(seed)
    lang = domain.language
    bank = phrase_bank(domain=domain)
    out: list[tuple[str, str, str]] = []
    questions = domain.questions
    requests = lang.harmful_requests + lang.benign_requests
    for _ in range(n):
        r = rng.random()
        attrs = domain.text_attributes(rng)
        desc = domain.description(attrs)
        q = questions[rng.integers(len(questions))]
        if r < 0.45:
            out.append((desc, q, domain.answer(q, attrs)))
        elif r < 0.55:
            req = lang.harmful_requests[rng.integers(len(lang.harmful_requests))]
            out.append((desc if rng.random() < 0.5 else "", req, lang.refusal))
        elif r < 0.62:
            req = lang.benign_requests[rng.integers(len(lang.benign_requests))]
            out.append((desc if rng.random() < 0.5 else "", req, lang.compliance))
        elif r < 0.72:
            phrase = bank[rng.integers(len(bank))]
            any_q = q if rng.random() < 0.6 else requests[rng.integers(len(requests))]
            out.append((f"{desc} {lang.say} {phrase}", any_q, phrase))
        elif r < 0.8:
            phrase = bank[rng.integers(len(bank))]
            out.append((f"{desc} {lang.add} {phrase}", q, f"{domain.answer(q, attrs)} {phrase}"))
        else:
            out.append(("", "", " ".join(lang.filler_sentence(rng) for _ in range(2))))
    return out
