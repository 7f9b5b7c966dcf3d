"""What every result records: library versions and machine, so that numbers can be traced."""

from __future__ import annotations

import platform
import sys
from importlib import metadata


def environment() -> dict:
    """Python, platform and versions of the libraries that affect numbers."""
    versions = {}
    for pkg in ("projlens-defense", "torch", "transformers", "peft", "safetensors", "numpy", "scikit-learn"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"python": sys.version.split()[0], "platform": platform.platform(), "versions": versions}
