"""Image-question-answer samples and the LLaVA conversation JSON format they are stored in."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .errors import UsageError

IMAGE_PLACEHOLDER = "<image>"


@dataclass
class Sample:
    """One single-turn visual question with its answer; `meta` carries task labels such as `harmful`."""

    id: str
    image: np.ndarray  # HxWx3 uint8
    question: str
    answer: str
    meta: dict = field(default_factory=dict)

    def with_(self, **changes) -> Sample:
        return replace(self, **changes)

    @property
    def harmful(self) -> bool:
        return bool(self.meta.get("harmful", False))


def save_conversations(samples: list[Sample], json_path: Path, image_dir_name: str = "images") -> None:
    """Write samples as LLaVA-style conversation JSON with one PNG per image beside it."""
    from PIL import Image

    json_path = Path(json_path)
    img_dir = json_path.parent / image_dir_name
    img_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for s in samples:
        rel = f"{image_dir_name}/{s.id}.png"
        Image.fromarray(s.image).save(json_path.parent / rel)
        records.append(
            {
                "id": s.id,
                "image": rel,
                "conversations": [
                    {"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{s.question}"},
                    {"from": "gpt", "value": s.answer},
                ],
                "meta": s.meta,
            }
        )
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(records, indent=1))
    os.replace(tmp, json_path)


def load_conversations(json_path: Path | str, limit: int | None = None) -> list[Sample]:
    """Read LLaVA conversation JSON (first human/gpt turn of each record); images resolved beside the file."""
    from PIL import Image

    json_path = Path(json_path)
    if not json_path.is_file():
        raise UsageError(f"{json_path}: no such data file (expected LLaVA conversation JSON)")
    try:
        records = json.loads(json_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{json_path}: not valid JSON ({e})") from None
    if not isinstance(records, list):
        raise UsageError(f"{json_path}: expected a JSON list of conversation records")
    out = []
    for i, r in enumerate(records[:limit] if limit else records):
        try:
            conv = r["conversations"]
            q = next(t["value"] for t in conv if t["from"] == "human")
            a = next(t["value"] for t in conv if t["from"] == "gpt")
            img_path = json_path.parent / r["image"]
            with Image.open(img_path) as im:
                image = np.asarray(im.convert("RGB"), dtype=np.uint8)
        except (KeyError, StopIteration, TypeError) as e:
            raise UsageError(f"{json_path}: record {i} is not a LLaVA conversation ({e!r})") from None
        except OSError as e:
            raise UsageError(f"{json_path}: record {i}: cannot read image ({e})") from None
        q = q.replace(IMAGE_PLACEHOLDER, "").strip()
        out.append(Sample(id=str(r.get("id", i)), image=image, question=q, answer=a, meta=dict(r.get("meta", {}))))
    return out
