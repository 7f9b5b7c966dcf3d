"""`projlens-defense zoo build` and `zoo path`: the tiny LLaVA zoo (reference model + downstream data)."""

from __future__ import annotations

import click

from .. import api
from .exits import Group
from .options import format_option, zoo_config_option
from .render import emit


@click.group(cls=Group)
def zoo() -> None:
    """Build or locate the tiny LLaVA zoo (reference model + downstream data)."""


@zoo.command("build")
@zoo_config_option
@click.option("--rebuild", is_flag=True, help="Rebuild even if a cached zoo exists.")
@format_option()
def zoo_build(zoo_name: str, zoo_seed: int, rebuild: bool, fmt: str) -> None:
    """Train the zoo (vision tower, LLM, projector alignment) and cache it; prints its manifest."""
    z = api.load_zoo(zoo_name, zoo_seed, rebuild=rebuild)
    m = z.manifest
    text = "\n".join([
        f"zoo:        {z.root}",
        f"reference:  {z.reference}",
        f"data:       {z.train_data} / {z.test_data}",
        f"alignment accuracy: {m['stages']['alignment']['accuracy']:.3f}",
        f"downstream zero-shot accuracy: {m['stages']['downstream_zero_shot_accuracy']:.3f}",
        f"build wall time: {m['wall_time_s']} s  (stages: {m['timings_s']})",
    ])
    emit({"root": str(z.root), "reference": str(z.reference), **m}, fmt, text)


@zoo.command("path")
@zoo_config_option
def zoo_path(zoo_name: str, zoo_seed: int) -> None:
    """Print the reference model directory (last line), building the zoo if needed."""
    z = api.load_zoo(zoo_name, zoo_seed)
    click.echo(f"data: {z.train_data}")
    click.echo(str(z.reference))
