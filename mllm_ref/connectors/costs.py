"""The connectors' complexity table, counted rather than asserted.

The surveys compare connectors by order of growth in the number ``N`` of patch features: a projector feeds all
``N`` tokens to the LLM, whose prefill grows as ``O(L (N + M)^2 D + L (N + M) D^2)``; dense cross-attention (Flamingo)
costs ``O(M N D)`` per inserted layer and feeds the LLM nothing; a latent-query bottleneck (Q-Former, resampler)
costs ``O(K (N + K) D)`` per layer and feeds the LLM ``K`` tokens whatever ``N`` is. Here each connector's FLOPs
come from its registered cost model (:mod:`mllm_ref.oracle.registry`), the LLM's from
:func:`mllm_ref.system.complexity.prefill_cost`, at the tiny VLM's widths; :func:`growth_exponent` measures the
log-log slope of the part of the total that depends on ``N``, which the orders predict.

The connector sizes are those of the tiny VLM's trained variants (:mod:`mllm_ref.tinyvlm.variants`): a 2-layer
Q-Former of width 64 (4 heads, FFN 256, cross-attention in every layer) with ``K`` queries, a 2-layer Perceiver
Resampler (4 heads of 16) with ``K`` latents, LDPv2, and for Flamingo a gated cross-attention layer before every
decoder layer (4 heads of 32).
"""

from __future__ import annotations

import numpy as np

from mllm_ref import _checks
from mllm_ref.oracle import registry
from mllm_ref.system import complexity
from mllm_ref.system.specs import spec_from_tinyvlm

#: Connector kinds of the table, with the order of growth of connector + LLM prefill in N.
ORDERS = {
    "mlp": "O(L (N+M)^2 D + L (N+M) D^2)",
    "ldp": "O(L (N/4+M)^2 D + L (N/4+M) D^2)",
    "qformer16": "O(K (N+K) D)",
    "qformer32": "O(K (N+K) D)",
    "resampler32": "O(K (N+K) D)",
    "cross_attention": "O(L M N D)",
}


def _zeros_like_weights(weights: dict) -> dict:
    return {k: np.zeros_like(v) for k, v in weights.items()}


def counted_flops(kind: str, n: int, model, n_text: int = 6) -> tuple[float, float]:
    """``(connector FLOPs, LLM prefill FLOPs)`` of one image of ``n`` patch features and ``n_text`` text tokens.

    ``kind``: a key of :data:`ORDERS`; ``n``: a square number (LDP pools a square grid); ``model``: the tiny VLM
    (for its widths and its MLP connector's weights).
    """
    from mllm_ref.connectors import ldp, perceiver_resampler, qformer

    kind = _checks.choice(kind, "kind", tuple(ORDERS))
    n = _checks.integer(n, "n", low=1)
    n_text = _checks.integer(n_text, "n_text", low=0)
    cfg = model.config
    spec = spec_from_tinyvlm(cfg)

    def llm(n_visual: int) -> float:
        return complexity.prefill_cost(spec, n_visual, n_text).flops

    x = np.zeros((n, cfg.vis_dim), np.float32)
    rng = np.random.default_rng(0)  # shapes only: the cost models read no values
    if kind == "mlp":
        w = {"0.weight": model["proj1.weight"], "0.bias": model["proj1.bias"],
             "2.weight": model["proj2.weight"], "2.bias": model["proj2.bias"]}  # fmt: skip
        return registry.get("connectors.mlp").cost({"x": x, "weights": w})["flops"], llm(n)
    if kind == "ldp":
        g = int(round(np.sqrt(n)))
        if g * g != n:
            raise ValueError(f"n must be a square number for LDP, got {n}")
        w = _zeros_like_weights(ldp.random_weights(2, cfg.vis_dim, cfg.dim, rng))
        return registry.get("connectors.ldp").cost({"x": x, "weights": w})["flops"], llm(((g + 1) // 2) ** 2)
    if kind.startswith("qformer"):
        k = int(kind[len("qformer") :])
        w = qformer.random_weights(rng, hidden=64, intermediate=256, encoder_hidden=cfg.vis_dim, n_layers=2,
                                   cross_attention_frequency=1)  # fmt: skip
        kw = {"query_embeds": np.zeros((k, 64), np.float32), "image_embeds": x, "weights": w, "num_heads": 4,
              "cross_attention_frequency": 1}  # fmt: skip
        return registry.get("connectors.qformer").cost(kw)["flops"] + 2.0 * k * 64 * cfg.dim, llm(k)
    if kind.startswith("resampler"):
        k = int(kind[len("resampler") :])
        w = perceiver_resampler.random_weights(cfg.vis_dim, latents=k, depth=2, heads=4, dim_head=16, rng=rng)
        cost = registry.get("connectors.perceiver_resampler").cost({"x": x, "weights": w, "heads": 4})["flops"]
        return cost + 2.0 * k * cfg.vis_dim * cfg.dim, llm(k)
    from mllm_ref.connectors.cross_attention import xattn_dense_flops

    conn = xattn_dense_flops(n_text, n, cfg.dim, d_visual=cfg.vis_dim, heads=4, dim_head=32, n_layers=cfg.layers)
    return conn, llm(0)


def growth_exponent(kind: str, model, n1: int = 576, n2: int = 2304) -> float:
    """How the cost that depends on ``N`` grows: the log-log slope, between ``n1`` and ``n2`` patch features, of
    connector + LLM prefill FLOPs minus their value at one patch (what is paid whatever the image: the text's
    share of the LLM, the queries' self-attention). For ``a N^p + c`` it is about ``p``."""
    f0, f1, f2 = (sum(counted_flops(kind, n, model)) for n in (1, n1, n2))
    return float(np.log((f2 - f0) / (f1 - f0)) / np.log((n2 - 1) / (n1 - 1)))


def table(model) -> list[dict]:
    """One row per connector kind at the tiny VLM's 144 patches: ``kind``, ``order``, ``connector_flops``,
    ``llm_flops`` and ``growth`` (:func:`growth_exponent`)."""
    n = model.config.n_patches
    rows = []
    for kind, order in ORDERS.items():
        c, l = counted_flops(kind, n, model)
        rows.append({"kind": kind, "order": order, "connector_flops": c, "llm_flops": l,
                     "growth": growth_exponent(kind, model)})  # fmt: skip
    return rows
