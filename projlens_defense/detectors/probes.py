"""What input-level and activation detectors read from a :class:`ScanInput`: the ``extras`` keys for clean
probe images and the inputs to judge, and the probe features themselves (shared by ``input_level`` and
``activation``, which import it rather than each other)."""

from __future__ import annotations

import torch

from projlens_defense.scan_input import MissingInput, ScanInput

__all__ = ["EXTRA_INPUTS", "EXTRA_PROBES", "probe_features"]

EXTRA_PROBES = "probes"
"""``ScanInput.extras`` key: vision features of clean probe images [N, tokens, vision_dim]."""
EXTRA_PROBE_IMAGES = "probe_images"
"""``ScanInput.extras`` key: the clean probe images themselves (HxWx3 uint8), for STRIP."""
EXTRA_INPUTS = "inputs"
"""``ScanInput.extras`` key: vision features of the inputs to judge [M, tokens, vision_dim]."""
EXTRA_INPUT_IMAGES = "input_images"
EXTRA_QUESTIONS = "input_questions"
EXTRA_PROBE_QUESTIONS = "probe_questions"
EXTRA_RUNTIME = "runtime"
"""``ScanInput.extras`` key: a :class:`~projlens_defense.runtime.LlavaRuntime` (STRIP runs the LLM)."""


def probe_features(inp: ScanInput, key: str = EXTRA_PROBES) -> torch.Tensor:
    """The clean probe features of ``inp`` as float32 [N, tokens, dim]; MissingInput without them."""
    x = inp.extras.get(key)
    if x is None:
        raise MissingInput(f"needs vision features of clean probe images (ScanInput.extras[{key!r}])")
    x = torch.as_tensor(x).float()
    if x.ndim == 2:
        x = x[:, None]
    if x.ndim != 3 or x.shape[0] == 0:
        raise MissingInput(f"extras[{key!r}] must be [images, tokens, dim], got {tuple(x.shape)}")
    return x
