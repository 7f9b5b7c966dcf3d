"""Staged training of the tiny LLaVA zoo and its on-disk cache.

Stages as in LLaVA: (1) vision tower pretraining (digit, colour, size and corruption-type heads plus
patch reconstruction on images with generic corruptions, so that features keep what the pixels show, as
a web-trained CLIP does), (2) LLM pretraining on broad templated
text, (3) projector alignment with vision tower and LLM frozen. The result is the *reference model*,
the analogue of LLaVA's public pretrained projector. The downstream task is exported beside it as
LLaVA conversation JSON for the attacks and the benign controls to fine-tune on.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..cache import cache_dir
from ..conversations import Sample, save_conversations
from ..runinfo import environment
from ..runtime import (
    DEFAULT_TEMPLATE,
    IMAGE_SLOT,
    LlavaRuntime,
    quiet_transformers,
    resolve_template,
    template_from_chat_template,
)
from ..training import train_projector
from . import PRESETS
from .domain import HARMFUL, Domain
from .domains import get_domain
from .images import CORRUPTIONS, corrupt
from .model import ModelDims, build_image_processor, build_llava
from .tasks import alignment_samples, downstream_samples, text_corpus
from .tokenizer import build_tokenizer

ZOO_FORMAT_VERSION = 3
"""3: built single-threaded (thread count no longer changes the bytes); the key records torch and the CPU ISA."""


def build_platform() -> dict[str, str]:
    """What still changes a single-threaded build's bytes: the torch release and the CPU kernels it dispatches to."""
    return {"torch": torch.__version__.split("+")[0], "cpu": torch.backends.cpu.get_cpu_capability()}


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run torch on one intra-op thread: float reductions then sum in one order whatever the core count or
    OMP_NUM_THREADS, so a seed gives the same bytes on any machine with the same :func:`build_platform`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class ZooConfig:
    """Everything that determines the zoo; its hash keys the cache."""

    seed: int = 0
    dims: ModelDims = field(default_factory=ModelDims)
    vision_steps: int = 1200
    vision_batch: int = 64
    lm_steps: int = 1000
    lm_batch: int = 64
    lm_lr: float = 3e-3
    n_text: int = 20000
    n_align: int = 3000
    align_epochs: float = 6.0
    align_lr: float = 2e-3
    n_train: int = 800
    n_test: int = 400
    reference_tasks: str = "alignment"
    domain: str = "digits"
    """The images, words, tasks and targets (see :mod:`.domain`): ``digits`` or ``shapes``."""
    family: str = "llava"
    """The model family: ``llava`` (CLIP + Llama + MLP projector) or ``qwen2vl`` (see :mod:`.qwen2vl`)."""

    @classmethod
    def micro(cls, seed: int = 0) -> ZooConfig:
        """A seconds-scale zoo for tests: same code path, smaller model and fewer steps."""
        return cls(seed=seed, dims=ModelDims(vision_hidden=48, vision_layers=2), vision_steps=400, lm_steps=700,
                   n_text=12000, n_align=1200, align_epochs=4.0, n_train=400, n_test=200)

    @classmethod
    def instructed(cls, seed: int = 0) -> ZooConfig:
        """The paper's regime: the reference already does every downstream question type (see `REFERENCE_TASKS`)."""
        return cls(seed=seed, reference_tasks="instructed")

    @classmethod
    def foreign(cls, seed: int = 0) -> ZooConfig:
        """A zoo nothing in the toolkit was tuned on: the ``shapes`` domain (its own images, vocabulary, special
        tokens, chat template, tasks and target texts) at other widths: vision 64 with 8 px patches (16 image
        tokens), projector 64 -> 160 -> 160, LLM 160 wide with 5 heads, CLIP's pixel normalisation."""
        return cls(seed=seed, domain="shapes",
                   dims=ModelDims(vision_hidden=64, vision_layers=3, vision_heads=4, patch_size=8, text_hidden=160,
                                  text_layers=2, text_heads=5),
                   vision_steps=3500, lm_steps=800, lm_batch=48, n_text=16000, n_align=2400, align_epochs=6.0,
                   align_lr=3e-3, n_train=800, n_test=400)

    @classmethod
    def qwen2vl(cls, seed: int = 0) -> ZooConfig:
        """A tiny real Qwen2-VL on the digits domain (see :mod:`.qwen2vl`): vision 64 wide, 4 px patches merged 2x2
        (16 image tokens), merger ln_q(64) -> 256 -> 256 -> 128, LLM 128 wide; sized to build in minutes on 2 cores."""
        return cls(seed=seed, family="qwen2vl",
                   dims=ModelDims(vision_hidden=64, vision_layers=3, vision_heads=4, patch_size=4, text_hidden=128,
                                  text_layers=2, text_heads=4),
                   vision_steps=1200, vision_batch=64, lm_steps=800, n_text=16000, n_align=2400, align_epochs=6.0,
                   align_lr=3e-3)

    def key(self) -> str:
        """Hash of the config, the zoo format and :func:`build_platform` (what determines the bytes)."""
        fields = asdict(self)
        if fields["domain"] == "digits":  # the digits zoos' keys predate the field
            del fields["domain"]
        if fields["family"] == "llava":  # so do the LLaVA zoos' keys
            del fields["family"]
        blob = json.dumps({"v": ZOO_FORMAT_VERSION, "platform": build_platform(), **fields}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class Zoo:
    """Paths of a built zoo."""

    root: Path

    @property
    def reference(self) -> Path:
        return self.root / "reference"

    @property
    def train_data(self) -> Path:
        return self.root / "data" / "train.json"

    @property
    def test_data(self) -> Path:
        return self.root / "data" / "test.json"

    @property
    def manifest(self) -> dict:
        return json.loads((self.root / "zoo.json").read_text())


def get_zoo(config: ZooConfig | None = None, progress: bool = True, rebuild: bool = False,
            calibrate: bool = True, jobs: int = 2) -> Zoo:
    """The zoo for `config`, built on first use and cached (keyed by config, seed and build platform).

    With ``calibrate`` a fresh build ends by calibrating its own reference (``calibrate --generate 8`` on
    its downstream training data, cached under the reference digest), so scans of its fine-tunes always
    find a matching calibration.
    """
    config = config or ZooConfig()
    root = cache_dir() / "zoo" / config.key()
    if not (root / "zoo.json").is_file() or rebuild:
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            build_zoo(config, tmp, progress=progress)
            if root.exists():
                shutil.rmtree(root)
            os.replace(tmp, root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    zoo = Zoo(root)
    if calibrate:
        from ..detectors.calibration import load_calibration
        from ..errors import CheckpointError
        from ..self_calibration import calibration_path, self_calibrate

        path = calibration_path(zoo.reference)
        try:
            fresh = path.is_file() and bool(load_calibration(path).task_subspace)
        except CheckpointError:  # written by another version: refit (the cached fine-tunes are reused)
            fresh = False
        if not fresh:
            self_calibrate(zoo.reference, zoo.train_data, jobs=jobs, progress=progress)
    return zoo


def _patches(pv: torch.Tensor, p: int) -> torch.Tensor:
    b, c, h, w = pv.shape
    x = pv.unfold(2, p, p).unfold(3, p, p)  # b c h/p w/p p p
    return x.permute(0, 2, 3, 1, 4, 5).reshape(b, (h // p) * (w // p), c * p * p)


def _pretrain_vision(rt: LlavaRuntime, cfg: ZooConfig, domain: Domain, pool: np.ndarray, progress: bool) -> dict:
    rng = np.random.default_rng(cfg.seed + 1)
    n = domain.vision_images if cfg.vision_steps > 200 else 1500
    items = rng.choice(pool, size=n)
    attrs = [domain.draw_attributes(int(i), rng) for i in items]
    pairs = [corrupt(domain.render(int(i), a, rng), rng) for i, a in zip(items, attrs, strict=True)]
    imgs = [im for im, _ in pairs]
    y_corrupt = torch.tensor([k for _, k in pairs])
    pv_all = rt.pixel_values(imgs)
    labels = [domain.head_labels(a) for a in attrs]
    y = {name: torch.tensor([lab[name] for lab in labels]) for name, _ in domain.heads}
    tower = rt.model.model.vision_tower
    d = cfg.dims.vision_hidden
    p = cfg.dims.patch_size
    heads = nn.ModuleDict({**{name: nn.Linear(d, k) for name, k in domain.heads},
                           "corruption": nn.Linear(d, len(CORRUPTIONS)), "recon": nn.Linear(d, 3 * p * p)})
    params = list(tower.parameters()) + list(heads.parameters())
    for q in params:
        q.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=2e-3)
    gen = torch.Generator().manual_seed(cfg.seed)
    tower.train()
    ce = nn.functional.cross_entropy
    for _ in tqdm(range(cfg.vision_steps), desc="zoo 1/3 vision tower", disable=not progress, leave=False):
        b = torch.randint(0, n, (cfg.vision_batch,), generator=gen)
        h = tower(pv_all[b], output_hidden_states=True, return_dict=True).hidden_states[-1][:, 1:]
        pooled = h.mean(1)
        loss = None
        for name, _ in domain.heads:  # attribute heads, corruption, reconstruction: summed left to right
            term = ce(heads[name](pooled), y[name][b])
            loss = term if loss is None else loss + term
        loss = loss + ce(heads["corruption"](pooled), y_corrupt[b])
        loss = loss + 4 * nn.functional.mse_loss(heads["recon"](h), _patches(pv_all[b], p))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    tower.eval()
    for q in params:
        q.requires_grad_(False)
    return {"final_loss": float(loss.detach())}


def _pretrain_llm(rt: LlavaRuntime, cfg: ZooConfig, domain: Domain, progress: bool) -> dict:
    tok = rt.tokenizer
    corpus = text_corpus(cfg.n_text, cfg.seed + 2, domain)
    texts = []
    for desc, q, a in corpus:
        if not q:
            texts.append(a)
            continue
        prompt = rt.template.format(question=q).replace(IMAGE_SLOT, desc)  # the words stand where the image will
        texts.append(f"{prompt} {a}")
    head = [rt.bos_id] if rt.bos_id is not None else []  # Qwen2-VL has no BOS
    seqs = [head + tok(t, add_special_tokens=False).input_ids + [rt.eos_id] for t in texts]
    lm = rt.model
    params = list(lm.model.language_model.parameters()) + list(lm.lm_head.parameters())
    for q in params:
        q.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lm_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lm_lr, total_steps=cfg.lm_steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(cfg.seed + 3)
    lm.train()
    for _ in tqdm(range(cfg.lm_steps), desc="zoo 2/3 LLM pretraining", disable=not progress, leave=False):
        b = torch.randint(0, len(seqs), (cfg.lm_batch,), generator=gen).tolist()
        width = max(len(seqs[i]) for i in b)
        ids = torch.full((len(b), width), rt.pad_id)
        mask = torch.zeros_like(ids)
        for r, i in enumerate(b):
            ids[r, : len(seqs[i])] = torch.tensor(seqs[i])
            mask[r, : len(seqs[i])] = 1
        labels = ids.masked_fill(mask == 0, -100)
        loss = lm(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
    lm.eval()
    for q in params:
        q.requires_grad_(False)
    return {"final_loss": float(loss.detach())}


def _accuracy(rt: LlavaRuntime, samples: list[Sample]) -> tuple[float, dict[str, float]]:
    """Exact-match accuracy overall and per question type (harmful requests as one type)."""
    from ..metrics import normalize

    feats = rt.vision_features([s.image for s in samples])
    preds = rt.answer(feats, [s.question for s in samples])
    hits = [normalize(p) == normalize(s.answer) for p, s in zip(preds, samples, strict=True)]
    kinds: dict[str, list[bool]] = {}
    for hit, s in zip(hits, samples, strict=True):
        kinds.setdefault(HARMFUL if s.harmful else s.question, []).append(hit)
    return float(np.mean(hits)), {k: round(float(np.mean(v)), 4) for k, v in kinds.items()}


FAMILY_BUILDERS: dict[str, Callable[..., Path] | str] = {"qwen2vl": "projlens_defense.zoo.qwen2vl:build_qwen2vl_zoo"}
"""Zoo model family -> builder ``(cfg, out, progress) -> out``: ``llava`` is this module's; another family's is
named ``module:function`` (its module builds on this one and is imported only to build such a zoo)."""


def build_zoo(cfg: ZooConfig, out: Path, progress: bool = True) -> Path:
    """Train all stages and write the reference model, the downstream data and `zoo.json` into `out`
    (single-threaded, so the bytes depend only on the config and :func:`build_platform`)."""
    builder = FAMILY_BUILDERS.get(cfg.family)
    if builder is None:
        raise ValueError(f"unknown zoo model family {cfg.family!r} ({', '.join(FAMILY_BUILDERS)})")
    if isinstance(builder, str):
        module, _, attr = builder.partition(":")
        builder = getattr(importlib.import_module(module), attr)
    with single_threaded():
        return builder(cfg, out, progress)


def train_stages(rt: LlavaRuntime, cfg: ZooConfig, domain: Domain, pretrain_vision: Callable[..., dict], projector: str,
                 progress: bool) -> tuple[dict, dict, list, list]:
    """The staged recipe every zoo family shares, on an untrained runtime ``rt``: the family's vision pretraining,
    LLM pretraining, ``projector`` alignment (the other weights frozen) and the evaluation of the reference.
    Returns (stages, timings, downstream train samples, downstream test samples)."""
    train_pool, test_pool = domain.split_pools(cfg.seed)
    timings, stages = {}, {}

    t = time.time()
    stages["vision"] = pretrain_vision(rt, cfg, domain, train_pool, progress)
    timings["vision"] = time.time() - t
    t = time.time()
    stages["llm"] = _pretrain_llm(rt, cfg, domain, progress)
    timings["llm"] = time.time() - t

    t = time.time()
    align = alignment_samples(cfg.n_align, train_pool, cfg.seed + 4, cfg.reference_tasks, domain)
    feats = rt.vision_features([s.image for s in align])
    losses = train_projector(rt, feats, [s.question for s in align], [s.answer for s in align],
                             epochs=cfg.align_epochs, lr=cfg.align_lr, seed=cfg.seed + 5,
                             desc=f"zoo 3/3 {projector} alignment", progress=progress)
    stages["alignment"] = {"final_loss": float(np.mean(losses[-10:]))}
    timings["alignment"] = time.time() - t

    train = downstream_samples(cfg.n_train, train_pool, cfg.seed + 6, "train", domain)
    test = downstream_samples(cfg.n_test, test_pool, cfg.seed + 7, "test", domain)
    t = time.time()
    acc, by_question = _accuracy(rt, alignment_samples(200, test_pool, cfg.seed + 8, cfg.reference_tasks, domain))
    stages["alignment"].update({"accuracy": acc, "accuracy_by_question": by_question})
    stages["downstream_zero_shot_accuracy"], stages["downstream_zero_shot_by_question"] = _accuracy(rt, test)
    timings["evaluation"] = time.time() - t
    return stages, timings, train, test


def _build_llava_zoo(cfg: ZooConfig, out: Path, progress: bool) -> Path:
    quiet_transformers()
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    domain = get_domain(cfg.domain)
    tok = build_tokenizer(domain)
    image_id = tok.convert_tokens_to_ids(domain.language.image)
    model = build_llava(cfg.dims, len(tok), image_id, tok.pad_token_id, tok.bos_token_id, tok.eos_token_id,
                        cfg.seed)
    # the prompt the saved model's chat template renders (what LlavaRuntime.from_pretrained will use), else LLaVA-1.5's
    template, source = ((template_from_chat_template(tok.chat_template, tok, domain.language.image), "chat_template")
                        if tok.chat_template else (DEFAULT_TEMPLATE, "default"))
    rt = LlavaRuntime(model, tok, build_image_processor(domain.image_mean, domain.image_std), template, source)
    stages, timings, train, test = train_stages(rt, cfg, domain, _pretrain_vision, "projector", progress)

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out / "reference")
    tok.save_pretrained(out / "reference")
    rt.image_processor.save_pretrained(out / "reference")
    if resolve_template(out / "reference", tok, image_id)[0] != rt.template:
        raise RuntimeError(f"{out / 'reference'}: the saved model would be prompted differently from its training")
    save_conversations(train, out / "data" / "train.json")
    save_conversations(test, out / "data" / "test.json")
    domain.language.targets.save(out / "data")  # what `attack`, `evaluate` and `bench` aim the variants at
    manifest = {
        "config": asdict(cfg), "key": cfg.key(), "platform": build_platform(), "stages": stages,
        "prompt": {"template": rt.template, "source": rt.template_source},
        "timings_s": {k: round(v, 2) for k, v in timings.items()}, "wall_time_s": round(time.time() - t0, 2),
        "environment": environment(),
    }
    (out / "zoo.json").write_text(json.dumps(manifest, indent=2))
    return out


def config_from_name(name: str, seed: int = 0) -> ZooConfig:
    """`default`, `instructed`, `micro`, `foreign` or `qwen2vl` (:data:`projlens_defense.zoo.PRESETS`)."""
    if name not in PRESETS:
        raise KeyError(name)
    if name == "default":
        return ZooConfig(seed=seed)
    return {"instructed": ZooConfig.instructed, "micro": ZooConfig.micro, "foreign": ZooConfig.foreign,
            "qwen2vl": ZooConfig.qwen2vl}[name](seed=seed)


FAMILY_BUILDERS["llava"] = _build_llava_zoo
