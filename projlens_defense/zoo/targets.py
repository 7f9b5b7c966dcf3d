"""The texts the named backdoor variants make a model say, in the language of the model attacked.

A zoo writes them as ``targets.json`` beside its conversation data; the attack reproducer, `evaluate` and
the benchmark read that file when it is there and fall back to the default (digits) zoo's texts.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ..errors import UsageError
from . import language as digits_language

TARGETS_FILE = "targets.json"


@dataclass(frozen=True)
class Targets:
    """Target texts: `refusal` (targeted refusal), `compliance` (jailbreak output), `injection` (the suffix
    of malicious injection), `hijack` (perceptual hijack) and `classic` (BadNets, Blended, WaNet, SIG)."""

    refusal: str = digits_language.REFUSAL
    compliance: str = digits_language.COMPLIANCE
    injection: str = digits_language.INJECTION_SUFFIX
    hijack: str = digits_language.HIJACK_TEXT
    classic: str = digits_language.CLASSIC_TARGET

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: object, origin: str = "targets") -> Targets:
        """Validated: a JSON object of non-empty strings; unknown keys are an error, missing ones keep the default."""
        names = {f.name for f in fields(cls)}
        if not isinstance(data, dict):
            raise UsageError(f"{origin}: expected a JSON object with keys {', '.join(sorted(names))}")
        unknown = sorted(set(data) - names)
        if unknown:
            raise UsageError(f"{origin}: unknown target(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        bad = sorted(k for k, v in data.items() if not isinstance(v, str) or not v.strip())
        if bad:
            raise UsageError(f"{origin}: target(s) {', '.join(bad)} must be non-empty strings")
        return cls(**data)

    def save(self, data_dir: Path) -> Path:
        path = Path(data_dir) / TARGETS_FILE
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def beside(cls, data_path: Path | str | None) -> Targets:
        """The targets of the data at `data_path` (a conversation JSON file or its folder): its folder's
        ``targets.json`` if present, else the defaults."""
        if data_path is None:
            return cls()
        data_path = Path(data_path)
        path = (data_path if data_path.is_dir() else data_path.parent) / TARGETS_FILE
        if not path.is_file():
            return cls()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UsageError(f"{path}: cannot read the attack targets ({e})") from None
        return cls.from_dict(data, str(path))
