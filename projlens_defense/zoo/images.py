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


CORRUPTIONS = ["clean", "noise", "box", "blend", "stripes", "posterize", "warp"]


def _warp(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    k = int(rng.integers(3, 6))
    ctrl = torch.from_numpy(rng.uniform(-1, 1, size=(1, 2, k, k)).astype(np.float32))
    flow = F.interpolate(ctrl, size=x.shape[:2], mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, x.shape[0]), torch.linspace(-1, 1, x.shape[1]), indexing="ij")
    grid = (torch.stack((xs, ys), 2)[None] + rng.uniform(0.5, 2.0) * flow / x.shape[0]).clamp(-1, 1)
    t = torch.from_numpy(x).permute(2, 0, 1)[None]
    return F.grid_sample(t, grid, align_corners=True)[0].permute(1, 2, 0).numpy()


def corrupt(img: np.ndarray, rng: np.random.Generator, p: float = 0.6) -> tuple[np.ndarray, int]:
    """With probability `p`, one generic corruption; returns the image and its index in CORRUPTIONS.

    A web-trained CLIP knows when a photo is noisy, stamped, blended, striped, posterized or warped;
    pretraining the tiny tower to recognise these generic families gives its features the same
    sensitivity. Parameters are drawn at random, never the attack triggers' settings in particular.
    """
    if rng.random() >= p:
        return img, 0
    x = img.astype(np.float32)
    kind = int(rng.integers(1, len(CORRUPTIONS)))
    if kind == 1:
        x = x + rng.normal(0, rng.uniform(5, 40), size=x.shape)
    elif kind == 2:
        s = int(rng.integers(3, 9))
        y0, x0 = rng.integers(0, IMAGE_SIZE - s + 1, size=2)
        x[y0 : y0 + s, x0 : x0 + s] = rng.integers(0, 256, size=3)
    elif kind == 3:
        a = rng.uniform(0.1, 0.3)
        x = (1 - a) * x + a * rng.uniform(0, 255, size=x.shape)
    elif kind == 4:
        w = np.arange(IMAGE_SIZE)
        x = x + rng.uniform(10, 30) * np.sin(2 * np.pi * w * rng.uniform(2, 8) / IMAGE_SIZE)[None, :, None]
    elif kind == 5:
        step = 255.0 / (rng.integers(2, 5) - 1)
        x = np.round(x / step) * step
    else:
        x = _warp(x, rng)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8), kind
