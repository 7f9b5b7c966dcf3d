"""What every result records: library versions and machine, so that numbers can be traced."""

from __future__ import annotations

import json
import platform
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from .errors import CheckpointError


def environment() -> dict:
    """Python, platform and versions of the libraries that affect numbers."""
    versions = {}
    for pkg in ("projlens-defense", "torch", "transformers", "peft", "safetensors", "numpy", "scikit-learn"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"python": sys.version.split()[0], "platform": platform.platform(), "versions": versions}


ATTACK_FILE = "attack.json"
"""The record `attack` writes into the checkpoint it makes."""


@dataclass(frozen=True)
class AttackRecord:
    """What a checkpoint's ``attack.json`` says (the fields readers use; ``raw`` is the whole record).

    ``variant``: the backdoor trained in, ``"none"`` for a benign control (``benign``); ``eval_variant``: the
    trigger a benign control is measured with; ``base_model`` / ``train_data``: the paths it was fine-tuned from /
    on; ``config``: the attack configuration (poison rate, seed, lr, epochs...); ``metrics``: clean accuracy, ASR
    and false activation on the test data it was evaluated on (None: not evaluated)."""

    path: Path
    variant: str
    eval_variant: str | None = None
    target: str | None = None
    base_model: str | None = None
    train_data: str | None = None
    variant_params: dict[str, Any] = field(default_factory=dict)
    distributed: Any = None
    benign: bool = False
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def behaviour_target(self) -> str | None:
        """The target text the trained-in behaviour produces (None for a benign control)."""
        behaviour = self.variant_params.get("behaviour")
        return behaviour.get("target") if isinstance(behaviour, dict) else None

    @classmethod
    def from_dict(cls, rec: object, path: Path) -> AttackRecord:
        """Validated: a JSON object whose fields have the types above (a CheckpointError names what is wrong)."""
        if not isinstance(rec, dict):
            raise CheckpointError(f"{path}: not an attack record (expected a JSON object)")
        config = rec.get("config") or {}
        if not isinstance(config, dict):
            raise CheckpointError(f"{path}: `config` is not a JSON object")
        variant = rec.get("variant") or "none"
        fields_ = {"variant": variant, "eval_variant": config.get("eval_variant"), "target": config.get("target"),
                   "base_model": rec.get("base_model"), "train_data": rec.get("train_data")}
        for name, value in fields_.items():
            if value is not None and not isinstance(value, str):
                raise CheckpointError(f"{path}: `{name}` is not a string")
        params = rec.get("variant_params") or {}
        if not isinstance(params, dict):
            raise CheckpointError(f"{path}: `variant_params` is not a JSON object")
        metrics = rec.get("metrics")
        if metrics is not None and not isinstance(metrics, dict):
            raise CheckpointError(f"{path}: `metrics` is not a JSON object")
        benign = rec.get("benign", variant == "none")
        if not isinstance(benign, bool):
            raise CheckpointError(f"{path}: `benign` is not a boolean")
        return cls(path=path, variant_params=params, distributed=rec.get("distributed"), benign=benign,
                   config=config, metrics=metrics, raw=rec, **fields_)


def has_attack_record(checkpoint: Path) -> bool:
    """Whether ``checkpoint`` has an ``attack.json``: a finished `attack` output (its directory appears whole)."""
    return (Path(checkpoint) / ATTACK_FILE).is_file()


def read_attack_record(checkpoint: Path) -> AttackRecord | None:
    """The ``attack.json`` of ``checkpoint`` (None when it has none); a corrupt one is a CheckpointError."""
    path = Path(checkpoint) / ATTACK_FILE
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read the attack record ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
    return AttackRecord.from_dict(rec, path)


def attack_provenance(checkpoint: Path) -> dict[str, Path]:
    """The base model and data an `attack` checkpoint records in its attack.json, where those paths still exist.

    Lets `analyze`, `guard` and `sanitize` default to what the checkpoint was really fine-tuned from
    (e.g. the instructed zoo) instead of the default zoo; anything unreadable just means no default.
    """
    try:
        rec = read_attack_record(checkpoint)
    except CheckpointError:
        return {}
    if rec is None:
        return {}
    out: dict[str, Path] = {}
    base, train = rec.base_model, rec.train_data
    if base is not None and Path(base).exists():
        out["reference"] = Path(base)
    if train is not None and Path(train).is_file():
        out["probe_data"] = Path(train)
        if (Path(train).parent / "test.json").is_file():
            out["test_data"] = Path(train).parent / "test.json"
    return out
