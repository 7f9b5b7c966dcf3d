"""Reference-free mode: the lens on the suspect projector's own output-space structure.

Without the reference there is no update to take apart, but a backdoor still leaves its direction
in the last layer: the rank-1 (or low-rank) piece it adds shows up among the top left singular
vectors of W itself, in the bias, and in the output of the projector at rest (zero input). These
directions are read through the same lens as :class:`LogitLensDetector`; what distinguishes a
backdoor is then a token the reading singles out that benign fine-tunes of the same model never
single out (``rf.novelty``, needs a calibration), or, without one, how concentrated it is
(``rf.peak``). Weaker than the reference mode by construction; its power is measured in
``benchmarks/scan_detection.py``.
"""

from __future__ import annotations

from typing import Any

import torch

from projlens_defense.detectors.logit_lens import LogitLensDetector
from projlens_defense.detectors.spectral import spectrum_stats
from projlens_defense.scan_input import ScanInput

__all__ = ["ReferenceFreeDetector"]


class ReferenceFreeDetector(LogitLensDetector):
    """Lens on the top-``k`` left singular vectors of the last weight, its bias and the rest output."""

    name = "reference-free"
    requires_reference = False
    requires_readout = True
    prefix = "rf"

    matrix = "weight"

    def __init__(self, k: int = 8, n_tokens: int = 10, readings: list[str] | None = None,
                 std_floor: float = 0.5, task_rank: int = 4, task_k: int = 5) -> None:
        super().__init__(k=k, n_tokens=n_tokens, readings=readings, std_floor=std_floor, task_rank=task_rank,
                         task_k=task_k)

    def directions(self, inp: ScanInput, basis: torch.Tensor | None = None,
                   ) -> tuple[torch.Tensor, list[str], torch.Tensor, dict[str, Any]]:
        p = inp.projector
        last = p.layers[-1]
        u, s = self.top_directions(inp, basis)
        cols, names = [u], [f"w{i + 1}" for i in range(u.shape[1])]
        if last.bias is not None and float(last.bias.norm()) > 0:
            cols.append(last.bias.float()[:, None])
            names.append("bias")
        with torch.no_grad():
            try:
                rest = p.forward(torch.zeros(p.merge_size**2, p.in_dim)).reshape(-1, p.out_dim).mean(0)
            except (ValueError, RuntimeError):
                rest = None
        if rest is not None and float(rest.norm()) > 0:
            cols.append(rest[:, None])
            names.append("rest")
        fro2 = float(torch.linalg.vector_norm(last.weight)) ** 2
        st = spectrum_stats(s, fro2)
        ev = {"sigma": [round(float(x), 6) for x in s], "weight_spectrum": st}
        d = torch.cat(cols, dim=1)
        if basis is not None:  # the bias and rest output lose their task part too
            d = torch.cat([d[:, : u.shape[1]], d[:, u.shape[1] :] - basis @ (basis.T @ d[:, u.shape[1] :])], dim=1)
        return d, names, s, ev
