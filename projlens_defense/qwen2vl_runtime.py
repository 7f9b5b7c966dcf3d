"""Running a Qwen2-VL checkpoint with the LLaVA runtime's interface: the merger is the projector.

Qwen2-VL's projector is the vision tower's last module, ``visual.merger`` (HF ``PatchMerger``): a LayerNorm
``ln_q`` over each patch feature, a merge of ``merge_size**2`` = 4 consecutive patch features (the image
processor orders patches so that each 2x2 block is consecutive) into one row, then ``mlp.0`` -> GELU ->
``mlp.2``. So here:

* **vision features** are the tower's patch features *before* the merger, [N, patches, embed_dim] in the
  processor's patch order (4 patches per LLM image token), float32 on the CPU, computed once and reused;
* **the projector** is ``model.model.visual.merger`` (or any module / :class:`~projlens_defense.projector.Projector`
  with the same math: [N, patches, embed_dim] -> [N * tokens, hidden]);
* **prompts** come from the model's own chat template (``<|vision_start|><|image_pad|><|vision_end|>``),
  with one ``<|image_pad|>`` per merged token;
* **positions** are Qwen2-VL's multimodal RoPE (``get_rope_index`` with ``image_grid_thw`` and
  ``mm_token_type_ids``), both in the loss and in generation, so a fine-tuned merger sees what it sees in
  ``model.generate(**processor(...))``.

Every image in one runtime must give the same patch grid (the zoo's images all do); a batch of mixed sizes is
refused with a clear error, since the features are one [N, patches, dim] tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import UsageError
from .runtime import (
    DEFAULT_TEMPLATE,
    LlavaRuntime,
    _model_type,
)

QWEN2VL_MODEL_TYPES = ("qwen2_vl",)
"""``config.json`` model types this runtime loads (Qwen2.5-VL differs: windowed attention, RMSNorm merger)."""


def model_type(path: str | Path) -> str | None:
    """The ``model_type`` of a model directory's ``config.json`` (None if unreadable); reads JSON only."""
    return _model_type(path)


class Qwen2VLRuntime(LlavaRuntime):
    """A loaded ``Qwen2VLForConditionalGeneration`` with its tokenizer and image processor (see module doc)."""

    model_class = "Qwen2VLForConditionalGeneration"
    family = "Qwen2-VL"
    load_errors = (*LlavaRuntime.load_errors, TypeError)
    lora_targets = ("mlp.0", "mlp.2")
    """The merger's Linear layers, by the names peft matches (``--lora-rank``)."""
    projector_prefix = "visual.merger."
    """Key prefix of the merger's tensors in a saved projector file (what the checkpoint reader detects)."""

    def __init__(self, model, tokenizer, image_processor, template: str = DEFAULT_TEMPLATE,
                 template_source: str | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.template = template
        self.template_source = template_source or ("default" if template == DEFAULT_TEMPLATE else "explicit")
        cfg = model.config
        self.image_token_id = int(cfg.image_token_id)
        self.merge_size = int(cfg.vision_config.spatial_merge_size)
        self.grid: tuple[int, int, int] | None = None  # (t, h, w) patches of every image, set by vision_features
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.eos_id = tokenizer.eos_token_id
        self.bos_id = tokenizer.bos_token_id

    # ---- projector access -------------------------------------------------------------------
    @property
    def projector(self) -> nn.Module:
        return self.model.model.visual.merger

    @projector.setter
    def projector(self, module: nn.Module) -> None:
        self.model.model.visual.merger = module

    @property
    def n_image_tokens(self) -> int:
        """LLM image tokens per image (patches / merge_size**2): of the images seen by :meth:`vision_features`,
        else of a square image at the image processor's ``max_pixels`` (the zoo's images; features computed
        elsewhere, e.g. the cached ones of ``calibrate --generate``, must match it, which the loss checks)."""
        t, h, w = self.image_grid
        return t * h * w // self.merge_size**2

    @property
    def image_grid(self) -> tuple[int, int, int]:
        """The (t, h, w) patch grid of every image: seen by :meth:`vision_features`, else :meth:`default_grid`."""
        return self.grid if self.grid is not None else self.default_grid()

    def default_grid(self) -> tuple[int, int, int]:
        """The (t, h, w) patch grid the image processor makes of a square image of ``max_pixels`` pixels."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            smart_resize,  # no torchvision needed
        )

        ip = self.image_processor
        size = getattr(ip, "size", None) or {}
        size = size if isinstance(size, dict) else dict(size)
        lo = int(size.get("shortest_edge") or getattr(ip, "min_pixels", 0) or 56 * 56)
        hi = int(size.get("longest_edge") or getattr(ip, "max_pixels", 0) or 28 * 28 * 1280)
        patch, merge = int(ip.patch_size), int(ip.merge_size)
        side = int(hi**0.5)
        h, w = smart_resize(side, side, factor=patch * merge, min_pixels=lo, max_pixels=hi)
        return 1, h // patch, w // patch

    # ---- vision ----------------------------------------------------------------------------
    def preprocess(self, images: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """(pixel_values [sum of patches, C*T*p*p], image_grid_thw [N, 3]) as the Qwen2-VL image processor makes them."""
        out = self.image_processor(images=list(images), return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"]

    def pixel_values(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        return self.preprocess(images)[0]

    def _set_grid(self, grid_thw: torch.Tensor) -> None:
        rows = {tuple(int(v) for v in row) for row in grid_thw.tolist()}
        if self.grid is not None:
            rows.add(self.grid)
        if len(rows) != 1:
            raise UsageError(f"Qwen2-VL runtime: images give different patch grids {sorted(rows)}; "
                             "resize them to one size first")
        self.grid = rows.pop()

    def tower_features(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, batched: bool = False) -> torch.Tensor:
        """Pre-merger patch features [N, patches, embed_dim] of preprocessed images (in the tower's dtype/device;
        gradients flow when enabled). By default the tower's own ``forward``; ``batched`` runs the same modules
        with one attention call per layer for the whole batch (:func:`batched_tower_forward`, equal images only)."""
        tower = self.model.model.visual
        first = next(tower.parameters())
        pv, grid = pixel_values.to(device=first.device, dtype=first.dtype), grid_thw.to(first.device)
        if batched:
            return batched_tower_forward(tower, pv, grid)
        hs = tower(pv, grid_thw=grid, return_dict=True).last_hidden_state
        return hs.reshape(len(grid_thw), -1, hs.shape[-1])

    @torch.no_grad()
    def vision_features(self, images: Sequence[np.ndarray], batch_size: int = 256) -> torch.Tensor:
        """Patch features before the merger [N, patches, embed_dim] (float32, on the CPU)."""
        outs = []
        for i in range(0, len(images), batch_size):
            pv, grid = self.preprocess(images[i : i + batch_size])
            self._set_grid(grid)
            outs.append(self.tower_features(pv, grid).float().cpu())
        return torch.cat(outs) if outs else torch.empty(0)

    # ---- text ------------------------------------------------------------------------------
    def _mrope(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mm_token_type_ids, image_grid_thw) for a batch of one-image prompts."""
        types = (input_ids == self.image_token_id).to(torch.int)
        grid = torch.tensor([list(self.image_grid)] * input_ids.shape[0], dtype=torch.long, device=input_ids.device)
        return types, grid

    def position_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Qwen2-VL's 3-D rope positions [3, B, L] (image tokens at their (t, h, w) grid positions)."""
        types, grid = self._mrope(input_ids, attention_mask)
        pos, _ = self.model.model.get_rope_index(input_ids, types, image_grid_thw=grid, attention_mask=attention_mask)
        return pos

    def _check_features(self, features: torch.Tensor, n_prompts: int) -> None:
        if features.ndim != 3 or features.shape[0] != n_prompts:
            raise ValueError(f"expected features [N={n_prompts}, patches, dim], got {tuple(features.shape)}")
        if features.shape[1] != self.n_image_tokens * self.merge_size**2:
            raise ValueError(f"features have {features.shape[1]} patches per image, the prompts hold "
                             f"{self.n_image_tokens} image tokens x {self.merge_size**2}")

    def forward_kwargs(self, features: torch.Tensor, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor) -> dict[str, Any]:
        """Qwen2-VL's multimodal rope positions (without them the image tokens sit at text positions)."""
        self._check_features(features, input_ids.shape[0])
        return {"position_ids": self.position_ids(input_ids, attention_mask)}

    def generate(self, features: torch.Tensor, batch: dict[str, torch.Tensor], projector: nn.Module | None = None,
                 **kwargs: Any) -> Any:
        """HF ``generate`` with the projected image tokens as precomputed image embeddings
        (``mm_encoder_outputs``), so positions are Qwen2-VL's own; the sequences hold the new tokens only."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        proj = projector if projector is not None else self.projector
        first = next(proj.parameters(), None)
        emb_dtype = self.model.get_input_embeddings().weight.dtype
        ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        self._check_features(features, ids.shape[0])
        x = features.to(emb_dtype) if first is None else features.to(device=first.device, dtype=first.dtype)
        img = proj(x).reshape(ids.shape[0], self.n_image_tokens, -1).to(device=self.device, dtype=emb_dtype)
        types, grid = self._mrope(ids, mask)
        out = self.model.generate(
            input_ids=ids, attention_mask=mask, mm_token_type_ids=types, image_grid_thw=grid,
            mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=tuple(img.unbind(0)))},
            pad_token_id=self.pad_id, eos_token_id=self.eos_id, **kwargs)
        if isinstance(out, torch.Tensor):
            return out[:, ids.shape[1]:]
        out.sequences = out.sequences[:, ids.shape[1]:]
        return out


def batched_tower_forward(tower: nn.Module, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
    """The Qwen2-VL vision tower's forward up to (not including) the merger, for images that share one grid,
    as [N, patches, embed_dim].

    HF's non-flash attention loops over the images of a batch in Python (one SDPA call per image per layer); with
    equal grids the per-image attentions are one batched SDPA call. Same modules, same math (the tower's
    patch embedding, 2-D rotary embedding, blocks' norms, qkv, projections and MLPs); tests check it against the
    tower's own output. Used to pretrain the zoo's tower in reasonable time on a CPU.
    """
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision
    from transformers.vision_utils import get_vision_position_ids

    if len({tuple(r) for r in grid_thw.tolist()}) != 1:
        raise ValueError("batched_tower_forward needs images with one patch grid")
    n = len(grid_thw)
    pos = get_vision_position_ids(grid_thw[:1], tower.spatial_merge_size, kwargs={})
    x = tower.patch_embed(pixel_values)  # [N * P, C]
    cos, sin = tower.rotary_pos_emb(x, pos)  # one image's [P, head_dim]
    x = x.reshape(n, -1, x.shape[-1])
    p, c = x.shape[1], x.shape[2]
    for blk in tower.blocks:
        attn = blk.attn
        h = blk.norm1(x)
        q, k, v = attn.qkv(h).reshape(n, p, 3, attn.num_heads, -1).permute(2, 0, 1, 3, 4).unbind(0)
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)  # [N, P, heads, d]
        o = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                             scale=attn.scaling)
        x = x + attn.proj(o.transpose(1, 2).reshape(n, p, c))
        x = x + blk.mlp(blk.norm2(x))
    return x

