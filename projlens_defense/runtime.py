"""Running a LLaVA checkpoint: image preprocessing, vision features, chat prompts, loss and greedy answers.

Any HF `LlavaForConditionalGeneration` directory works (the zoo is one). The projector is the only
trainable part in this toolkit, so vision features are computed once and reused: every projector
variant (fine-tuned, sanitized, guarded) is evaluated on the same features with the model's own LLM.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import pickle
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import CheckpointError, UsageError

DEFAULT_TEMPLATE = "USER: <image>\n{question} ASSISTANT:"
"""LLaVA-1.5's prompt, used when a model ships no chat template of its own."""

IMAGE_SLOT = "<image>"
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "processor_config.json", "tokenizer_config.json")
"""Where a model directory keeps its chat template, in the order `AutoProcessor` prefers them."""
_QUESTION_SENTINEL = "PROJLENSQUESTIONSLOT"


def _named_default(value) -> str | None:
    """A chat template entry: a string, a {name: template} dict or a [{name, template}] list; the default one."""
    if isinstance(value, str):
        return value or None
    if isinstance(value, list):
        value = {d.get("name"): d.get("template") for d in value if isinstance(d, dict)}
    if isinstance(value, dict):
        found = value.get("default")
        return found if isinstance(found, str) and found else None
    return None


def find_chat_template(path: str | Path) -> tuple[str | None, str | None]:
    """The model directory's own chat template and the file it came from, or (None, None).

    Reads text and JSON only (the template is rendered later in transformers' sandboxed Jinja).
    """
    path = Path(path)
    for name in CHAT_TEMPLATE_FILES:
        f = path / name
        if not f.is_file():
            continue
        try:
            text = f.read_text(encoding="utf-8")
            found = text if name.endswith(".jinja") else _named_default(json.loads(text).get("chat_template"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            continue
        if found and found.strip():
            return found, name
    return None, None


def template_from_chat_template(chat_template: str, tokenizer, image_token: str = IMAGE_SLOT) -> str:
    """The runtime's `str.format` prompt template (with `<image>` and `{question}`) that `chat_template` renders
    for one user turn of an image and a question, with the generation prompt.

    The image slot is where the template writes `image_token` (the tokenizer's image token); a leading BOS
    string is dropped because the runtime prepends the BOS id itself. Raises ValueError when the rendered
    text has no single image slot or loses the question.
    """
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": _QUESTION_SENTINEL}]}]
    try:
        text = tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False,
                                             add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 - any template error (Jinja syntax, raise_exception) means unusable
        raise ValueError(f"the chat template does not render ({type(e).__name__}: {e})") from None
    if not isinstance(text, str):
        raise ValueError("the chat template did not render to text")
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos):
        text = text[len(bos):]
    slots = [t for t in dict.fromkeys((image_token, IMAGE_SLOT)) if t and t in text]
    if not slots or text.count(slots[0]) != 1:
        raise ValueError("the chat template renders no single image slot for one image")
    if text.count(_QUESTION_SENTINEL) != 1:
        raise ValueError("the chat template does not render the question once, verbatim")
    text = text.replace("{", "{{").replace("}", "}}")
    if slots[0] != IMAGE_SLOT:
        if IMAGE_SLOT in text:
            raise ValueError(f"the chat template renders a literal {IMAGE_SLOT} besides the image token")
        text = text.replace(slots[0], IMAGE_SLOT)
    return text.replace(_QUESTION_SENTINEL, "{question}")


def resolve_template(path: str | Path, tokenizer, image_token_id: int) -> tuple[str, str]:
    """(template, source) for a model directory: its own chat template when it has a usable one, else
    :data:`DEFAULT_TEMPLATE`. `source` names the file, or says why the default is used."""
    chat_template, name = find_chat_template(path)
    if chat_template is None:
        return DEFAULT_TEMPLATE, "default"
    image_token = tokenizer.convert_ids_to_tokens(int(image_token_id))
    try:
        return template_from_chat_template(chat_template, tokenizer, image_token or IMAGE_SLOT), f"chat_template:{name}"
    except ValueError as e:
        return DEFAULT_TEMPLATE, f"default ({name} unusable: {e})"


DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""What ``--dtype`` accepts besides ``auto``."""


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """A concrete torch device: ``auto`` (or None) is the first GPU when ``torch.cuda.is_available()``, else the CPU.

    Raises :class:`~projlens_defense.errors.UsageError` for a malformed device or one this machine lacks."""
    if device is None or str(device) == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise UsageError(f"`device`: {device!r} is not a torch device (try auto, cpu, cuda, cuda:1)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"`device` {device}: no CUDA GPU is available here (torch {torch.__version__})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"`device` {device}: only {torch.cuda.device_count()} CUDA GPU(s) here")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError(f"`device` {device}: MPS is not available here")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None = "auto", device: torch.device | None = None,
                  auto: torch.dtype | None = None) -> torch.dtype:
    """A torch dtype: ``auto`` (or None) is ``auto`` when given, else bfloat16 on a GPU and float32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise UsageError(f"`dtype`: {dtype} is not supported; choose from auto, {', '.join(DTYPES)}")
        return dtype
    if dtype is None or dtype == "auto":
        if auto is not None:
            return auto
        return torch.bfloat16 if device is not None and device.type == "cuda" else torch.float32
    key = str(dtype).removeprefix("torch.")
    if key not in DTYPES:
        raise UsageError(f"`dtype`: {dtype!r} is not supported; choose from auto, {', '.join(DTYPES)}")
    return DTYPES[key]


def resolve_placement(device: str | torch.device | None = "auto", dtype: str | torch.dtype | None = "auto",
                      auto_dtype: torch.dtype | None = None) -> tuple[torch.device, torch.dtype]:
    """(device, dtype) for ``--device`` / ``--dtype``: ``auto`` is a GPU and bfloat16 when
    ``torch.cuda.is_available()``, else the CPU and float32 (``auto_dtype`` overrides the auto dtype)."""
    dev = resolve_device(device)
    return dev, resolve_dtype(dtype, dev, auto_dtype)


def _auto_device_map(device: str | torch.device | None) -> bool:
    """Whether ``device="auto"`` spreads the model over the GPUs (``device_map="auto"``): more than one GPU
    and accelerate installed."""
    return (device is None or str(device) == "auto") and torch.cuda.is_available() \
        and torch.cuda.device_count() > 1 and importlib.util.find_spec("accelerate") is not None


def quiet_transformers() -> None:
    """Silence transformers' advisory warnings, which would drown the CLI's own output.

    Does not import transformers (a second of start-up that weight-only commands do without): before the
    import, its verbosity comes from the environment (a user's own ``TRANSFORMERS_VERBOSITY`` is kept);
    once imported, it is set directly."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    warnings.filterwarnings("ignore", category=UserWarning, module="transformers")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def _model_type(path: str | Path) -> str | None:
    """The ``model_type`` of a model directory's ``config.json`` (None if unreadable); reads JSON only."""
    try:
        value = json.loads((Path(path) / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None
    return value if isinstance(value, str) else None


RUNTIMES: dict[str, str] = {"qwen2_vl": "projlens_defense.qwen2vl_runtime:Qwen2VLRuntime"}
"""``config.json`` model type -> ``module:class`` of the runtime for a family other than LLaVA (a plugin by
name: the family's module builds on this one and is imported only when such a model is loaded)."""


def _plugin(spec: str) -> Any:
    """The object a ``module:attribute`` plugin name points at."""
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


class LlavaRuntime:
    """A loaded LLaVA model with its tokenizer and image processor, in eval mode on CPU by default.

    The model may sit on any device (or be spread over several GPUs by ``device_map``): inputs are moved to
    where the model's modules are, and what the runtime returns (vision features, answers) is on the CPU.
    """

    model_class = "LlavaForConditionalGeneration"
    """The transformers class :meth:`from_pretrained` loads (a subclass for another family names its own)."""
    family = "LLaVA"
    load_errors: tuple[type[Exception], ...] = (OSError, ValueError, KeyError, RuntimeError)
    """What transformers raises for a directory that is not a loadable model of this family (-> CheckpointError)."""

    def __init__(self, model, tokenizer, image_processor, template: str = DEFAULT_TEMPLATE,
                 template_source: str | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.template = template  # str.format prompt template with one `<image>` slot and `{question}`
        # where it came from: `chat_template:<file>` (the model's own), `default` (LLaVA-1.5's) or `explicit`
        self.template_source = template_source or ("default" if template == DEFAULT_TEMPLATE else "explicit")
        cfg = model.config
        self.image_token_id = int(getattr(cfg, "image_token_id", None) or cfg.image_token_index)
        self.n_image_tokens = int(getattr(cfg, "image_seq_length", 0) or self._count_image_tokens())
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.eos_id = tokenizer.eos_token_id
        self.bos_id = tokenizer.bos_token_id

    @classmethod
    def from_pretrained(cls, path: str | Path, template: str | None = None, dtype: str | torch.dtype = torch.float32,
                        device: str | torch.device | None = "cpu", device_map: str | dict | None = None) -> LlavaRuntime:
        """Load a model directory. The prompt follows the model's own chat template when it has one
        (see :func:`resolve_template`), LLaVA-1.5's otherwise; an explicit `template` overrides both.

        ``device``: a torch device or ``auto`` (a GPU when one is available, else the CPU); ``dtype``: a torch
        dtype, a name (``float32``, ``bfloat16``, ``float16``) or ``auto`` (bfloat16 on a GPU, float32 on the
        CPU). ``device="auto"`` on a machine with several GPUs and accelerate installed loads with
        ``device_map="auto"`` (inference only); an explicit ``device_map`` is passed to transformers as is.
        The CPU float32 default loads exactly as transformers does without either.
        """
        import transformers
        from transformers import AutoImageProcessor, AutoTokenizer

        spec = RUNTIMES.get(_model_type(path) or "") if cls is LlavaRuntime else None
        if spec is not None:  # another family (e.g. Qwen2-VL, whose merger is the projector)
            return _plugin(spec).from_pretrained(path, template=template, dtype=dtype, device=device, device_map=device_map)
        quiet_transformers()
        path = Path(path)
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path}: not a Hugging Face model directory (no config.json)")
        if device_map is None and _auto_device_map(device):
            device_map = "auto"
        dev = resolve_device(device) if device_map is None else None
        dt = resolve_dtype(dtype, dev or torch.device("cuda"))
        kw: dict[str, Any] = {"dtype": dt}
        if device_map is not None:
            kw["device_map"] = device_map
        elif dev is not None and dev.type != "cpu" and importlib.util.find_spec("accelerate") is not None:
            kw["device_map"] = {"": str(dev)}  # straight onto the device, without a full copy in CPU memory
        try:
            model = getattr(transformers, cls.model_class).from_pretrained(path, **kw)
            tok = AutoTokenizer.from_pretrained(path)
            proc = AutoImageProcessor.from_pretrained(path)
        except pickle.UnpicklingError:  # transformers' torch.load(weights_only=True) met a forbidden global
            raise CheckpointError(f"{path}: refused to load: a weights pickle references globals that torch's "
                                  "weights_only loader blocks, it may try to run code") from None
        except cls.load_errors as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{path}: cannot load as a {cls.family} model ({first})") from None
        if dev is not None and "device_map" not in kw and dev.type != "cpu":
            model = model.to(dev)
        rt = cls(model, tok, proc, template or DEFAULT_TEMPLATE, "explicit" if template is not None else None)
        if template is None:
            rt.template, rt.template_source = resolve_template(path, tok, rt.image_token_id)
        return rt

    # ---- placement -------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where the model takes its inputs (its input embeddings' device)."""
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the model's input embeddings (the LLM's compute dtype)."""
        return self.model.get_input_embeddings().weight.dtype

    # ---- projector access -------------------------------------------------------------------
    @property
    def projector(self) -> nn.Module:
        return self.model.model.multi_modal_projector

    @projector.setter
    def projector(self, module: nn.Module) -> None:
        self.model.model.multi_modal_projector = module

    def _count_image_tokens(self) -> int:
        vc = self.model.config.vision_config
        n = (vc.image_size // vc.patch_size) ** 2
        return n if self.model.config.vision_feature_select_strategy == "default" else n + 1

    # ---- vision ----------------------------------------------------------------------------
    def pixel_values(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        return self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]

    def tower_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The vision tower's pre-projector features of ``pixel_values``, selected as LLaVA does (differentiable:
        the vision-tower backdoor control trains through it)."""
        cfg = self.model.config
        tower = self.model.model.vision_tower
        first = next(tower.parameters(), None)
        where = (first.device, first.dtype) if first is not None else (self.device, self.model.dtype)
        hs = tower(pixel_values.to(device=where[0], dtype=where[1]), output_hidden_states=True,
                   return_dict=True).hidden_states
        layer = cfg.vision_feature_layer
        feats = torch.cat([hs[k] for k in layer], -1) if isinstance(layer, (list, tuple)) else hs[layer]
        return feats[:, 1:] if cfg.vision_feature_select_strategy == "default" else feats

    @torch.no_grad()
    def vision_features(self, images: Sequence[np.ndarray], batch_size: int = 256) -> torch.Tensor:
        """Pre-projector features [N, tokens, vision_dim], selected exactly as LLaVA does (float32, on the CPU)."""
        outs = [self.tower_features(self.pixel_values(images[i : i + batch_size])).float().cpu()
                for i in range(0, len(images), batch_size)]
        return torch.cat(outs) if outs else torch.empty(0)

    # ---- text ------------------------------------------------------------------------------
    def _prompt_ids(self, question: str) -> list[int]:
        before, after = self.template.format(question=question).split(IMAGE_SLOT)
        enc = lambda s: self.tokenizer(s, add_special_tokens=False).input_ids  # noqa: E731
        head = [self.bos_id] if self.bos_id is not None else []
        return head + enc(before) + [self.image_token_id] * self.n_image_tokens + enc(after)

    def encode(self, questions: Sequence[str], answers: Sequence[str] | None = None,
               padding_side: str = "right", device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
        """Token ids, attention mask and (with answers) labels that score only the answer and EOS, on ``device``
        (default: the model's input device)."""
        seqs, labels = [], []
        for i, q in enumerate(questions):
            p = self._prompt_ids(q)
            if answers is None:
                seqs.append(p)
                continue
            a = self.tokenizer(" " + answers[i], add_special_tokens=False).input_ids + [self.eos_id]
            seqs.append(p + a)
            labels.append([-100] * len(p) + a)
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        lab = torch.full((len(seqs), width), -100, dtype=torch.long)
        for i, s in enumerate(seqs):
            sl = slice(0, len(s)) if padding_side == "right" else slice(width - len(s), width)
            ids[i, sl] = torch.tensor(s)
            mask[i, sl] = 1
            if labels:
                lab[i, sl] = torch.tensor(labels[i])
        out = {"input_ids": ids, "attention_mask": mask}
        if labels:
            out["labels"] = lab
        dev = torch.device(device) if device is not None else self.device
        return out if dev.type == "cpu" else {k: v.to(dev) for k, v in out.items()}

    def inputs_embeds(self, input_ids: torch.Tensor, features: torch.Tensor,
                      projector: nn.Module | None = None) -> torch.Tensor:
        """Token embeddings with the image placeholders replaced by the projected vision features.

        The features go to the projector's device and dtype (an external ``projector`` stays where its
        caller keeps it, e.g. a float32 module on the CPU); its output goes to the embeddings' device and dtype.
        """
        proj = projector if projector is not None else self.projector
        table = self.model.get_input_embeddings()
        input_ids = input_ids.to(table.weight.device)
        emb = table(input_ids)
        first = next(proj.parameters(), None)
        x = features.to(emb.dtype) if first is None else features.to(device=first.device, dtype=first.dtype)
        img = proj(x)
        mask = (input_ids == self.image_token_id).unsqueeze(-1)
        return emb.masked_scatter(mask.expand_as(emb),
                                  img.reshape(-1, img.shape[-1]).to(device=emb.device, dtype=emb.dtype))

    def forward_kwargs(self, features: torch.Tensor, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor) -> dict[str, Any]:
        """What the LLM's forward needs besides the embeddings and mask (a family's positions); none for LLaVA."""
        return {}

    def forward(self, features: torch.Tensor, batch: dict[str, torch.Tensor], projector: nn.Module | None = None,
                labels: bool = False) -> Any:
        """The LLM's forward on ``batch`` with ``features`` through ``projector``: logits (and the loss with
        ``labels``). Every caller that needs logits goes through here, so each family's positions are used."""
        ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device)
        family = self.forward_kwargs(features, ids, mask)  # first: it checks the features against the prompts
        embeds = self.inputs_embeds(ids, features, projector)
        extra = {"labels": batch["labels"].to(embeds.device)} if labels else {}
        return self.model(inputs_embeds=embeds, attention_mask=mask.to(embeds.device), **family, **extra)

    def loss(self, features: torch.Tensor, batch: dict[str, torch.Tensor],
             projector: nn.Module | None = None) -> torch.Tensor:
        """Mean cross-entropy of the labelled answer tokens."""
        return self.forward(features, batch, projector, labels=True).loss

    @torch.no_grad()
    def answer(self, features: torch.Tensor, questions: Sequence[str], max_new_tokens: int = 12,
               batch_size: int = 128, projector: nn.Module | None = None, progress: bool = False) -> list[str]:
        """Greedy answers, batched with left padding."""
        from tqdm.auto import tqdm

        answers: list[str] = []
        starts = range(0, len(questions), batch_size)
        for i in tqdm(starts, desc="generate", disable=not progress, leave=False):
            batch = self.encode(questions[i : i + batch_size], padding_side="left")
            gen = self.generate(features[i : i + batch_size], batch, projector, max_new_tokens=max_new_tokens,
                                do_sample=False)
            answers += [t.strip() for t in self.tokenizer.batch_decode(gen.cpu(), skip_special_tokens=True)]
        return answers

    def generate(self, features: torch.Tensor, batch: dict[str, torch.Tensor], projector: nn.Module | None = None,
                 **kwargs: Any) -> Any:
        """HF ``generate`` on a left-padded prompt ``batch`` with ``features`` through ``projector``; the
        sequences hold the new tokens only. Every caller that generates goes through here, so each family's
        positions are used."""
        embeds = self.inputs_embeds(batch["input_ids"], features, projector)
        return self.model.generate(inputs_embeds=embeds, attention_mask=batch["attention_mask"].to(embeds.device),
                                   pad_token_id=self.pad_id, eos_token_id=self.eos_id, **kwargs)
