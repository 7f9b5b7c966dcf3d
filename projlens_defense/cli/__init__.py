"""The `projlens-defense` command line: a leaf over :mod:`projlens_defense.api` that nothing else imports.

One module per command or command group (scan + calibrate, sanitize, attack + variants, evaluate, analyze, guard,
bench, zoo); shared options and the one KEY=VALUE parser in :mod:`.options`, printing in :mod:`.render`, exit
codes (and the flag wording of library errors) in :mod:`.exits`. A new command: a module here with a
``click.command(cls=Command)`` calling an api function, and one ``main.add_command`` line below.
"""

from __future__ import annotations

import click

from .analyze import analyze
from .attack import attack, variants
from .bench import bench
from .evaluate import evaluate
from .exits import ExitCodeGroup
from .guard import guard
from .sanitize import sanitize
from .scan import calibrate, scan
from .zoo import zoo


@click.group(cls=ExitCodeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="projlens-defense")
def main() -> None:
    """Find and remove backdoors in the vision-language projector of LLaVA-style models.

    Everything runs on CPU; the default model is a tiny real LLaVA (the zoo) built locally on first use.
    """
    from ..runtime import quiet_transformers

    quiet_transformers()  # before any command imports transformers classes (their advisories drown our output)


for _command in (zoo, attack, evaluate, variants, scan, calibrate, bench, analyze, guard, sanitize):
    main.add_command(_command)

__all__ = ["main"]
