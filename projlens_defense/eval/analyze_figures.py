"""The `analyze` report's PNG figures: dW spectra, top-k injection / ablation curves, shift vs input norm."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UsageError

__all__ = ["FIGURES", "plot_figures"]

FIGURES = {"spectra": "spectra.png", "curves": "topk_curves.png", "shift": "shift_vs_norm.png"}


def plot_figures(out: Path, rep: dict[str, Any], scatter: dict[str, Any]) -> dict[str, str]:
    """Draw the figures of the report data ``rep`` (and the point clouds ``scatter``) into ``out``; returns
    their file names by figure."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("analyze needs matplotlib for its figures: pip install 'projlens-defense[plot]'") from None
    files = {}
    sp = rep["spectra"]
    n_layers = len(sp["layers"])
    fig, axes = plt.subplots(1, n_layers, figsize=(4.2 * n_layers, 3.4), squeeze=False)
    for i, name in enumerate(sp["layers"]):
        ax = axes[0][i]
        v = sp["suspect"][i]["values"]
        ax.semilogy(range(1, len(v) + 1), v, "o-", ms=3, color="C3", label="suspect")
        for j, layers in enumerate(sp["benign"].values()):
            bv = layers[i]["values"]
            ax.semilogy(range(1, len(bv) + 1), bv, ".--", ms=2, color="C0", alpha=0.6,
                        label="benign" if j == 0 else None)
        ax.set_title(f"dW singular values: {name}", fontsize=9)
        ax.set_xlabel("component")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / FIGURES["spectra"], dpi=110)
    plt.close(fig)
    files["spectra"] = FIGURES["spectra"]

    curves = rep.get("curves") or {}
    if curves:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        for (dname, c), color in zip(curves.items(), ("C3", "C2"), strict=False):
            if c["inject_asr"][0] is not None:
                axes[0].plot(c["k"], c["inject_asr"], "o-", color=color, label=f"inject ASR ({dname})")
                axes[1].plot(c["k"], c["ablate_asr"], "o-", color=color, label=f"ablate ASR ({dname})")
            axes[0].plot(c["k"], c["inject_clean"], "s:", color=color, alpha=0.6, label=f"inject clean acc ({dname})")
            axes[1].plot(c["k"], c["ablate_clean"], "s:", color=color, alpha=0.6, label=f"ablate clean acc ({dname})")
        axes[0].set_title("reference + top-k components of dW")
        axes[1].set_title("fine-tuned - top-k components of dW")
        for ax in axes:
            ax.set_xlabel("k")
            ax.set_ylim(-0.03, 1.03)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / FIGURES["curves"], dpi=110)
        plt.close(fig)
        files["curves"] = FIGURES["curves"]

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for key, color, label in (("probe", "C0", "clean probes"), ("clean", "C2", "clean test"),
                              ("triggered", "C3", "triggered test")):
        d = scatter.get(key)
        if d is None:
            continue
        axes[0].scatter(d["norm"].reshape(-1), d["proj"].reshape(-1), s=2, alpha=0.25, color=color, label=label)
        axes[1].scatter(d["norm"].mean(1), d["proj"].mean(1), s=8, alpha=0.6, color=color, label=label)
    for ax, fit, what in ((axes[0], rep["shift"]["per_token"], "token"), (axes[1], rep["shift"]["per_image"], "image")):
        xs = np.array(ax.get_xlim())
        ax.plot(xs, fit["slope"] * xs + fit["intercept"], "k-", lw=1,
                label=f"fit on probes: slope {fit['slope']:.3g}, R² {fit['r2']:.2f}")
        ax.set_xlabel(f"input feature norm (per {what})")
        ax.set_ylabel("shift along dominant direction")
        ax.legend(fontsize=7, markerscale=3)
    fig.tight_layout()
    fig.savefig(out / FIGURES["shift"], dpi=110)
    plt.close(fig)
    files["shift"] = FIGURES["shift"]
    return files
