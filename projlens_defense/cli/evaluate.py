"""`projlens-defense evaluate`: clean accuracy, ASR and false activation of a checkpoint."""

from __future__ import annotations

from pathlib import Path

import click

from .. import api
from .exits import Command
from .options import device_options, format_option, zoo_config_option
from .render import emit, metrics_line


@click.command(cls=Command, param_aliases={"data": "test_data", "zoo_preset": "zoo_name"})
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--variant", default=None, help="Trigger/target to measure ASR with (default: from attack.json).")
@click.option("--data", "test_data", type=click.Path(path_type=Path), default=None, help="Test data (default: the zoo's).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch-size", type=click.IntRange(1, None), default=None,
              help="Images per vision-tower batch and prompts per generation batch (default: 256 and 128).")
@device_options()
@zoo_config_option
@format_option()
def evaluate(checkpoint, variant, test_data, seed, batch_size, device, dtype, zoo_name, zoo_seed, fmt) -> None:
    """Clean accuracy, ASR and false activation of a checkpoint (greedy decoding, batched)."""
    res = api.evaluate(checkpoint, variant, data=test_data, zoo_preset=zoo_name, zoo_seed=zoo_seed, seed=seed,
                       batch_size=batch_size, device=device, dtype=dtype, progress=True)
    emit(res.to_dict(), fmt, metrics_line(res.metrics.to_dict()))
