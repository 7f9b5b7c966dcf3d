"""The runtime prompts a model with its own chat template, and with LLaVA-1.5's only when it has none."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from projlens_defense.runtime import (
    DEFAULT_TEMPLATE,
    LlavaRuntime,
    find_chat_template,
    template_from_chat_template,
)

WORDS = ["user", "assistant", ":", "what", "is", "this", "?", "system", "be", "brief", "{", "}", "hi"]
SPECIALS = ["<pad>", "<s>", "</s>", "<image>", "<unk>", "<|user|>", "<|assistant|>"]
IMAGE_ID = 3

ROLE_TEMPLATE = (  # a chat-model template: role tokens, the image inside the user turn, BOS rendered by the template
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<|user|>"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %} <image>{% else %} {{ c['text'] }}{% endif %}{% endfor %}"
    " {% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# transformers' llava-1.5-hf chat template: renders exactly LLaVA-1.5's prompt
LLAVA_15_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', "
    "'text') %}{{ content['text'] + ' '}}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def _tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    fast.add_special_tokens({"additional_special_tokens": ["<image>", "<|user|>", "<|assistant|>"]})
    return fast


@pytest.fixture
def model_dir(make_hf_llava):
    """A tiny real LLaVA directory (weights, tokenizer, image processor) without any chat template."""
    from transformers import CLIPImageProcessor

    def make() -> Path:
        d, _ = make_hf_llava(image_token_id=IMAGE_ID, image_seq_length=4)  # 8 px images, 4 px patches
        _tokenizer().save_pretrained(d)
        CLIPImageProcessor(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8}).save_pretrained(d)
        assert find_chat_template(d) == (None, None)
        return d

    return make


def _ids(rt: LlavaRuntime, question: str) -> list[int]:
    return rt.encode([question])["input_ids"][0].tolist()


def _words(*words: str) -> list[int]:
    return [SPECIALS.index(w) if w in SPECIALS else len(SPECIALS) + WORDS.index(w) for w in words]


def test_the_models_own_chat_template_sets_the_prompt(model_dir) -> None:
    d = model_dir()
    (d / "chat_template.jinja").write_text(ROLE_TEMPLATE)
    rt = LlavaRuntime.from_pretrained(d)
    assert rt.template_source == "chat_template:chat_template.jinja"
    assert rt.template == "<|user|> <image> {question} <|assistant|>"  # the BOS the template renders is the runtime's
    n = rt.n_image_tokens
    assert _ids(rt, "what is this ?") == _words("<s>", "<|user|>") + [IMAGE_ID] * n + _words(
        "what", "is", "this", "?", "<|assistant|>")
    # the answer is scored right after the generation prompt, and greedy decoding runs on it
    batch = rt.encode(["what is this ?"], ["hi"])
    assert batch["labels"][0].tolist()[-2:] == _words("hi", "</s>")
    feats = rt.vision_features([np.zeros((8, 8, 3), np.uint8)])
    assert len(rt.answer(feats, ["what is this ?"], max_new_tokens=2)) == 1


@pytest.mark.parametrize("where", ["chat_template.json", "processor_config.json", "tokenizer_config.json"])
def test_chat_template_in_json_files(model_dir, where: str) -> None:
    d = model_dir()
    template = ROLE_TEMPLATE.replace("{{ bos_token }}", "")
    if where == "tokenizer_config.json":  # named templates, as tokenizers may store them
        cfg = json.loads((d / where).read_text())
        cfg["chat_template"] = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": template}]
    else:
        cfg = {"chat_template": template}
    (d / where).write_text(json.dumps(cfg))
    rt = LlavaRuntime.from_pretrained(d)
    assert (rt.template, rt.template_source) == ("<|user|> <image> {question} <|assistant|>", f"chat_template:{where}")


def test_fallback_is_llava_15_when_the_model_has_no_chat_template(model_dir) -> None:
    rt = LlavaRuntime.from_pretrained(model_dir())
    assert (rt.template, rt.template_source) == (DEFAULT_TEMPLATE, "default")
    assert _ids(rt, "what is this ?") == _words("<s>", "user", ":") + [IMAGE_ID] * rt.n_image_tokens + _words(
        "what", "is", "this", "?", "assistant", ":")


def test_llava_15_chat_template_renders_the_default_prompt(model_dir) -> None:
    d = model_dir()
    (d / "chat_template.jinja").write_text(LLAVA_15_TEMPLATE)
    rt = LlavaRuntime.from_pretrained(d)
    assert rt.template == DEFAULT_TEMPLATE and rt.template_source == "chat_template:chat_template.jinja"


def test_unusable_chat_template_falls_back_and_says_why(model_dir) -> None:
    d = model_dir()
    (d / "chat_template.jinja").write_text("{% for m in messages %}{{ m['role'] }}{% endfor %}")  # drops the image
    rt = LlavaRuntime.from_pretrained(d)
    assert rt.template == DEFAULT_TEMPLATE
    assert rt.template_source.startswith("default (chat_template.jinja unusable: ")
    (d / "chat_template.jinja").write_text("{% for m in messages %}")  # not even Jinja
    assert LlavaRuntime.from_pretrained(d).template == DEFAULT_TEMPLATE


def test_explicit_template_wins_and_braces_survive(model_dir) -> None:
    d = model_dir()
    (d / "chat_template.jinja").write_text(ROLE_TEMPLATE)
    rt = LlavaRuntime.from_pretrained(d, template="hi <image> {question}")
    assert (rt.template, rt.template_source) == ("hi <image> {question}", "explicit")
    braces = "{{ '{system} be brief' }} " + ROLE_TEMPLATE.replace("{{ bos_token }}", "")
    t = template_from_chat_template(braces, _tokenizer())
    assert t.format(question="what ?") == "{system} be brief <|user|> <image> what ? <|assistant|>"
