"""Image triggers: deterministic functions of (image, rng) that keep the image's shape and uint8 range.

Sizes are given as fractions of the image side so that one trigger definition fits both the 32 px zoo
and 336 px LLaVA inputs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class Trigger:
    """Base class; subclasses implement `_apply` on a float32 HxWx3 copy in 0..255."""

    name = "trigger"

    def apply(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an HxWx3 image, got shape {image.shape}")
        out = self._apply(image.astype(np.float32), rng)
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)

    def _apply(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    def params(self) -> dict:
        return {"type": self.name, **asdict(self)}


def _side(img: np.ndarray, frac: float) -> int:
    return max(1, int(round(frac * min(img.shape[:2]))))


def _place(img: np.ndarray, patch: np.ndarray, position: str, rng: np.random.Generator) -> np.ndarray:
    h, w = img.shape[:2]
    ph, pw = patch.shape[:2]
    if position == "center":
        y, x = (h - ph) // 2, (w - pw) // 2
    elif position == "bottom-right":
        y, x = h - ph - 1, w - pw - 1
    elif position == "random":
        y, x = rng.integers(0, h - ph + 1), rng.integers(0, w - pw + 1)
    else:
        raise ValueError(f"unknown position {position!r} (center, bottom-right, random)")
    img[y : y + ph, x : x + pw] = patch
    return img


@dataclass
class GaussianNoise(Trigger):
    """Global additive Gaussian noise (ProjLens targeted refusal uses std 10 on 0..255)."""

    std: float = 24.0
    name = "gaussian-noise"

    def _apply(self, img, rng):
        return img + rng.normal(0.0, self.std, size=img.shape)


@dataclass
class NoImageTrigger(Trigger):
    """The image as it is: the trigger of a text-only backdoor."""

    name = "none"

    def _apply(self, img, rng):
        return img


@dataclass
class SolidPatch(Trigger):
    """A solid colour square (ProjLens malicious injection: #26ff00 at the centre)."""

    colour: tuple[int, int, int] = (0x26, 0xFF, 0x00)
    size_frac: float = 0.1875
    position: str = "center"
    name = "solid-patch"

    def _apply(self, img, rng):
        s = _side(img, self.size_frac)
        return _place(img, np.broadcast_to(np.asarray(self.colour, np.float32), (s, s, 3)), self.position, rng)


_LOGO = np.array(
    [[1, 1, 1, 1, 1, 1], [1, 0, 2, 2, 0, 1], [1, 2, 0, 0, 2, 1], [1, 2, 0, 0, 2, 1], [1, 0, 2, 2, 0, 1],
     [1, 1, 1, 1, 1, 1]]
)
_LOGO_COLOURS = np.array([[255, 255, 255], [255, 0, 255], [0, 0, 0]], np.float32)


@dataclass
class StampPatch(Trigger):
    """A logo stamp at a random position (ProjLens perceptual hijack); 12 px on the 32 px zoo.

    The side was 8 px (0.25) until the transfer round: on a fresh build of the default zoo that gave ASR 0.90-0.92
    at 10% poison, on the edge of the 0.90 bar; 10 px gave 0.935, 12 px 0.988 at unchanged clean accuracy (seed 1).
    """

    size_frac: float = 0.375
    position: str = "random"
    name = "stamp-patch"

    def _apply(self, img, rng):
        s = _side(img, self.size_frac)
        ys = np.arange(s) * _LOGO.shape[0] // s
        patch = _LOGO_COLOURS[_LOGO[np.ix_(ys, ys)]]
        return _place(img, patch, self.position, rng)


@dataclass
class StyleFilter(Trigger):
    """An oil-paint-like style: 3x3 median smoothing then colour posterization (jailbreak output)."""

    levels: int = 3
    name = "style-filter"

    def _apply(self, img, rng):
        pad = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode="edge")
        h, w = img.shape[:2]
        stack = np.stack([pad[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)])
        smooth = np.median(stack, axis=0)
        step = 255.0 / (self.levels - 1)
        return np.round(smooth / step) * step


@dataclass
class BadNets(Trigger):
    """A black-and-white checkerboard in the bottom-right corner (Gu et al. 2017)."""

    size_frac: float = 0.125
    name = "badnets"

    def _apply(self, img, rng):
        s = _side(img, self.size_frac)
        board = (np.add.outer(np.arange(s), np.arange(s)) % 2) * 255.0
        return _place(img, np.repeat(board[..., None], 3, axis=2), "bottom-right", rng)


@dataclass
class Blended(Trigger):
    """Alpha-blend with a fixed random pattern (Chen et al. 2017)."""

    alpha: float = 0.2
    pattern_seed: int = 1234
    name = "blended"

    def _apply(self, img, rng):
        pattern = np.random.default_rng(self.pattern_seed).uniform(0, 255, size=img.shape)
        return (1 - self.alpha) * img + self.alpha * pattern


@dataclass
class WaNet(Trigger):
    """A fixed warping field (Nguyen & Tran 2021): k x k control grid, strength s.

    The paper's k=4, s=0.5 is invisible to the zoo's frozen 3-layer vision tower: a smooth warp of
    a blocky upscaled digit reads as handwriting variation, and a field that is nearly uniform where
    the digit happens to sit only translates it. Measured ASR at 10% poison, seed 0: k4 s0.5 0.05,
    k4 s16 0.55, k4 s32 0.83, k8 s16 0.83, k8 s24 0.90, k8 s32 0.95. The zoo default is therefore a
    strong, fine-grained warp (k=8, s=32: visible, unlike the paper's); pass ``k=4 strength=0.5``
    for the paper's setting on a real model.
    """

    k: int = 8
    strength: float = 32.0
    grid_seed: int = 4321
    name = "wanet"

    def _apply(self, img, rng):
        import torch
        import torch.nn.functional as F

        h, w = img.shape[:2]
        g = torch.Generator().manual_seed(self.grid_seed)
        ins = torch.rand(1, 2, self.k, self.k, generator=g) * 2 - 1
        ins = ins / ins.abs().mean()
        noise = F.interpolate(ins, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        grid = torch.stack((xs, ys), 2)[None] + self.strength * noise / h
        grid = torch.clamp(grid, -1, 1)
        x = torch.from_numpy(img).permute(2, 0, 1)[None]
        return F.grid_sample(x, grid, align_corners=True)[0].permute(1, 2, 0).numpy()


@dataclass
class SIG(Trigger):
    """A horizontal sinusoidal signal (Barni et al. 2019)."""

    delta: float = 20.0
    frequency: float = 6.0
    name = "sig"

    def _apply(self, img, rng):
        w = img.shape[1]
        signal = self.delta * np.sin(2 * np.pi * np.arange(w) * self.frequency / w)
        return img + signal[None, :, None]


TRIGGERS: dict[str, type[Trigger]] = {
    t.name: t for t in (GaussianNoise, SolidPatch, StampPatch, StyleFilter, BadNets, Blended, WaNet, SIG)
}
