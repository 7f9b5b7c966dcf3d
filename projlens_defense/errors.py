"""The library's exceptions. Each is a problem the user can act on, told in one line; messages name the Python
parameters they are about in backquotes (`clean_data`). The CLI (:mod:`projlens_defense.cli.exits`) alone maps
them to exit codes and rewords parameter names as its flags."""

from __future__ import annotations


class ProjlensError(Exception):
    """Base class: a problem the user can act on; the CLI prints it as one line, no traceback."""


class CheckpointError(ProjlensError):
    """A checkpoint could not be read or is not a valid projector (corrupt, truncated, bad shapes, NaN...)."""


class NothingScannableError(ProjlensError):
    """The path holds nothing that looks like a projector checkpoint."""


class NothingRemovedError(ProjlensError):
    """A repair found nothing to remove (or could not tell what to remove): no unchanged copy is written."""


class UsageError(ProjlensError, ValueError):
    """A function was called wrongly: a bad argument or combination of arguments, an existing output without
    `force`, a path that does not exist (also a ValueError)."""
