"""Text triggers: a rare word or phrase put into the question (BadNets-T / AddSent style, BackdoorVLM's text presets).

A projector sees only the image, so a text-triggered backdoor planted by a projector-only fine-tune must make the
frozen LLM combine shifted image tokens with the trigger word; how far that goes is what the threat table measures.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

POSITIONS = ("start", "end")


@dataclass
class TextTrigger:
    """Insert ``phrase`` at the ``start`` or ``end`` of the question. The default ``cf`` is the classic rare word
    (on a word-level zoo tokenizer it is out of vocabulary, i.e. the rare ``<unk>`` token)."""

    phrase: str = "cf"
    position: str = "start"
    name = "text"

    def __post_init__(self) -> None:
        if self.position not in POSITIONS:
            raise ValueError(f"unknown text-trigger position {self.position!r} ({', '.join(POSITIONS)})")
        if not self.phrase.strip():
            raise ValueError("a text trigger needs a non-empty phrase")

    def apply(self, question: str) -> str:
        return f"{self.phrase} {question}" if self.position == "start" else f"{question} {self.phrase}"

    def params(self) -> dict:
        return {"type": self.name, **asdict(self)}
