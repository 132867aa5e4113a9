"""The LLaVA projector: a linear map (LLaVA) or an MLP with GELU (LLaVA-1.5 ``mlp2x_gelu``) from vision to LLM width.

Papers: H. Liu, C. Li, Q. Wu, Y. J. Lee, "Visual Instruction Tuning" (LLaVA), NeurIPS 2023 (arXiv 2304.08485): a
single linear layer; H. Liu, C. Li, Y. Li, Y. J. Lee, "Improved Baselines with Visual Instruction Tuning"
(LLaVA-1.5), CVPR 2024 (arXiv 2310.03744): a two-layer MLP with GELU. Survey section: cross-modal connectors,
projection-based. The reference follows the official code (haotian-liu/LLaVA, ``llava/model/multimodal_projector/
builder.py``, ``build_vision_projector``), which MobileVLM's builder copies: ``mm_projector_type="linear"`` is one
``nn.Linear(mm_hidden_size, hidden_size)``; ``"mlp{k}x_gelu"`` is ``nn.Sequential(Linear, GELU, ..., GELU, Linear)``
with ``k`` linears and a GELU between each two (none after the last), the first ``D_vis -> D_llm``, the others
``D_llm -> D_llm``, and ``nn.GELU()`` (exact, erf).

Equations, per visual token (each token is projected on its own)::

    linear:        y = x W^T + b
    mlp{k}x_gelu:  h_1 = x W_0^T + b_0;   h_{j+1} = gelu(h_j) W_{2j}^T + b_{2j};   y = h_k

Weights are a dict with the projector module's own ``state_dict`` names (the checkpoint stores them under
``model.mm_projector.``), torch layout ``[out, in]``:

* linear: ``"weight" [D_llm, D_vis]``, ``"bias" [D_llm]``;
* mlp{k}x_gelu: ``"0.weight" [D_llm, D_vis]``, ``"0.bias"``, ``"2.weight" [D_llm, D_llm]``, ``"2.bias"``, ...,
  ``"{2(k-1)}.weight"``, ``"{2(k-1)}.bias"`` (the odd indices of the ``nn.Sequential`` are the GELUs).

The tiny VLM's connector is this MLP with ``k = 2``: its ``proj1``/``proj2`` are ``0``/``2`` here, with the tanh
GELU the tiny VLM uses everywhere (``approximate="tanh"``; ``tests/test_connectors_mlp.py`` maps the names).

Shape legend:
    x: ``float[N, D_vis]`` visual tokens (any leading axes are kept: ``[..., D_vis]``).
    weights: dict of ``float`` arrays as above, same dtype as ``x``.
    returns: ``float[N, D_llm]`` in ``x``'s dtype.

Deviations from the paper: none. ``approximate="tanh"`` (not LLaVA's) is offered for models trained with the tanh
GELU, such as the tiny VLM.
"""

from __future__ import annotations

import re

import numpy as np

from mllm_ref import _checks
from mllm_ref.nn.activations import gelu
from mllm_ref.nn.linear import linear
from mllm_ref.oracle.registry import Technique, register

__all__ = ["mlp_projector", "projector_depth", "weights_from_tinyvlm"]

_MLP_KEY = re.compile(r"^(\d+)\.(weight|bias)$")


def _weight(weights: dict, key: str, dtype, shape, what: str) -> np.ndarray:
    """``weights[key]`` checked: a finite float array of ``shape`` (``None`` matches any length) in ``dtype``;
    ``what`` says where the expected sizes come from."""
    name = f"weights[{key!r}]"
    arr = _checks.float_array(weights[key], name, ndim=len(shape))
    if arr.dtype != dtype:
        raise TypeError(f"{name} must have the same dtype as x ({dtype}), got {arr.dtype}")
    for axis, want in enumerate(shape):
        if want is not None and arr.shape[axis] != want:
            raise ValueError(f"{name} must have size {want} on axis {axis} ({what}), got shape {arr.shape}")
    return arr


def projector_depth(weights) -> int:
    """The number of linear layers ``k`` of a projector's weights: 0 for LLaVA's single ``nn.Linear`` (keys
    ``weight``/``bias``), ``k`` for ``mlp{k}x_gelu`` (keys ``0.weight``, ``0.bias``, ..., ``{2(k-1)}.bias``).
    Raises ``ValueError`` naming ``weights`` for any other set of keys."""
    if not isinstance(weights, dict):
        raise TypeError(f"weights must be a dict of named arrays, got {type(weights).__name__}")
    keys = set(weights)
    if keys == {"weight", "bias"}:
        return 0
    idx = set()
    for k in keys:
        m = _MLP_KEY.match(k) if isinstance(k, str) else None
        if m is None:
            raise ValueError(
                f"weights has an unexpected key {k!r}: expected 'weight'/'bias' (linear) or '0.weight', '0.bias', "
                f"'2.weight', ... (mlp{{k}}x_gelu)"
            )
        idx.add(int(m.group(1)))
    k = len(idx)
    if k == 0:
        raise ValueError("weights must not be empty: expected 'weight'/'bias' or '0.weight', '0.bias', ...")
    want = {f"{2 * j}.{p}" for j in range(k) for p in ("weight", "bias")}
    if keys != want:
        raise ValueError(f"weights must hold exactly {sorted(want)} for an mlp{k}x_gelu projector, got {sorted(keys)}")
    return k


def _validate(x, weights, approximate):
    """Entry checks (shared with any fast path). Returns ``(x, [(W, b), ...], approximate)``."""
    x = _checks.float_array(x, "x", min_ndim=1)
    if x.dtype == np.float16:
        raise TypeError("x must be float32 or float64, got float16")
    depth = projector_depth(weights)
    _checks.choice(approximate, "approximate", ("none", "tanh"))
    d_in = x.shape[-1]
    if depth == 0:
        w = _weight(weights, "weight", x.dtype, (None, d_in), "D_vis, the last axis of x")
        return x, [(w, _weight(weights, "bias", x.dtype, (w.shape[0],), "D_llm, the rows of the weight"))], approximate
    layers = []
    for j in range(depth):
        if j == 0:
            w = _weight(weights, "0.weight", x.dtype, (None, d_in), "D_vis, the last axis of x")
        else:
            w = _weight(weights, f"{2 * j}.weight", x.dtype, (layers[0][0].shape[0],) * 2, "D_llm x D_llm")
        layers.append((w, _weight(weights, f"{2 * j}.bias", x.dtype, (w.shape[0],), "D_llm, the rows of the weight")))
    return x, layers, approximate


def mlp_projector(x: np.ndarray, weights: dict, *, approximate: str = "none") -> np.ndarray:
    """Project visual tokens to the LLM's width with LLaVA's ``linear`` or ``mlp{k}x_gelu`` projector.

    Args:
        x: ``float[..., D_vis]`` visual tokens (float32 or float64, finite).
        weights: the projector's ``state_dict`` (see the module docstring): ``{"weight", "bias"}`` for a linear
            projector, ``{"0.weight", "0.bias", "2.weight", "2.bias", ...}`` for ``mlp{k}x_gelu``; same dtype as ``x``.
        approximate: the GELU between the linears: ``"none"`` (exact, LLaVA's ``nn.GELU()``) or ``"tanh"``.

    Returns:
        ``float[..., D_llm]`` in ``x``'s dtype.
    """
    x, layers, approximate = _validate(x, weights, approximate)
    y = linear(x, *layers[0])
    for w, b in layers[1:]:
        y = linear(gelu(y, approximate=approximate), w, b)
    return y


def weights_from_tinyvlm(params: dict) -> dict:
    """The tiny VLM's connector weights under this module's names: ``proj1 -> 0``, ``proj2 -> 2``."""
    return {f"{new}.{p}": params[f"{old}.{p}"] for old, new in (("proj1", 0), ("proj2", 2)) for p in ("weight", "bias")}


# --------------------------------------------------------------------------------------------------- registration
_SIZES = {  # N tokens, D_vis, D_llm, k linears (0: LLaVA's single linear), approximate
    "linear": (9, 12, 7, 0, "none"),
    "mlp2x": (16, 24, 20, 2, "none"),
    "mlp3x": (5, 8, 6, 3, "none"),
    "tinyvlm": (144, 64, 128, 2, "tanh"),
    "one_token": (1, 3, 5, 2, "none"),
    "bench_llava15": (576, 1024, 4096, 2, "none"),  # CLIP ViT-L/14-336 -> Vicuna-7B
    "bench_llava": (256, 1024, 4096, 0, "none"),  # CLIP ViT-L/14 (224 px) -> a linear projector
}


def random_weights(d_vis: int, d_llm: int, depth: int, rng: np.random.Generator, dtype=np.float32) -> dict:
    """Random projector weights scaled ``1 / sqrt(fan_in)`` (well conditioned), biases ~ 0.1 N(0, 1)."""
    out = {}
    for j in range(max(depth, 1)):
        d_in = d_vis if j == 0 else d_llm
        prefix = "" if depth == 0 else f"{2 * j}."
        out[prefix + "weight"] = (rng.standard_normal((d_llm, d_in)) / np.sqrt(d_in)).astype(dtype)
        out[prefix + "bias"] = (0.1 * rng.standard_normal(d_llm)).astype(dtype)
    return out


def _case(size: str, rng: np.random.Generator) -> dict:
    n, d_vis, d_llm, depth, approximate = _SIZES[size]
    x = rng.standard_normal((n, d_vis)).astype(np.float32)
    return {"x": x, "weights": random_weights(d_vis, d_llm, depth, rng), "approximate": approximate}


def _cost(kwargs: dict) -> dict:
    x, weights = kwargs["x"], kwargs["weights"]
    n = x.size // x.shape[-1]
    flops = sum(2.0 * n * w.size for k, w in weights.items() if k.endswith("weight"))
    d_out = [w for k, w in weights.items() if k.endswith("weight")][-1].shape[0]
    flops += 20.0 * n * d_out * (len(weights) // 2 - 1)  # the GELUs
    w_bytes = sum(w.nbytes for w in weights.values())
    return {"flops": flops, "bytes": float(x.nbytes + w_bytes + n * d_out * x.itemsize)}


def _strategy():
    from hypothesis import strategies as st

    @st.composite
    def cases(draw):
        n = draw(st.integers(1, 20))
        d_vis = draw(st.integers(1, 16))
        d_llm = draw(st.integers(1, 16))
        depth = draw(st.sampled_from([0, 1, 2, 3]))
        approximate = draw(st.sampled_from(["none", "tanh"]))
        dtype = draw(st.sampled_from([np.float32, np.float64]))
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        x = rng.standard_normal((n, d_vis)).astype(dtype)
        return {"x": x, "weights": random_weights(d_vis, d_llm, depth, rng, dtype), "approximate": approximate}

    return cases()


register(
    Technique(
        id="connectors.mlp",
        reference=mlp_projector,
        make_case=_case,
        paper=(
            "H. Liu, C. Li, Q. Wu, Y. J. Lee, Visual Instruction Tuning, NeurIPS 2023 (arXiv 2304.08485); H. Liu, "
            "C. Li, Y. Li, Y. J. Lee, Improved Baselines with Visual Instruction Tuning, CVPR 2024 (arXiv 2310.03744)"
        ),
        test_sizes=("linear", "mlp2x", "mlp3x", "tinyvlm", "one_token"),
        bench_sizes=("bench_llava15", "bench_llava"),
        compare="tolerance",
        strategy=_strategy,
        cost=_cost,
        chapter="book/03-connectors.md",
        notes="LLaVA mm_projector state_dict names ('weight'/'bias' or '0.weight', '2.weight', ...); the tiny VLM's "
        "connector is mlp2x with the tanh GELU",
    )
)
