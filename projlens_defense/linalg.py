"""The one place SVDs are taken: top singular triplets, singular values, bases of column stacks.

Every detector, mitigation and analysis goes through these, so the algorithm used for a matrix of a
given size (exact LAPACK SVD, or a seeded randomized one above :data:`LOWRANK_MIN_DIM`) is chosen here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "LOWRANK_MIN_DIM",
    "column_basis",
    "matmul32",
    "residual_shares",
    "singular_values",
    "svd",
    "top_singular",
]

LOWRANK_MIN_DIM = 512
"""Matrices whose smaller side exceeds this use a randomized truncated SVD (torch.svd_lowrank)."""


def _fast_bf16() -> bool:
    try:
        return bool(torch.cpu._is_avx512_bf16_supported())
    except Exception:  # noqa: BLE001 - private API; be conservative
        return False


FAST_BF16 = _fast_bf16()


def matmul32(m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``m @ x`` as float32. A bf16 ``m`` (LLM weights as stored) multiplies natively where the CPU
    has bf16 kernels (10x faster than converting 32000 x 4096 first), else it is converted."""
    if m.dtype == torch.bfloat16 and FAST_BF16:
        return (m @ x.to(torch.bfloat16)).float()
    return m.float() @ x.float()


def svd(m: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact thin SVD in float32 (float64 input stays float64; a NumPy array is converted): U [out, r],
    S [r], V [in, r] (columns are the right singular vectors)."""
    t = torch.from_numpy(np.ascontiguousarray(m)) if isinstance(m, np.ndarray) else m
    u, s, vh = torch.linalg.svd(t if t.dtype == torch.float64 else t.float(), full_matrices=False)
    return u, s, vh.T


def top_singular(
    m: torch.Tensor, k: int, seed: int = 0, min_dim: int = LOWRANK_MIN_DIM
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-``k`` singular triplets (U [out,k], S [k], V [in,k]) of a 2-D matrix, in float32.

    Exact SVD for small matrices; a seeded randomized SVD (``torch.svd_lowrank`` with 8 extra
    columns of oversampling and 3 power iterations) once ``min(m.shape) > min_dim``.
    """
    m = m.float()
    k = max(1, min(k, min(m.shape)))
    if min(m.shape) <= min_dim:
        u, s, v = svd(m)
        return u[:, :k], s[:k], v[:, :k]
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(m, q=min(min(m.shape), k + 8), niter=3)
    finally:
        torch.random.set_rng_state(state)
    return u[:, :k], s[:k], v[:, :k]


def singular_values(m: torch.Tensor, k: int | None = None, min_dim: int = LOWRANK_MIN_DIM) -> torch.Tensor:
    """Singular values of ``m`` in float32, largest first: all of them, exactly, unless ``k`` is given and
    ``min(m.shape) > min_dim``, where ``torch.svd_lowrank(m, q=k)`` estimates the top ``k``."""
    m = m.float()
    if k is None or min(m.shape) <= min_dim:
        return torch.linalg.svdvals(m)
    return torch.svd_lowrank(m, q=k)[1]


def column_basis(columns: Sequence[torch.Tensor], rank: int) -> torch.Tensor:
    """Orthonormal basis [dim, <= rank] of the top ``rank`` left singular directions of the column stack
    ``cat(columns, dim=1)`` (the directions several matrices share, best first)."""
    u, _, _ = svd(torch.cat(list(columns), dim=1))
    return u[:, :rank].contiguous()


def residual_shares(m: torch.Tensor, left: torch.Tensor, k: int = 4) -> list[float]:
    """Energy shares (of the whole update) of the top ``k`` singular components of ``m`` outside ``left``."""
    rest = m - left @ (left.T @ m)
    total = float(m.pow(2).sum())
    sv = top_singular(rest, k)[1]
    return [float(x) ** 2 / total if total > 0 else 0.0 for x in sv]
