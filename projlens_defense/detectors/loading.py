"""Building a :class:`ScanInput` from checkpoint paths, reading only what the detectors need.

The projector's tensors, the LLM input embedding and ``lm_head``, the final norm and, for the
attention (OV) lens, the value/output projections and input norm of the first few LLM layers:
for LLaVA-1.5-7B that is about 0.7 GB of a 14 GB checkpoint. Nothing is executed; the
tokenizer is parsed as JSON.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from projlens_defense.checkpoint.reader import (
    CheckpointInfo,
    LmReadout,
    check_readout_matrix,
    check_readout_widths,
    detect_format,
    load_lm_readout,
    load_projector,
    load_tokenizer_vocab,
    readout_keys,
    text_config,
    tied_embeddings,
)
from projlens_defense.errors import CheckpointError
from projlens_defense.projector import Projector, all_finite
from projlens_defense.scan_input import OvLayer

__all__ = ["LoadedCheckpoint", "load_checkpoint", "load_ov_layers"]


def _llm_base(embed_key: str | None) -> str | None:
    if embed_key and embed_key.endswith("embed_tokens.weight"):
        return embed_key[: -len("embed_tokens.weight")]
    return None


def _int(x: Any) -> int | None:
    return x if isinstance(x, int) and not isinstance(x, bool) and x > 0 else None


def load_ov_layers(info: CheckpointInfo, embed_key: str | None, n_layers: int,
                   hidden: int | None = None) -> tuple[list[OvLayer], torch.Tensor | None]:
    """The first ``n_layers`` OV layers and the final norm gain, read lazily; ([], None) if absent.

    Layers whose shapes cannot be interpreted (no config for grouped-query attention, odd
    sizes) end the list rather than fail the scan: the lens then uses what it has.
    """
    base = _llm_base(embed_key)
    c = info.tensors
    if base is None or c is None or n_layers <= 0:
        return [], None
    keys = c.keys()
    final_key = f"{base}norm.weight"
    final = c.read(final_key) if final_key in keys else None
    tc = text_config(info.config)
    layers: list[OvLayer] = []
    for i in range(n_layers):
        pre = f"{base}layers.{i}."
        vk, ok, nk = f"{pre}self_attn.v_proj.weight", f"{pre}self_attn.o_proj.weight", f"{pre}input_layernorm.weight"
        if vk not in keys or ok not in keys:
            break
        mv, mo = c.meta(vk), c.meta(ok)
        if (len(mv.shape) != 2 or len(mo.shape) != 2 or not mv.shape[0] or mo.shape[1] % mv.shape[0]
                or mv.shape[1] != mo.shape[0] or (hidden is not None and mv.shape[1] != hidden)):
            break
        group = mo.shape[1] // mv.shape[0]
        head_dim = 0
        if group > 1:
            heads = _int(tc.get("num_attention_heads"))
            head_dim = _int(tc.get("head_dim")) or (mo.shape[1] // heads if heads else 0)
            if not head_dim or mv.shape[0] % head_dim:
                break
        norm = c.read(nk) if nk in keys else None
        if norm is not None and tuple(norm.shape) != (mv.shape[1],):
            norm = None
        layers.append(OvLayer(c.read(vk), c.read(ok), norm, group, head_dim))
    if final is not None and (final.ndim != 1 or (hidden is not None and final.shape[0] != hidden)):
        final = None
    return layers, final


def _check_finite(where: Path, what: str, t: torch.Tensor | None) -> None:
    if t is not None and not all_finite(t):
        raise CheckpointError(f"{where}: {what} has NaN/inf values")


@dataclass(eq=False)
class LoadedCheckpoint:
    """A checkpoint read for scanning: its projector, LLM read-out, OV layers, vocab and provenance.

    Read-out and OV tensors keep their stored dtype (bf16 for most LLMs).
    """

    info: CheckpointInfo
    projector: Projector
    readout: LmReadout | None = None
    ov_layers: list[OvLayer] = field(default_factory=list)
    final_norm: torch.Tensor | None = None
    vocab: list[str] | None = None
    notes: list[str] = field(default_factory=list)
    extra_bytes: int = 0

    @property
    def has_readout(self) -> bool:
        r = self.readout
        return r is not None and (r.embed_tokens is not None or r.lm_head is not None)

    @property
    def bytes_read(self) -> int:
        """Tensor bytes read from the checkpoint's files."""
        return self.info.bytes_read + self.extra_bytes


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(torch.float32)


def _read_head_only(info: CheckpointInfo, ov_layers: int) -> LmReadout | None:
    """lm_head (or a tied embedding) without the input embedding, when the attention lens can run.

    Returns None when that shortcut does not apply (the caller then reads both matrices).
    """
    c = info.tensors
    if c is None or ov_layers <= 0 or not (c.is_main or info.root is None):
        return None
    keys = c.keys()
    ekey, hkey = readout_keys(keys)
    base = _llm_base(ekey)
    if base is None or f"{base}layers.0.self_attn.v_proj.weight" not in keys:
        return None
    if hkey is not None:
        head = c.read(hkey)
        tied = False
    elif tied_embeddings(info.config):
        head, hkey, tied = c.read(ekey), ekey, True  # type: ignore[arg-type]
    else:
        return None
    check_readout_matrix(c, hkey, head.shape)
    embed_shape = c.meta(ekey).shape  # not read, but must agree (as load_lm_readout checks)
    if not tied and len(embed_shape) == 2:
        check_readout_widths(info.root or c.files[0], embed_shape[1], head.shape[1])
    return LmReadout(embed_tokens=head if tied else None, lm_head=head, embed_key=ekey, lm_head_key=hkey, tied=tied)


def load_checkpoint(path: str | os.PathLike[str], readout: bool = True, ov_layers: int = 2) -> LoadedCheckpoint:
    """Detect the format of ``path`` and read its projector and (with ``readout``) the LLM read-out.

    With ``ov_layers`` > 0 and the LLM's first layers present, only ``lm_head`` and those layers'
    value/output maps are read (the attention lens needs nothing else); otherwise the input
    embedding and ``lm_head`` for the plain lens.
    """
    info = detect_format(path)
    proj = load_projector(info)
    out = LoadedCheckpoint(info=info, projector=proj)
    if not readout:
        return out
    ro = _read_head_only(info, ov_layers) or load_lm_readout(info)
    if ro.embed_tokens is not None or ro.lm_head is not None:
        width = (ro.lm_head if ro.lm_head is not None else ro.embed_tokens).shape[1]  # type: ignore[union-attr]
        if width != proj.out_dim:
            out.notes.append(f"LLM width {width} != projector output {proj.out_dim}: logit lens skipped")
        else:
            layers, final = load_ov_layers(info, ro.embed_key, ov_layers, width) if ro.embed_key else ([], None)
            _check_finite(info.path, "final norm", final)  # big matrices: checked on the lens output
            out.readout = ro  # kept in the stored dtype; see base.matmul32
            out.ov_layers = layers
            out.final_norm = _f32(final)
    out.vocab = load_tokenizer_vocab(info)
    if out.vocab is not None and out.readout is not None:
        m = out.readout.lm_head if out.readout.lm_head is not None else out.readout.embed_tokens
        assert m is not None
        if len(out.vocab) > m.shape[0] + 1024:
            raise CheckpointError(f"{Path(path)}: tokenizer has {len(out.vocab)} tokens, the LLM only {m.shape[0]}")
    return out
