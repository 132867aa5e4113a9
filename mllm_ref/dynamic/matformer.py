"""MatFormer: nested feed-forward blocks, so one set of weights holds several smaller models.

Papers: Devvrit, S. Kudugunta, A. Kusupati, T. Dettmers, K. Chen, I. Dhillon, Y. Tsvetkov, H. Hajishirzi, S. Kakade,
A. Farhadi, P. Jain, MatFormer: Nested Transformer for Elastic Inference, NeurIPS 2024 (arXiv 2310.07707); Gemma 3n
(Google, 2025) ships its smaller model as a MatFormer sub-model. Survey: elastic / dynamic width.

A SwiGLU FFN with ``F`` hidden units is trained so that its first ``m`` units alone also form a good FFN::

    FFN_m(h) = W_down[:, :m] (SiLU(W_gate[:m] h) * W_up[:m] h)          (:func:`matformer_ffn`, the reference)

for ``m`` in MatFormer's granularities ``F * {1/8, 1/4, 1/2, 1}``. The sub-model of granularity ``g`` uses ``m_g``
in every layer; **Mix'n'Match** picks a granularity per layer (e.g. smaller in the middle), which gives many more
models than were trained. The largest sub-model is the full model (tested).

On the tiny VLM the FFN weights are fine-tuned from the bundled model with MatFormer's objective
(:mod:`kernels_torch.tinyvlm.train_dynamic` ``--kind matformer``) and a ``linear`` plug slices them per layer
(:class:`MatFormerLinear`; :func:`load_matformer` gives the model with those weights).

Shapes: T tokens, D width, F FFN hidden units, m kept units.

Deviations from the paper: the decoder is fine-tuned from a trained dense model (only its FFNs), not trained as a
MatFormer from scratch; each step adds the full width's loss to one Mix'n'Match draw (per-layer random widths)
instead of summing all four granularities; the fine-tuned FFN weights ship in float16.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from mllm_ref import _checks
from mllm_ref.nn.activations import silu
from mllm_ref.nn.linear import linear as nn_linear
from mllm_ref.oracle.registry import Technique, register
from mllm_ref.tinyvlm import model as vlm
from mllm_ref.tinyvlm.plugs import Plugs

FRACTIONS = (0.125, 0.25, 0.5, 1.0)


def matformer_ffn(h: np.ndarray, gate: np.ndarray, up: np.ndarray, down: np.ndarray, width: int) -> np.ndarray:
    """The nested SwiGLU FFN with its first ``width`` hidden units.

    Args:
        h: ``float[T, D]`` the normed input.
        gate, up: ``float[F, D]``; down: ``float[D, F]`` (``[out, in]``).
        width: ``m``, 1 <= m <= F.
    Returns:
        ``float[T, D]``.
    """
    h = _checks.float_array(h, "h", ndim=2)
    gate = _checks.float_array(gate, "gate", ndim=2)
    up = _checks.float_array(up, "up", ndim=2)
    down = _checks.float_array(down, "down", ndim=2)
    for name, arr in (("gate", gate), ("up", up), ("down", down)):
        _checks.same_dtype("h", h, name, arr)
    _checks.dim("gate", gate, 1, h.shape[1], "the width of h")
    if up.shape != gate.shape:
        raise ValueError(f"up must have the shape of gate {gate.shape}, got {up.shape}")
    if down.shape != (h.shape[1], gate.shape[0]):
        raise ValueError(f"down must have shape {(h.shape[1], gate.shape[0])}, got {down.shape}")
    width = _checks.integer(width, "width", low=1, high=gate.shape[0])
    return (silu(h @ gate[:width].T) * (h @ up[:width].T)) @ down[:, :width].T


def widths_for(ffn_dim: int, granularity) -> list[int]:
    """Hidden units per layer: one granularity index (0 smallest .. 3 full) for every layer or a list per layer
    (Mix'n'Match)."""
    ffn_dim = _checks.integer(ffn_dim, "ffn_dim", low=1)
    gs = granularity if isinstance(granularity, (list, tuple)) else [granularity]
    return [max(1, int(round(FRACTIONS[_checks.integer(g, "granularity", low=0, high=len(FRACTIONS) - 1)]
                             * ffn_dim))) for g in gs]  # fmt: skip


@dataclass(frozen=True)
class MatFormerLinear:
    """A ``linear`` plug: layer ``i``'s FFN keeps its first ``widths[i]`` hidden units (gate and up rows, down
    columns); every other linear layer is the plain one."""

    widths: tuple[int, ...]

    def __call__(self, x, w, b, name):
        parts = name.split(".")
        if parts[0] == "dec" and parts[-1] in ("gate", "up", "down"):
            m = self.widths[int(parts[1])]
            w = w[:m] if parts[-1] != "down" else w[:, :m]
        return nn_linear(x, w, b)


def load_matformer(model: vlm.TinyVLM | None = None, path: str | Path | None = None) -> vlm.TinyVLM:
    """The tiny VLM with its FFN weights replaced by the MatFormer-trained ones (``weights/dynamic/matformer``)."""
    base = vlm.load() if model is None else model
    folder = vlm.WEIGHTS_DIR / "dynamic" / "matformer" if path is None else Path(path)
    manifest, npz = vlm.read_weights(folder, train="python -m kernels_torch.tinyvlm.train_dynamic --kind matformer")
    params = dict(base.params)
    for k, a in npz.items():
        if k not in params or params[k].shape != a.shape:
            raise ValueError(f"MatFormer weight {k} does not fit the base model")
        params[k] = a.astype(np.float32)
    return replace(base, params=params, manifest={**base.manifest, "matformer": manifest})


def matformer_plugs(model: vlm.TinyVLM, granularity) -> Plugs:
    """Plugs that run ``model`` (from :func:`load_matformer`) at ``granularity`` (one index or one per layer)."""
    g = granularity if isinstance(granularity, (list, tuple)) else [granularity] * model.config.layers
    if len(g) != model.config.layers:
        raise ValueError(f"granularity must give one index per layer ({model.config.layers}), got {len(g)}")
    return Plugs(linear=MatFormerLinear(tuple(widths_for(model.config.ffn_dim, list(g)))))


# ----------------------------------------------------------------------------------------------- registration
_SIZES = {"tiny": (3, 4, 8, 2), "tinyvlm": (16, 128, 352, 88), "gemma": (64, 2048, 8192, 4096)}


def _case(size: str, rng: np.random.Generator) -> dict:
    t, d, f, m = _SIZES[size]
    return {
        "h": rng.standard_normal((t, d)).astype(np.float32),
        "gate": (rng.standard_normal((f, d)) / np.sqrt(d)).astype(np.float32),
        "up": (rng.standard_normal((f, d)) / np.sqrt(d)).astype(np.float32),
        "down": (rng.standard_normal((d, f)) / np.sqrt(f)).astype(np.float32),
        "width": m,
    }


def _variants(model):
    mat = load_matformer(model)
    n = model.config.layers
    rows = []
    for g in (3, 2, 1):
        rows.append((f"MatFormer FFN width {FRACTIONS[g]:g} in every layer", mat, matformer_plugs(mat, g)))
    mix = [3] * 4 + [1] * 4 + [3] * (n - 8)  # Mix'n'Match: a quarter of the FFN in the middle layers
    rows.append(("Mix'n'Match: widths 1, 1/4 in layers 5-8, 1", mat, matformer_plugs(mat, mix)))
    return rows


register(
    Technique(
        id="dynamic.matformer",
        reference=matformer_ffn,
        make_case=_case,
        paper=(
            "Devvrit, S. Kudugunta, A. Kusupati, T. Dettmers, K. Chen, I. Dhillon, Y. Tsvetkov, H. Hajishirzi, "
            "S. Kakade, A. Farhadi, P. Jain, MatFormer: Nested Transformer for Elastic Inference, NeurIPS 2024 "
            "(arXiv 2310.07707)"
        ),
        test_sizes=("tiny", "tinyvlm"),
        bench_sizes=("gemma",),
        chapter="book/06-early-exit.md",
        model_level=True,
        notes="nested SwiGLU FFN (prefix of the hidden units); FFNs fine-tuned from the tiny VLM; Mix'n'Match per layer",
        extra={"model_rows": _variants},
    )
)
