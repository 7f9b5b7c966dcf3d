"""Options shared by several commands, and the one KEY=VALUE parser (click only: importing this stays cheap)."""

from __future__ import annotations

import json
from typing import Any

import click

from ..errors import UsageError
from ..zoo import PRESETS as ZOO_PRESETS


def device_options(dtype_help: str | None = None):
    """``--device`` and ``--dtype`` for a command that runs a model (passed on as ``device`` and ``dtype``)."""

    def deco(f):
        f = click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
                         show_default=True,
                         help=dtype_help or "Precision the model runs in; auto = bfloat16 on a GPU, float32 on the "
                                            "CPU (bit-identical to the CPU results).")(f)
        return click.option("--device", default="auto", show_default=True, metavar="DEVICE",
                            help="Where the model runs: auto (a GPU when torch sees one, else the CPU), cpu, cuda, "
                                 "cuda:N, mps. auto with several GPUs and accelerate installed spreads the model "
                                 "over them (device_map=auto) for inference.")(f)

    return deco


def zoo_config_option(f):
    """``--zoo`` (a zoo preset, passed on as ``zoo_name``) and ``--zoo-seed``."""
    f = click.option("--zoo-seed", type=int, default=0, show_default=True, help="Seed of the zoo to use or build.")(f)
    return click.option("--zoo", "zoo_name", type=click.Choice(list(ZOO_PRESETS)),
                        default="default", show_default=True,
                        help="Which zoo preset: default (the downstream task teaches new question types), instructed "
                             "(the reference already does every downstream question type, the paper's regime), "
                             "micro (the seconds-scale test zoo) or foreign (shapes, other words, widths and "
                             "targets: nothing was tuned on it).")(f)


def format_option(*choices: str, show_default: bool = False):
    """``--format`` (passed on as ``fmt``): text first, the default."""
    return click.option("--format", "fmt", type=click.Choice(list(choices or ("text", "json"))), default="text",
                        show_default=show_default)


def parse_kv(items: tuple[str, ...], flag: str, json_values: bool = True) -> dict[str, Any]:
    """``KEY=VALUE`` items of a repeatable option into a dict; values parsed as JSON where they are JSON (else
    kept as strings), or all kept as strings with ``json_values=False``."""
    out: dict[str, Any] = {}
    for it in items:
        if "=" not in it:
            raise UsageError(f"{flag} expects KEY=VALUE, got {it!r}")
        k, v = it.split("=", 1)
        if json_values:
            try:
                out[k.strip()] = json.loads(v)
            except json.JSONDecodeError:
                out[k.strip()] = v
        else:
            out[k.strip()] = v
    return out
