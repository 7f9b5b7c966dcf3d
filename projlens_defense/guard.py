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


PROJECTOR_PATHS = ("model.multi_modal_projector", "multi_modal_projector", "model.mm_projector", "mm_projector",
                   "model.visual.merger", "visual.merger")
"""Where a projector sits in a loaded model: LLaVA's ``multi_modal_projector`` / ``mm_projector``, Qwen2-VL's
patch merger (the vision tower's last module, ``visual.merger``)."""


def _module_at(model: nn.Module, path: str) -> nn.Module | None:
    obj: Any = model
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj if isinstance(obj, nn.Module) else None


def find_projector_module(model: nn.Module) -> nn.Module:
    """The multimodal projector of a LLaVA-style model (``multi_modal_projector`` at any depth) or a Qwen2-VL
    model's patch merger (``visual.merger``)."""
    for attr in PROJECTOR_PATHS:
        mod = _module_at(model, attr)
        if mod is not None:
            return mod
    for name, mod in model.named_modules():
        if name.endswith(("multi_modal_projector", "mm_projector", "visual.merger")):
            return mod
    raise UsageError("no multimodal projector found in the model (expected a `multi_modal_projector` module or a "
                     "Qwen2-VL `visual.merger`)")


def _merger_tower(model: nn.Module, projector: nn.Module) -> nn.Module | None:
    """The vision tower whose last module is ``projector`` when that is a Qwen2-VL merger (the tower is called
    with each image's patch grid), else None."""
    for path in ("model.visual", "visual"):
        tower = _module_at(model, path)
        if tower is not None and getattr(tower, "merger", None) is projector:
            return tower
    return None


_ACTIVATION_NAMES = {"geluactivation": "gelu", "gelu": "gelu", "relu": "relu", "silu": "silu",
                     "quickgeluactivation": "quick_gelu", "identity": "none"}


def _activation_of(module: nn.Module) -> str:
    """The activation between the projector's Linear layers: its ``act`` attribute (LLaVA), else the first
    activation module inside it (Qwen2-VL's ``mlp`` Sequential), else GELU."""
    act = getattr(module, "act", None)
    if act is None:
        act = next((m for m in module.modules()
                    if type(m).__name__.lower() in _ACTIVATION_NAMES and not isinstance(m, nn.Identity)), None)
    return _ACTIVATION_NAMES.get(type(act).__name__.lower(), "gelu") if act is not None else "gelu"


def _norm_of(module: nn.Module) -> tuple[tuple[torch.Tensor, torch.Tensor | None], str, float] | None:
    """A merger's pre-merge norm ``ln_q`` as ((weight, bias), type, eps), float32 CPU copies; None without one."""
    norm = getattr(module, "ln_q", None)
    if norm is None:
        return None
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise UsageError(f"the merger's ln_q ({type(norm).__name__}) has no weight")
    bias = getattr(norm, "bias", None)
    kind = "layernorm" if isinstance(norm, nn.LayerNorm) or isinstance(bias, torch.Tensor) else "rmsnorm"
    eps = getattr(norm, "eps", None)
    eps = getattr(norm, "variance_epsilon", 1e-6) if eps is None else eps

    def cpu(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu", torch.float32, copy=True)

    return (cpu(weight), cpu(bias) if isinstance(bias, torch.Tensor) else None), kind, float(eps)


def projector_from_module(module: nn.Module, activation: str | None = None) -> Projector:
    """A :class:`Projector` view (float32 copies on the CPU) of a projector module: its Linear layers in order,
    and for a Qwen2-VL merger its ``ln_q`` as the pre-norm with the merge size it implies (``ln_q`` width x
    merge_size**2 = the first Linear's input width), so the view computes what ``PatchMerger.forward`` does."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UsageError("the projector module has no Linear layers")
    layers = [LinearLayer(m.weight.detach().to("cpu", torch.float32, copy=True),
                          None if m.bias is None else m.bias.detach().to("cpu", torch.float32, copy=True))
              for m in linears]
    act = activation or _activation_of(module)
    norm = _norm_of(module)
    if norm is None:
        return Projector(layers=layers, activation=act).validate()
    (weight, bias), kind, eps = norm
    merge = Projector.infer_merge_size(weight.shape[0], layers[0].in_features)
    if merge is None:
        raise UsageError(f"the merger's ln_q width {weight.shape[0]} does not make a square patch merge of its first "
                         f"Linear's input width {layers[0].in_features}")
    return Projector(layers=layers, activation=act, pre_norm=(weight, bias), pre_norm_type=kind, pre_norm_eps=eps,
                     merge_size=merge).validate()


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
        self._handles: list[Any] = []
        self._patches: list[int] | None = None  # patches per image of the tower call in flight (Qwen2-VL)

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

    def _score_call(self, feats: torch.Tensor, output: torch.Tensor) -> np.ndarray:
        """Image scores of one projector call's input and output. A Qwen2-VL merger called by its tower gets the
        patches of every image as one [patches, dim] matrix: they are split by the grids the tower was called with
        (one image per grid row), each image scored with its own rows of the output."""
        patches = self._patches
        if feats.ndim == 2 and patches and sum(patches) == feats.shape[0]:
            group = feats.shape[0] // max(1, output.shape[0])  # patches per output row (merge_size**2)
            if group >= 1 and output.shape[0] * group == feats.shape[0] and all(p % group == 0 for p in patches):
                xs = feats.detach().float().cpu().split(patches)
                outs = output.detach().float().cpu().split([p // group for p in patches])
                return np.concatenate([self.detector.score_features(x[None], o[None]) for x, o in
                                       zip(xs, outs, strict=True)])
        x = feats if feats.ndim == 3 else feats[None]
        n = x.shape[0]
        width = output.shape[-1]
        out = output.reshape(n, -1, width) if output.numel() % (n * width) == 0 else None
        return self.detector.score_features(x.detach().float().cpu(), None if out is None else out.detach().float().cpu())

    def _grid_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        self._patches = ([int(t) * int(h) * int(w) for t, h, w in grid.tolist()]
                         if isinstance(grid, torch.Tensor) and grid.ndim == 2 and grid.shape[1] == 3 else None)

    def _hook(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
        feats = args[0] if args else None
        if not isinstance(feats, torch.Tensor) or not isinstance(output, torch.Tensor):
            return
        scores = self._score_call(feats, output)
        self._patches = None
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
        """Register the forward hook on ``model``'s projector (returns self; usable as a context manager). On a
        Qwen2-VL model a pre-hook on the vision tower also records each call's image grids, so the merger's
        flat input is scored image by image."""
        self.detach()
        proj = find_projector_module(model)
        self._handles = [proj.register_forward_hook(self._hook)]
        tower = _merger_tower(model, proj)
        if tower is not None:
            self._handles.append(tower.register_forward_pre_hook(self._grid_hook, with_kwargs=True))
        return self

    def detach(self) -> None:
        """Remove the hooks (no-op when not attached)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._patches = None

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
