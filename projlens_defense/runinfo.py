"""What every result records: library versions and machine, so that numbers can be traced."""

from __future__ import annotations

import json
import platform
import sys
from importlib import metadata
from pathlib import Path


def environment() -> dict:
    """Python, platform and versions of the libraries that affect numbers."""
    versions = {}
    for pkg in ("projlens-defense", "torch", "transformers", "peft", "safetensors", "numpy", "scikit-learn"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"python": sys.version.split()[0], "platform": platform.platform(), "versions": versions}


def attack_provenance(checkpoint: Path) -> dict[str, Path]:
    """The base model and data an `attack` checkpoint records in its attack.json, where those paths still exist.

    Lets `analyze`, `guard` and `sanitize` default to what the checkpoint was really fine-tuned from
    (e.g. the instructed zoo) instead of the default zoo; anything unreadable just means no default.
    """
    try:
        rec = json.loads((checkpoint / "attack.json").read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(rec, dict):
        return {}
    out: dict[str, Path] = {}
    base, train = rec.get("base_model"), rec.get("train_data")
    if isinstance(base, str) and Path(base).exists():
        out["reference"] = Path(base)
    if isinstance(train, str) and Path(train).is_file():
        out["probe_data"] = Path(train)
        if (Path(train).parent / "test.json").is_file():
            out["test_data"] = Path(train).parent / "test.json"
    return out
