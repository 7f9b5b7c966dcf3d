"""What a projector scan covers: the checkpoint's tensors outside the projector, and which of them differ from the
reference.

The scan judges the projector only. A backdoor planted in the vision tower or in the LLM (full fine-tune or LoRA
merged into it) is outside what it examines; the least it can do is say so, and, given the reference, say whether
those parts were changed at all (a third-party checkpoint whose LLM differs from its base model needs another
tool's look, whatever the projector's verdict).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..errors import CheckpointError
from .reader import CheckpointInfo

COMPARE_LIMIT_BYTES = 1 << 30
"""Tensors outside the projector are compared with the reference's only up to this many bytes per checkpoint."""

VISION_MARKERS = ("vision_tower.", "visual.", "vision_model.", "image_encoder.")


def component_of(key: str) -> str:
    """``vision tower`` or ``language model`` for a tensor name outside the projector."""
    return "vision tower" if any(m in key for m in VISION_MARKERS) else "language model"


@dataclass
class Scope:
    """``examined``: the projector tensors judged; ``outside``: tensors per other component in the checkpoint (not
    examined); ``changed``: per component, tensors that differ from the reference's (added, removed, other shape
    or values); None when not compared, ``note`` says why."""

    examined: int
    outside: dict[str, int] = field(default_factory=dict)
    changed: dict[str, int] | None = None
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def differing(self) -> dict[str, int]:
        """Components outside the projector with tensors that differ from the reference (sorted; none if not
        compared)."""
        return {c: n for c, n in sorted((self.changed or {}).items()) if n}

    def differing_warnings(self, consequence: str) -> list[str]:
        """One warning per differing component, ending with what that means for the caller (``consequence``)."""
        return [f"{n} {c} tensor(s) differ from the reference: outside the projector, {consequence}"
                for c, n in self.differing().items()]

    def summary(self) -> str:
        """One line for the text report."""
        parts = [f"projector examined ({self.examined} tensors)"]
        if self.outside:
            parts.append("not examined: " + ", ".join(f"{c} ({n} tensors)" for c, n in sorted(self.outside.items())))
        if self.changed is not None:
            diff = self.differing()
            parts.append("differ from the reference: " + (", ".join(f"{c} {n}" for c, n in diff.items())
                                                           if diff else "none"))
        elif self.note:
            parts.append(self.note)
        return "; ".join(parts)


def _outside(info: CheckpointInfo) -> list[str]:
    """Tensor names outside the projector (every projector key starts with its prefix)."""
    c = info.tensors
    return [] if c is None else sorted(k for k in c.keys() if not k.startswith(info.prefix))


def checkpoint_scope(info: CheckpointInfo, reference: CheckpointInfo | None = None,
                     limit_bytes: int = COMPARE_LIMIT_BYTES) -> Scope:
    """The scope of a scan of ``info``; with ``reference``, its tensors outside the projector compared to it."""
    keys = _outside(info)
    scope = Scope(examined=len(info.projector_keys()) if info.tensors is not None else 0)
    for k in keys:
        comp = component_of(k)
        scope.outside[comp] = scope.outside.get(comp, 0) + 1
    if reference is None:
        scope.note = "not compared (no reference)" if keys else None
        return scope
    ref_keys = _outside(reference)
    if not keys:  # a projector-only file: the rest of its model is not in it, so nothing there can differ
        scope.note = "not compared (the checkpoint holds the projector only)" if ref_keys else None
        return scope
    if info.tensors is None or reference.tensors is None:
        scope.note = "not compared (no tensor container)"
        return scope
    a, b = info.tensors, reference.tensors
    total = 0
    for k in keys:
        m = a.meta(k)
        total += int(torch.Size(m.shape).numel())
    if total * 4 > limit_bytes:  # an upper bound on the bytes (float32); bf16 LLMs read half of it
        scope.note = f"not compared (more than {limit_bytes >> 30} GiB outside the projector)"
        return scope
    changed: dict[str, int] = {}
    ref_set = set(ref_keys)
    for k in sorted(set(keys) | ref_set):
        comp = component_of(k)
        changed.setdefault(comp, 0)
        if k not in ref_set or k not in keys or a.meta(k) != b.meta(k):
            changed[comp] += 1
            continue
        try:
            same = torch.equal(a.read(k), b.read(k))
        except CheckpointError:
            same = False
        changed[comp] += 0 if same else 1
    scope.changed = changed
    return scope
