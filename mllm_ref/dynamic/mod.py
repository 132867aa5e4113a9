"""Mixture-of-Depths: a router picks the tokens a layer processes; the others pass through on the residual.

Papers: D. Raposo, S. Ritter, B. Richards, T. Lillicrap, P. C. Humphreys, A. Santoro, Mixture-of-Depths: Dynamically
allocating compute in transformer-based language models, 2024 (arXiv 2404.02258); for MLLMs, p-MoD (J. Zhang et al.,
2024, arXiv 2412.04449) and γ-MoD (Y. Luo et al., ICLR 2025, arXiv 2410.13859). Survey: dynamic computation path.

In a MoD layer every token ``i`` gets a router score ``r_i = w . x_i + b``. With capacity ``c`` (a share of the
sequence), only the top ``k = ceil(c * T)`` tokens by score run the block (attention among themselves, causally,
then the FFN); the others keep ``x_i`` unchanged and are not keys of that layer (:func:`mod_route`, the reference:
the routed indices, ties to the lower index). MoD routes every other layer.

The top-k over the sequence is not causal: in decoding the next tokens are unknown. MoD trains a small **causal
predictor** on the router's input to say whether the token would be in the top-k, and decodes with it
(:func:`predict_routed`). With capacity 1 every token runs every layer: the dense model exactly (tested).

:class:`MoDPolicy` is the exit policy for the tiny VLM: it routes the prefill's tokens with the routers and each
decode token with the predictor. The routers and predictors are trained with the model frozen
(:mod:`kernels_torch.tinyvlm.train_dynamic` ``--kind mod``).

Shapes: T tokens, D width, H predictor hidden units.

Deviations from the paper: MoD trains the whole model with the router weight multiplying the block's output (so the
router gets gradients); here the tiny VLM is frozen, the block output is not scaled, and the router is trained to
rank tokens by the block's relative update (how much the layer changes them), the predictor to imitate the router's
top-k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mllm_ref import _checks
from mllm_ref.nn.activations import silu
from mllm_ref.oracle.registry import Technique, register
from mllm_ref.tinyvlm import model as vlm
from mllm_ref.tinyvlm.plugs import ExitPolicy


def mod_route(scores: np.ndarray, capacity: float) -> np.ndarray:
    """``int64[k]``: the sorted indices of the ``k = ceil(capacity * T)`` highest router ``scores`` ``float[T]``
    (ties to the lower index); ``capacity`` in (0, 1]."""
    s = _checks.float_array(scores, "scores", ndim=1)
    capacity = _checks.real(capacity, "capacity", low=0.0, high=1.0, low_open=True)
    k = max(1, math.ceil(capacity * s.size - 1e-9))
    order = np.argsort(-s.astype(np.float64), kind="stable")
    return np.sort(order[:k]).astype(np.int64)


def predict_routed(x: np.ndarray, fc1_weight: np.ndarray, fc1_bias: np.ndarray, fc2_weight: np.ndarray,
                   fc2_bias: np.ndarray) -> np.ndarray:  # fmt: skip
    """The causal predictor's logit per token, ``float[T]`` (``> 0``: route it): ``fc2(SiLU(fc1 x))``.

    ``x``: ``float[T, D]``; ``fc1_weight``: ``[H, D]``; ``fc1_bias``: ``[H]``; ``fc2_weight``: ``[1, H]``;
    ``fc2_bias``: ``[1]``."""
    x = _checks.float_array(x, "x", ndim=2)
    w1 = _checks.float_array(fc1_weight, "fc1_weight", ndim=2)
    b1 = _checks.float_array(fc1_bias, "fc1_bias", ndim=1)
    w2 = _checks.float_array(fc2_weight, "fc2_weight", ndim=2)
    b2 = _checks.float_array(fc2_bias, "fc2_bias", ndim=1)
    _checks.dim("fc1_weight", w1, 1, x.shape[1], "the width of x")
    _checks.dim("fc1_bias", b1, 0, w1.shape[0], "one bias per hidden unit")
    _checks.dim("fc2_weight", w2, 1, w1.shape[0], "the predictor's hidden units")
    return (silu(x @ w1.T + b1) @ w2.T + b2)[:, 0]


@dataclass(frozen=True)
class Routers:
    """Trained MoD routers and causal predictors, by decoder layer."""

    router: dict[int, tuple[np.ndarray, float]]
    predictor: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]
    manifest: dict = field(default_factory=dict)


def load_routers(path: str | Path | None = None) -> Routers:
    """The bundled routers (``weights/dynamic/mod``), read without pickle and checked by sha256."""
    folder = vlm.WEIGHTS_DIR / "dynamic" / "mod" if path is None else Path(path)
    manifest, npz = vlm.read_weights(folder, train="python -m kernels_torch.tinyvlm.train_dynamic --kind mod")
    router, predictor = {}, {}
    for i in manifest["layers"]:
        router[i] = (npz[f"mod.{i}.router.weight"].astype(np.float32), float(npz[f"mod.{i}.router.bias"][0]))
        predictor[i] = tuple(npz[f"mod.{i}.predictor.{n}"].astype(np.float32)
                             for n in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"))  # fmt: skip
    return Routers(router, predictor, manifest)


@dataclass
class MoDPolicy(ExitPolicy):
    """Mixture-of-Depths on the tiny VLM: in the routed layers, the prefill's top ``capacity`` tokens by router
    score run the layer; a decode token runs it when the causal predictor says so. Unrouted tokens are not keys of
    that layer (``fill_skipped = False``)."""

    routers: Routers
    capacity: float = 0.5
    layers: tuple[int, ...] | None = None

    name = "mod"
    fill_skipped = False

    def __post_init__(self):
        _checks.real(self.capacity, "capacity", low=0.0, high=1.0, low_open=True)
        if self.layers is None:
            self.layers = tuple(sorted(self.routers.router))


    def route(self, layer, x, positions):
        if layer not in self.layers or self.capacity >= 1.0:
            return None
        w, b = self.routers.router[layer]
        return mod_route(x @ w + np.float32(b), self.capacity)

    def skip(self, layer, hidden) -> bool:
        if layer not in self.layers or self.capacity >= 1.0:
            return False
        return bool(predict_routed(hidden[None], *self.routers.predictor[layer])[0] <= 0)


# ----------------------------------------------------------------------------------------------- registration
def _case(size: str, rng: np.random.Generator) -> dict:
    t = {"tiny": 5, "tinyvlm": 150, "long": 4096}[size]
    scores = rng.permutation(t).astype(np.float32) + rng.uniform(0, 0.5, t).astype(np.float32)  # no ties
    return {"scores": scores, "capacity": {"tiny": 0.4, "tinyvlm": 0.5, "long": 0.125}[size]}


def _rows(model):
    routers = load_routers()
    return [(f"capacity {c:.0%} in layers 2, 4, ..., 12", MoDPolicy(routers, c).plugs()) for c in (0.75, 0.5)]


register(
    Technique(
        id="dynamic.mod",
        reference=mod_route,
        make_case=_case,
        paper=(
            "D. Raposo, S. Ritter, B. Richards, T. Lillicrap, P. C. Humphreys, A. Santoro, Mixture-of-Depths: "
            "Dynamically allocating compute in transformer-based language models, 2024 (arXiv 2404.02258)"
        ),
        test_sizes=("tiny", "tinyvlm"),
        bench_sizes=("long",),
        compare="exact",
        chapter="book/06-early-exit.md",
        model_level=True,
        notes="top-k routing every other layer, causal predictor in decoding; routers trained on the frozen model",
        extra={"rows": _rows, "question_after_image": True},
    )
)
