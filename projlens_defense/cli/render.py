"""Printing results: JSON or the human-readable text of a command, on stdout or into a file."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..errors import UsageError


def emit(obj: dict | list, fmt: str, text: str, output: Path | None = None) -> None:
    """Print (or write to ``output``) a result as JSON or as the given human-readable text."""
    write(json.dumps(obj, indent=2, default=str) if fmt == "json" else text, output)


def write(body: str, output: Path | None = None) -> None:
    """``body`` on stdout, or into ``output`` (a file that cannot be written is a usage error)."""
    if output is None:
        click.echo(body)
        return
    try:
        output.write_text(body + "\n")
    except OSError as e:
        raise UsageError(f"{output}: cannot write: {e.strerror or e}") from None


def fmt3(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def metrics_line(m: dict) -> str:
    """Clean accuracy, ASR and false activation on one line (empty without metrics)."""
    if not m:
        return ""
    return (f"clean accuracy {fmt3(m.get('clean_accuracy'))}  ASR {fmt3(m.get('asr'))}  "
            f"false activation {fmt3(m.get('false_activation'))}  (n_clean {m.get('n_clean')}, "
            f"n_triggered {m.get('n_triggered')})")
