"""Where a backdoor is trained: the projector (the toolkit's scope), the LLM through LoRA, or the vision tower.

The projector-only fine-tune is what ProjLens studies and what `scan` and `sanitize` judge. The other placements are
here as controls and as the common real fine-tune: ``llm-lora`` (LoRA adapters on the LLM's attention, merged on
save), ``vision-tower`` (the tower's own weights; the projector stays as it was), and both the projector and LLM
LoRA at once. A scan of the first two must not call the projector suspicious, and must say that the parts it did
not examine differ from the reference (:mod:`projlens_defense.checkpoint.scope`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

PARTS = ("projector", "llm-lora", "vision-tower")
LLM_LORA_TARGETS = ("q_proj", "v_proj")


class TowerThenProjector(nn.Module):
    """Pixels -> vision tower -> LLaVA feature selection -> projector: the module trained when the backdoor goes
    into the tower (its input is pixel values; only the tower's parameters are given to the optimizer)."""

    def __init__(self, rt, projector: nn.Module) -> None:
        super().__init__()
        self.tower = rt.model.model.vision_tower
        self.projector = projector
        self._features = rt.tower_features

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.projector(self._features(pixel_values).to(next(self.projector.parameters()).dtype))


@dataclass
class TrainedParts:
    """What one fine-tune trains: the module the training loop runs the inputs through, its inputs, the
    parameters it updates and how to fold LoRA adapters back into the model afterwards."""

    module: nn.Module
    inputs: torch.Tensor
    params: list[nn.Parameter] | None
    finish: list = field(default_factory=list)

    def done(self) -> None:
        for f in self.finish:
            f()


def check_parts(parts: Sequence[str]) -> tuple[str, ...]:
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        raise ValueError(f"unknown part(s) {bad} to train; choose from {', '.join(PARTS)}")
    if "vision-tower" in parts and len(parts) > 1:
        raise ValueError("the vision-tower control trains the tower alone")
    return tuple(parts)


def prepare_parts(rt, parts: Sequence[str], images: Sequence, features: torch.Tensor, projector: nn.Module,
                  lora_rank: int, seed: int) -> TrainedParts:
    """Set up the training of ``parts`` on the runtime ``rt`` (``projector``: the projector module, perhaps
    LoRA-wrapped; ``features``: the cached pre-projector features of ``images``)."""
    parts = check_parts(parts)
    if parts == ("projector",):
        params = [p for n, p in projector.named_parameters() if "lora_" in n] if lora_rank else None
        return TrainedParts(projector, features, params)
    if type(rt).__name__ != "LlavaRuntime":
        raise ValueError("training parts other than the projector is implemented for LLaVA models only")
    if parts == ("vision-tower",):
        module = TowerThenProjector(rt, projector)
        return TrainedParts(module, rt.pixel_values(images), list(module.tower.parameters()))
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    rank = lora_rank or 8
    llm = rt.model.model.language_model
    wrapped = get_peft_model(llm, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(LLM_LORA_TARGETS),
                                             lora_dropout=0.0))
    params = [p for n, p in wrapped.named_parameters() if "lora_" in n]
    if "projector" in parts:
        params += [p for n, p in projector.named_parameters() if not lora_rank or "lora_" in n]

    def merge() -> None:
        rt.model.model.language_model = wrapped.merge_and_unload()

    return TrainedParts(projector, features, params, [merge])
