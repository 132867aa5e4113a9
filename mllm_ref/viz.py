"""Plots for the book and the command line (matplotlib, imported lazily; not part of the NumPy-only core)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    if matplotlib.get_backend().lower() not in ("module://matplotlib_inline.backend_inline", "nbagg", "widget"):
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def show_image(image: np.ndarray, ax=None, title: str | None = None, patch: int | None = None):
    """Draw ``image`` (``uint8[H, W, 3]``); with ``patch``, draw the patch grid the encoder sees."""
    plt = _plt()
    if ax is None:
        _, ax = plt.subplots(figsize=(3, 3))
    ax.imshow(image, interpolation="nearest")
    if patch:
        for t in np.arange(0, image.shape[0] + 1, patch) - 0.5:
            ax.axhline(t, color="white", lw=0.3, alpha=0.4)
            ax.axvline(t, color="white", lw=0.3, alpha=0.4)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8)
    return ax


def attention_overlay(image: np.ndarray, weights: np.ndarray, ax=None, title: str | None = None):
    """Draw ``image`` with ``weights`` (``[grid, grid]``, e.g. one layer's attention to each patch) on top."""
    plt = _plt()
    if ax is None:
        _, ax = plt.subplots(figsize=(3, 3))
    h, w = image.shape[:2]
    ax.imshow(image, interpolation="nearest")
    ax.imshow(weights, cmap="magma", alpha=0.6, extent=(-0.5, w - 0.5, h - 0.5, -0.5), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8)
    return ax


def tour_plot(rows: list[dict], path: str | Path | None = None):
    """Accuracy against prefill FLOPs and KV bytes (ratios to the baseline), one point per tour row."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, label in (
        (axes[0], "prefill_flops_ratio", "prefill FLOPs (× baseline)"),
        (axes[1], "kv_bytes_ratio", "KV-cache bytes (× baseline)"),
    ):
        for r in rows:
            x = r.get(key)
            if x is None:
                continue
            marker = "*" if r["id"] == "baseline" else "o"
            ax.scatter([x], [r["accuracy"]], marker=marker, s=80 if marker == "*" else 30)
            ax.annotate(r["id"], (x, r["accuracy"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(label)
        ax.set_ylabel("held-out VQA accuracy")
        ax.grid(alpha=0.3)
    fig.suptitle("mllm-ref tour: accuracy against cost on the tiny VLM", fontsize=10)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
