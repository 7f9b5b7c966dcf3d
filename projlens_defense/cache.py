"""Where projlens-defense keeps what it builds: zoos and self-generated calibrations."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$PROJLENS_CACHE` if set, else the user cache dir."""
    env = os.environ.get("PROJLENS_CACHE")
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("projlens-defense"))


def calibration_dir() -> Path:
    """Self-generated calibrations, one folder per reference projector digest."""
    return cache_dir() / "calibrations"
