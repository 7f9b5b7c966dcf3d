"""Coloured handwritten digits (scikit-learn's digits, shipped with the package) as 32x32 RGB images."""

from __future__ import annotations

import numpy as np

from .language import COLOURS, SIZES

IMAGE_SIZE = 32
_SCALE = {"small": 2, "big": 3}  # 8x8 digit -> 16x16 or 24x24


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 8x8 digit images (0..16) and their labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32), d.target.astype(np.int64)


def render_digit(glyph: np.ndarray, colour: str, size: str, rng: np.random.Generator) -> np.ndarray:
    """Draw one 8x8 glyph upscaled, coloured, at a jittered position on a dark uniform background."""
    s = _SCALE[size]
    mask = np.kron(glyph / 16.0, np.ones((s, s), dtype=np.float32))
    h = mask.shape[0]
    bg_level = rng.integers(15, 60)
    img = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), bg_level, dtype=np.float32)
    y, x = rng.integers(0, IMAGE_SIZE - h + 1, size=2)
    fg = np.asarray(COLOURS[colour], dtype=np.float32)
    region = img[y : y + h, x : x + h]
    img[y : y + h, x : x + h] = region * (1 - mask[..., None]) + fg * mask[..., None]
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def random_attributes(rng: np.random.Generator) -> tuple[str, str]:
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    size = SIZES[rng.integers(len(SIZES))]
    return colour, size
