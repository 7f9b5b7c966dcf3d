"""Exit codes, set in one place: the library's exceptions and the commands' results mapped to the documented
codes (modelscan's, plus two of ours), and library messages worded with the command's flag names.

0 clean / success, 1 something suspicious, 2 an error, 3 nothing scannable, 4 usage error, 5 inconclusive
(scan: nothing suspicious, but a checkpoint could not be declared clean: no calibration for its model, or no
reference), 6 nothing removed (sanitize: no output written), 130 interrupted.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence

import click

from ..errors import (
    CheckpointError,
    NothingRemovedError,
    NothingScannableError,
    ProjlensError,
    UsageError,
)

EXIT_CLEAN = 0
EXIT_SUSPICIOUS = 1
EXIT_ERROR = 2
EXIT_NOTHING_SCANNABLE = 3
EXIT_USAGE = 4
EXIT_INCONCLUSIVE = 5
EXIT_NOTHING_REMOVED = 6
EXIT_INTERRUPTED = 130

EXCEPTION_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (UsageError, EXIT_USAGE),
    (NothingScannableError, EXIT_NOTHING_SCANNABLE),
    (NothingRemovedError, EXIT_NOTHING_REMOVED),
    (CheckpointError, EXIT_ERROR),
    (ProjlensError, EXIT_ERROR),
)
"""The exit code of each library exception (first match wins)."""


def exception_code(e: BaseException) -> int:
    return next((code for cls, code in EXCEPTION_CODES if isinstance(e, cls)), EXIT_ERROR)


def scan_code(verdicts: Sequence[str]) -> int:
    """1 if anything is suspicious, else 2 on any error, 3 if empty, else 5 if anything is inconclusive, else 0."""
    if not verdicts:
        return EXIT_NOTHING_SCANNABLE
    for verdict, code in (("suspicious", EXIT_SUSPICIOUS), ("error", EXIT_ERROR), ("inconclusive", EXIT_INCONCLUSIVE)):
        if verdict in verdicts:
            return code
    return EXIT_CLEAN


def guard_code(flagged: int, errors: Sequence[str]) -> int:
    """1 if any image is flagged, else 2 if any could not be read, else 0."""
    return EXIT_SUSPICIOUS if flagged else EXIT_ERROR if errors else EXIT_CLEAN


_PARAM = re.compile(r"`([a-z_][a-z0-9_]*)`")


def flag_wording(message: str, command: click.Command | None, aliases: dict[str, str] | None = None) -> str:
    """A library message in the command's terms: each `name` that is (or ``aliases`` maps to) a parameter of the
    command becomes that option's flag (``clean_data`` -> ``--clean-data``); other names lose the backquotes."""
    params = {p.name: p for p in (command.params if command is not None else [])}

    def flag(m: re.Match[str]) -> str:
        name = (aliases or {}).get(m.group(1), m.group(1))
        p = params.get(name)
        if isinstance(p, click.Option):
            return max(p.opts, key=len)
        if isinstance(p, click.Argument):
            return p.human_readable_name
        return m.group(1)

    return _PARAM.sub(flag, message)


class _Worded:
    """Rewords a library error raised while the command runs with the command's flag names (``param_aliases``
    maps library parameter names to this command's where they differ)."""

    def __init__(self, *args, param_aliases: dict[str, str] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.param_aliases = dict(param_aliases or {})

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ProjlensError as e:
            if not hasattr(e, "cli_message"):
                e.cli_message = flag_wording(str(e), self, self.param_aliases)  # type: ignore[attr-defined]
            raise


class Command(_Worded, click.Command):
    """A command whose library errors name its flags."""


class Group(_Worded, click.Group):
    """A command group whose library errors name its flags (and its subcommands')."""

    command_class = Command


class ExitCodeGroup(click.Group):
    """The top-level group: its ``main`` maps the library's exceptions, click's usage errors and the commands'
    returned codes to the documented exit codes; user mistakes end in one line on stderr, never a traceback."""

    command_class = Command
    group_class = Group

    def main(self, *args, **kwargs):  # noqa: D401
        kwargs["standalone_mode"] = False
        try:
            rv = super().main(*args, **kwargs)
            sys.exit(rv if isinstance(rv, int) else EXIT_CLEAN)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.ClickException as e:
            e.show()
            sys.exit(EXIT_USAGE if isinstance(e, click.UsageError) else EXIT_ERROR)
        except click.exceptions.Abort:
            click.echo("aborted", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except ProjlensError as e:
            click.echo(f"error: {getattr(e, 'cli_message', str(e))}", err=True)
            sys.exit(exception_code(e))
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)
