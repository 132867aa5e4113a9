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


def token_map(image: np.ndarray, source: np.ndarray, grid: tuple[int, int], ax=None, title: str | None = None):
    """Draw which patches reach the decoder, and which were merged together.

    Args:
        image: ``uint8[H, W, 3]``.
        source: ``int[rows * cols]``: for each patch the token carrying it, ``-1`` if dropped
            (:attr:`mllm_ref.tinyvlm.plugs.VisualTokens.source`, or ``Trace.source`` after a prefill).
        grid: ``(rows, cols)`` of the patch grid.

    Dropped patches are greyed out; a patch kept alone is left as it is; patches merged into one token share an
    outline colour, and the outline is drawn along the border between different tokens.
    """
    plt = _plt()
    if ax is None:
        _, ax = plt.subplots(figsize=(3, 3))
    rows, cols = grid
    src = np.asarray(source).reshape(rows, cols)
    h, w = image.shape[:2]
    ph, pw = h / rows, w / cols
    shown = image.astype(np.float32) / 255.0
    dropped = np.kron(src < 0, np.ones((int(ph), int(pw)), dtype=bool))
    shown[dropped] = 0.25 * shown[dropped] + 0.75 * 0.12
    ax.imshow(shown, interpolation="nearest")
    counts = np.bincount(src[src >= 0].ravel(), minlength=int(src.max()) + 1 if src.max() >= 0 else 1)
    palette = plt.get_cmap("tab20")
    for r in range(rows):
        for c in range(cols):
            t = src[r, c]
            if t < 0 or counts[t] < 2:
                continue
            color = palette(int(t) % 20)
            y0, x0 = r * ph - 0.5, c * pw - 0.5
            for dr, dc, seg in ((-1, 0, ((x0, x0 + pw), (y0, y0))), (1, 0, ((x0, x0 + pw), (y0 + ph, y0 + ph))),
                                (0, -1, ((x0, x0), (y0, y0 + ph))), (0, 1, ((x0 + pw, x0 + pw), (y0, y0 + ph)))):
                rr, cc = r + dr, c + dc
                if not (0 <= rr < rows and 0 <= cc < cols) or src[rr, cc] != t:
                    ax.plot(*seg, color=color, lw=1.2)
            ax.add_patch(plt.Rectangle((x0, y0), pw, ph, color=color, alpha=0.25, lw=0))
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8)
    return ax


def sweep_plot(rows: list[dict], ax=None, key: str = "accuracy", title: str | None = None):
    """Accuracy (or ``key``) against the kept-token fraction, one line per method (rows of
    :func:`mllm_ref.tinyvlm.tour.sweep`)."""
    plt = _plt()
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.8))
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "baseline"))
    for m in methods:
        pts = sorted((r["kept_fraction"], r[key]) for r in rows if r["method"] == m)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=m)
    base = [r[key] for r in rows if r["method"] == "baseline"]
    if base:
        ax.axhline(base[0], color="black", ls="--", lw=0.8, label="all 144 tokens")
    ax.set_xlabel("visual tokens reaching the decoder's last layer (fraction of 144)")
    ax.set_ylabel(key.replace("_", " "))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    if title:
        ax.set_title(title, fontsize=9)
    return ax


def decode_timeline(traces: dict, ax=None, title: str | None = None):
    """The decode phase of several requests as time lines, one row each (``traces``: name -> :class:`Trace`).

    Plain decoding shows one bar per target step; a speculative strategy shows its drafting (light) and each
    verification by the target (dark), labelled with the tokens it emitted. Time starts at each request's first
    decode event, in milliseconds."""
    plt = _plt()
    if ax is None:
        _, ax = plt.subplots(figsize=(9, 0.7 + 0.55 * len(traces)))
    colors = {"decode": "#4c72b0", "verify": "#4c72b0", "draft": "#dd8452"}
    for row, (name, trace) in enumerate(traces.items()):
        events = trace.timeline
        if not events:
            continue
        t0 = events[0][1]
        for kind, start, end, tokens in events:
            ax.barh(row, (end - start) * 1e3, left=(start - t0) * 1e3, height=0.6, color=colors.get(kind, "grey"),
                    edgecolor="white", linewidth=0.5, alpha=0.55 if kind == "draft" else 1.0)  # fmt: skip
            if kind in ("verify", "decode") and tokens:
                ax.text((start + end - 2 * t0) * 5e2, row, str(tokens), ha="center", va="center", fontsize=7,
                        color="white")  # fmt: skip
    ax.set_yticks(range(len(traces)))
    ax.set_yticklabels(list(traces))
    ax.invert_yaxis()
    ax.set_xlabel("decode time (ms); dark: a target forward (tokens emitted), light: drafting")
    if title:
        ax.set_title(title, fontsize=9)
    return ax
