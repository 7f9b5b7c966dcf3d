"""What input-level and activation detectors read from a :class:`ScanInput`'s :class:`ProbeData`: the clean
probe features, checked (shared by ``input_level`` and ``activation``, which import it rather than each
other)."""

from __future__ import annotations

import torch

from projlens_defense.scan_input import MissingInput, ScanInput

__all__ = ["probe_features"]


def probe_features(inp: ScanInput) -> torch.Tensor:
    """The clean probe features of ``inp`` as float32 [N, tokens, dim]; MissingInput without them."""
    x = inp.probe_data.probes
    if x is None:
        raise MissingInput("needs vision features of clean probe images (ScanInput.probe_data.probes)")
    x = torch.as_tensor(x).float()
    if x.ndim == 2:
        x = x[:, None]
    if x.ndim != 3 or x.shape[0] == 0:
        raise MissingInput(f"ScanInput.probe_data.probes must be [images, tokens, dim], got {tuple(x.shape)}")
    return x
