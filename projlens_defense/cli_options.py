"""Command-line options shared by several commands (click only: importing this stays cheap)."""

from __future__ import annotations

import click


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
