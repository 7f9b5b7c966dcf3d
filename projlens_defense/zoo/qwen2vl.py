"""The ``qwen2vl`` zoo preset: a tiny real ``Qwen2VLForConditionalGeneration`` trained like the LLaVA zoo.

Why Qwen2-VL and not Qwen2.5-VL: Qwen2-VL's projector is exactly the ``qwen2-vl-merger`` format the checkpoint
reader already supports (LayerNorm ``ln_q`` with a bias, then ``mlp.0`` -> GELU -> ``mlp.2`` over 2x2 merged
patches), and its vision tower is a plain ViT with full attention over each image. Qwen2.5-VL adds windowed
attention in the tower, an RMSNorm ``ln_q`` (no bias) and a SwiGLU tower MLP: more moving parts in the tower, none
in what this toolkit studies (the Projector view handles an RMSNorm merger too, so a 2.5 preset is a small step).

Same domain (coloured digits), tasks and staged recipe as the ``default`` zoo: (1) vision tower pretraining
(attribute, corruption and patch-reconstruction heads) on Qwen2-VL's own patch pipeline (temporal patch 2, patches
ordered for the 2x2 merge), (2) LLM pretraining on the same templated text through the model's chat template,
(3) merger alignment with tower and LLM frozen. What differs is Qwen's: word-level tokenizer with Qwen's special
tokens (``<|im_start|>``, ``<|im_end|>`` as EOS, ``<|endoftext|>`` as pad, no BOS, ``<|vision_start|>``,
``<|image_pad|>``, ``<|vision_end|>``), Qwen2-VL's chat template (with its default system turn), the
``Qwen2VLImageProcessor`` (4 px patches, merge 2: a 32 px image is 8x8 patches, 16 LLM image tokens) and
multimodal RoPE. The processor, tokenizer and chat template are saved with the model, so
``AutoProcessor.from_pretrained`` / ``Qwen2VLForConditionalGeneration.from_pretrained`` of the directory work offline.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..conversations import save_conversations
from ..qwen2vl_runtime import Qwen2VLRuntime
from ..runinfo import environment
from ..runtime import quiet_transformers, resolve_template, template_from_chat_template
from .build import ZooConfig, build_platform, train_stages
from .digits import DIGITS
from .domain import Domain
from .images import CORRUPTIONS, IMAGE_SIZE, corrupt
from .model import ModelDims
from .tokenizer import build_tokenizer

MERGE_SIZE = 2
TEMPORAL_PATCH = 2

QWEN2VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""Qwen2-VL-Instruct's chat template for image + text turns (its default system turn included; video left out)."""

QWEN2VL_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                    "<|image_pad|>", "<|video_pad|>", "<unk>")

QWEN2VL_DIGITS: Domain = replace(
    DIGITS,
    language=replace(
        DIGITS.language, specials=QWEN2VL_SPECIALS, pad="<|endoftext|>", bos=None, eos="<|im_end|>",
        image="<|image_pad|>", unk="<unk>", chat_template=QWEN2VL_CHAT_TEMPLATE,
        extra_fragments=(*DIGITS.language.extra_fragments, "system user assistant", "you are a helpful assistant ."),
    ),
)
"""The digits domain spoken through Qwen2-VL's special tokens and chat template (same images, tasks, targets)."""


def build_qwen2vl(dims: ModelDims, tok, seed: int):
    """A freshly initialised Qwen2-VL-shaped model (merger ``ln_q`` + 2-layer GELU MLP over 2x2 patches, M-RoPE)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN2VL_SPECIALS}
    head_dim = dims.text_hidden // dims.text_heads
    if head_dim % 8:
        raise ValueError(f"text head dim {head_dim} must be a multiple of 8 (M-RoPE sections 1/4, 3/8, 3/8)")
    half = head_dim // 2
    section = [half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8]  # Qwen2-VL's [16, 24, 24] at head dim 128
    cfg = Qwen2VLConfig(
        vision_config={
            "depth": dims.vision_layers, "embed_dim": dims.vision_hidden, "hidden_size": dims.text_hidden,
            "num_heads": dims.vision_heads, "mlp_ratio": 2, "patch_size": dims.patch_size, "in_channels": 3,
            "spatial_merge_size": MERGE_SIZE, "temporal_patch_size": TEMPORAL_PATCH,
        },
        text_config={
            "hidden_size": dims.text_hidden, "intermediate_size": 2 * dims.text_hidden,
            "num_hidden_layers": dims.text_layers, "num_attention_heads": dims.text_heads,
            "num_key_value_heads": dims.text_heads, "vocab_size": len(tok), "max_position_embeddings": 512,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
            "bos_token_id": None, "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"],
        },
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    cfg.pad_token_id, cfg.eos_token_id = ids["<|endoftext|>"], ids["<|im_end|>"]
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(cfg)
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.bos_token_id = None
    return model


def build_image_processor(dims: ModelDims, mean, std):
    """``Qwen2VLImageProcessor`` at the zoo's scale: 4 px patches, merge 2, at most 32x32 pixels (so any square image
    becomes the zoo's 8x8 patch grid, 16 LLM tokens), the domain's pixel normalisation."""
    from transformers import Qwen2VLImageProcessor

    factor = dims.patch_size * MERGE_SIZE
    return Qwen2VLImageProcessor(min_pixels=factor * factor, max_pixels=IMAGE_SIZE * IMAGE_SIZE,
                                 patch_size=dims.patch_size, temporal_patch_size=TEMPORAL_PATCH, merge_size=MERGE_SIZE,
                                 image_mean=list(mean), image_std=list(std))


def _pretrain_vision(rt: Qwen2VLRuntime, cfg: ZooConfig, domain: Domain, pool: np.ndarray, progress: bool) -> dict:
    """Stage 1 on Qwen2-VL's patch pipeline: attribute and corruption heads on the mean patch feature, and each
    patch feature reconstructing its own pixels (the processor's flattened patch rows)."""
    rng = np.random.default_rng(cfg.seed + 1)
    n = domain.vision_images if cfg.vision_steps > 200 else 1500
    items = rng.choice(pool, size=n)
    attrs = [domain.draw_attributes(int(i), rng) for i in items]
    pairs = [corrupt(domain.render(int(i), a, rng), rng) for i, a in zip(items, attrs, strict=True)]
    y_corrupt = torch.tensor([k for _, k in pairs])
    pv_all, grid_all = rt.preprocess([im for im, _ in pairs])
    rt._set_grid(grid_all)
    per = int(grid_all[0].prod())
    pv_all = pv_all.reshape(n, per, -1)  # [images, patches, C * T * p * p]
    labels = [domain.head_labels(a) for a in attrs]
    y = {name: torch.tensor([lab[name] for lab in labels]) for name, _ in domain.heads}
    tower = rt.model.model.visual
    d = cfg.dims.vision_hidden
    heads = nn.ModuleDict({**{name: nn.Linear(d, k) for name, k in domain.heads},
                           "corruption": nn.Linear(d, len(CORRUPTIONS)), "recon": nn.Linear(d, pv_all.shape[-1])})
    params = [p for name, p in tower.named_parameters() if not name.startswith("merger.")] + list(heads.parameters())
    for q in params:
        q.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=2e-3)
    gen = torch.Generator().manual_seed(cfg.seed)
    tower.train()
    ce = nn.functional.cross_entropy
    for _ in tqdm(range(cfg.vision_steps), desc="zoo 1/3 vision tower", disable=not progress, leave=False):
        b = torch.randint(0, n, (cfg.vision_batch,), generator=gen)
        grid = grid_all[b]
        h = rt.tower_features(pv_all[b].reshape(-1, pv_all.shape[-1]), grid, batched=True)
        pooled = h.mean(1)
        loss = None
        for name, _ in domain.heads:
            term = ce(heads[name](pooled), y[name][b])
            loss = term if loss is None else loss + term
        loss = loss + ce(heads["corruption"](pooled), y_corrupt[b])
        loss = loss + 4 * nn.functional.mse_loss(heads["recon"](h), pv_all[b])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    tower.eval()
    for q in params:
        q.requires_grad_(False)
    return {"final_loss": float(loss.detach())}


def build_qwen2vl_zoo(cfg: ZooConfig, out: Path, progress: bool = True) -> Path:
    """All stages of the Qwen2-VL zoo into `out` (the caller runs it single-threaded, see ``build_zoo``)."""
    quiet_transformers()
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    if cfg.domain != "digits":
        raise ValueError(f"the qwen2vl zoo is built on the digits domain, not {cfg.domain!r}")
    domain = QWEN2VL_DIGITS
    tok = build_tokenizer(domain)
    model = build_qwen2vl(cfg.dims, tok, cfg.seed)
    template = template_from_chat_template(QWEN2VL_CHAT_TEMPLATE, tok, domain.language.image)
    rt = Qwen2VLRuntime(model, tok, build_image_processor(cfg.dims, domain.image_mean, domain.image_std), template,
                        "chat_template")
    stages, timings, train, test = train_stages(rt, cfg, domain, _pretrain_vision, "merger", progress)

    out.mkdir(parents=True, exist_ok=True)
    ref = out / "reference"
    model.save_pretrained(ref)
    # The processor's parts, each loadable offline (AutoTokenizer, AutoImageProcessor; the chat template rides with
    # the tokenizer). A Qwen2VLProcessor object itself needs torchvision for its video processor, so it is not built.
    tok.save_pretrained(ref)
    rt.image_processor.save_pretrained(ref)
    if resolve_template(ref, tok, rt.image_token_id)[0] != rt.template:
        raise RuntimeError(f"{ref}: the saved model would be prompted differently from its training")
    save_conversations(train, out / "data" / "train.json")
    save_conversations(test, out / "data" / "test.json")
    domain.language.targets.save(out / "data")
    manifest = {
        "config": asdict(cfg), "key": cfg.key(), "platform": build_platform(), "stages": stages,
        "family": "qwen2vl", "prompt": {"template": rt.template, "source": rt.template_source},
        "timings_s": {k: round(v, 2) for k, v in timings.items()}, "wall_time_s": round(time.time() - t0, 2),
        "environment": environment(),
    }
    (out / "zoo.json").write_text(json.dumps(manifest, indent=2))
    return out

