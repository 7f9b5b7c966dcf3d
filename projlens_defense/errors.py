"""Error types whose exit codes the CLI maps one to one (modelscan convention)."""

from __future__ import annotations

EXIT_CLEAN = 0
EXIT_SUSPICIOUS = 1
EXIT_ERROR = 2
EXIT_NOTHING_SCANNABLE = 3
EXIT_USAGE = 4
EXIT_INCONCLUSIVE = 5
"""scan: nothing suspicious, but at least one checkpoint could not be declared clean (no calibration for its
model, or the reference-free mode, whose weight-only signals cannot back a clean verdict)."""
EXIT_NOTHING_REMOVED = 6
"""sanitize: the method found nothing to remove; no output was written."""


class ProjlensError(Exception):
    """Base class: a problem the user can act on; the CLI prints it as one line, no traceback."""

    exit_code = EXIT_ERROR


class CheckpointError(ProjlensError):
    """A checkpoint could not be read or is not a valid projector (corrupt, truncated, bad shapes, NaN...)."""

    exit_code = EXIT_ERROR


class NothingScannableError(ProjlensError):
    """The path holds nothing that looks like a projector checkpoint."""

    exit_code = EXIT_NOTHING_SCANNABLE


class NothingRemovedError(ProjlensError):
    """A repair found nothing to remove (or could not tell what to remove): no unchanged copy is written."""

    exit_code = EXIT_NOTHING_REMOVED


class UsageError(ProjlensError):
    """The command was called wrongly (bad option combination, existing output without --force...)."""

    exit_code = EXIT_USAGE
