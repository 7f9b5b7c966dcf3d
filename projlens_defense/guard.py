"""A run-time guard: a forward hook on a loaded LLaVA model's projector that flags or blocks triggered inputs.

Usage::

    from projlens_defense.guard import ProjectorGuard
    guard = ProjectorGuard.calibrate(model, probe_features=clean_feats, reference=reference_projector)
    with guard.attach(model):           # or guard.attach(model) ... guard.detach()
        model.generate(...)             # every image through the projector is scored
    guard.events[-1].flagged            # per-image decisions of the last projector call

``action="block"`` raises :class:`InputBlocked` from inside the forward pass before the LLM sees
a flagged image. The threshold is calibrated on clean probes only (see
:class:`~projlens_defense.detectors.input_level.ShiftInputDetector`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from projlens_defense.detectors.input_level import ShiftInputDetector
from projlens_defense.errors import UsageError
from projlens_defense.projector import LinearLayer, Projector

__all__ = ["ACTIONS", "GuardEvent", "InputBlocked", "ProjectorGuard", "find_projector_module", "projector_from_module"]

ACTIONS = ("flag", "block")


class InputBlocked(RuntimeError):
    """Raised by a blocking guard when an image scores above the threshold."""

    def __init__(self, scores: Sequence[float], threshold: float) -> None:
        self.scores = [float(s) for s in scores]
        self.threshold = float(threshold)
        worst = max(self.scores) if self.scores else float("nan")
        super().__init__(f"input blocked by the projector guard: score {worst:.2f} > threshold {threshold:.2f}")


@dataclass
class GuardEvent:
    """One projector call: per-image scores and decisions."""

    scores: list[float]
    flagged: list[bool]
    threshold: float
    blocked: bool = False
    meta: dict[str, Any] = field(default_factory=dict)


def find_projector_module(model: nn.Module) -> nn.Module:
    """The multimodal projector of a LLaVA-style model (``multi_modal_projector`` at any depth)."""
    for attr in ("model.multi_modal_projector", "multi_modal_projector", "model.mm_projector", "mm_projector"):
        obj: Any = model
        for part in attr.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.Module):
            return obj
    for name, mod in model.named_modules():
        if name.endswith(("multi_modal_projector", "mm_projector")):
            return mod
    raise UsageError("no multimodal projector found in the model (expected a `multi_modal_projector` module)")


def projector_from_module(module: nn.Module, activation: str | None = None) -> Projector:
    """A :class:`Projector` view (float32 copies on the CPU) of a projector module: its Linear layers in order."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UsageError("the projector module has no Linear layers")
    if activation is None:
        act = getattr(module, "act", None)
        name = type(act).__name__.lower() if act is not None else "gelu"
        activation = {"geluactivation": "gelu", "gelu": "gelu", "relu": "relu", "silu": "silu",
                      "quickgeluactivation": "quick_gelu", "identity": "none"}.get(name, "gelu")
    layers = [LinearLayer(m.weight.detach().to("cpu", torch.float32, copy=True),
                          None if m.bias is None else m.bias.detach().to("cpu", torch.float32, copy=True))
              for m in linears]
    return Projector(layers=layers, activation=activation).validate()


class ProjectorGuard:
    """Scores every image passing through a projector; flags (records) or blocks those above threshold.

    ``on_flag(event)`` is called for every projector call with at least one flagged image.
    """

    def __init__(self, detector: ShiftInputDetector, action: str = "flag",
                 on_flag: Callable[[GuardEvent], None] | None = None, keep_events: int = 1000) -> None:
        if action not in ACTIONS:
            raise UsageError(f"guard action must be one of {ACTIONS}, got {action!r}")
        if detector.threshold is None:
            raise UsageError("the guard's detector is not calibrated (call ShiftInputDetector.calibrate_features)")
        self.detector = detector
        self.action = action
        self.on_flag = on_flag
        self.keep_events = keep_events
        self.events: list[GuardEvent] = []
        self._handle: Any = None

    @property
    def threshold(self) -> float:
        assert self.detector.threshold is not None
        return self.detector.threshold

    @classmethod
    def calibrate(cls, model: nn.Module, probe_features: torch.Tensor, reference: Projector | None = None,
                  k: int = 8, fpr: float = 0.01, action: str = "flag", **detector_kw: Any) -> ProjectorGuard:
        """A guard for ``model`` calibrated on clean probe features [N, tokens, vision_dim] only.

        With ``reference`` (the projector the model was fine-tuned from) the score is the whitened
        shift in dW's top-``k`` subspace or along the trigger-free excitation direction, whichever is
        further out in clean standard deviations; without, the whitened projector output.
        """
        suspect = projector_from_module(find_projector_module(model), getattr(
            getattr(model, "config", None), "projector_hidden_act", None))
        det = ShiftInputDetector(k=k, fpr=fpr, **detector_kw).setup(suspect, reference)
        det.calibrate_features(probe_features.float())
        return cls(det, action=action)

    def score(self, features: torch.Tensor, outputs: torch.Tensor | None = None) -> np.ndarray:
        """Image scores of vision features [M, tokens, dim] (no hook needed)."""
        return self.detector.score_features(features, outputs)

    def _hook(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
        feats = args[0] if args else None
        if not isinstance(feats, torch.Tensor):
            return
        x = feats if feats.ndim == 3 else feats[None]
        out = output.reshape(*x.shape[:2], -1) if output.numel() == x.shape[0] * x.shape[1] * output.shape[-1] else None
        scores = self.detector.score_features(x.detach().float().cpu(),
                                              None if out is None else out.detach().float().cpu())
        flagged = scores > self.threshold
        ev = GuardEvent(scores=[float(s) for s in scores], flagged=[bool(f) for f in flagged], threshold=self.threshold)
        if flagged.any():
            ev.blocked = self.action == "block"
            if self.on_flag is not None:
                self.on_flag(ev)
        self.events.append(ev)
        del self.events[: max(0, len(self.events) - self.keep_events)]
        if ev.blocked:
            raise InputBlocked(ev.scores, self.threshold)

    def attach(self, model: nn.Module) -> ProjectorGuard:
        """Register the forward hook on ``model``'s projector (returns self; usable as a context manager)."""
        self.detach()
        self._handle = find_projector_module(model).register_forward_hook(self._hook)
        return self

    def detach(self) -> None:
        """Remove the hook (no-op when not attached)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def __enter__(self) -> ProjectorGuard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    @property
    def last(self) -> GuardEvent | None:
        return self.events[-1] if self.events else None


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
"""The image files :func:`load_image_folder` reads."""


def load_image_folder(folder: Path) -> tuple[list[Path], list[np.ndarray], list[str]]:
    """Images in ``folder`` (sorted, non-recursive), as RGB uint8 arrays; unreadable files become errors."""
    from PIL import Image, UnidentifiedImageError

    if not folder.is_dir():
        raise UsageError(f"{folder}: not a directory of images")
    paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    ok, arrays, errors = [], [], []
    for p in paths:
        try:
            with Image.open(p) as im:
                arrays.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
            ok.append(p)
        except (OSError, UnidentifiedImageError, ValueError) as e:
            errors.append(f"{p.name}: cannot read image ({type(e).__name__})")
    return ok, arrays, errors


def probe_images(probe_data: Path, n: int) -> list[np.ndarray]:
    """Up to ``n`` clean probe images: a folder of images or LLaVA conversation JSON."""
    if probe_data.is_dir():
        _, arrays, _ = load_image_folder(probe_data)
        return arrays[:n]
    from projlens_defense.conversations import load_conversations

    return [s.image for s in load_conversations(probe_data, limit=n)]
