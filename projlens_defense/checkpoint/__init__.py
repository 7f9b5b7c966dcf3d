"""Checkpoint I/O: format detection, hardened lazy readers and same-format writers."""

from projlens_defense.checkpoint.reader import (
    FORMATS,
    CheckpointInfo,
    LmReadout,
    detect_format,
    load_lm_readout,
    load_projector,
    load_tokenizer_vocab,
)
from projlens_defense.checkpoint.safetensors_io import parse_header
from projlens_defense.checkpoint.writer import StagedWrite, write_projector

__all__ = [
    "FORMATS",
    "CheckpointInfo",
    "LmReadout",
    "detect_format",
    "load_lm_readout",
    "load_projector",
    "load_tokenizer_vocab",
    "parse_header",
    "StagedWrite",
    "write_projector",
]
