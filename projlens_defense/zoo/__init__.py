"""The tiny real LLaVA zoo: vision tower, LLM and projector trained in stages, with its datasets."""

from __future__ import annotations

PRESETS = ("default", "instructed", "micro", "foreign", "qwen2vl")
"""The zoo presets by name (:func:`projlens_defense.zoo.build.config_from_name`; the CLI's ``--zoo`` choices)."""
