"""MobileVLM's Lightweight Downsample Projector (LDP) and LDPv2: an MLP, then convolutions that quarter the tokens.

Papers: X. Chu et al. (Meituan), "MobileVLM: A Fast, Strong and Open Vision Language Assistant for Mobile Devices",
arXiv 2312.16886, 2023 (LDP); X. Chu et al., "MobileVLM V2: Faster and Stronger Baseline for Vision Language
Model", arXiv 2402.03766, 2024 (LDPv2). Survey section: cross-modal connectors,
projection with token reduction. The reference follows the official code, Meituan-AutoML/MobileVLM,
``mobilevlm/model/vision_projector.py`` (``LDPBlock``/``LDPNetProjector`` for v1, ``LDPNetV2Projector`` with
``FeatureIRLayer``, ``TokenDownLayer``, ``PosInjectLayer`` for v2), which builds v1 from torchvision's MobileNetV3
``InvertedResidual`` with timm's ``LayerNormAct2d`` (no activation) as the norm and torchvision's
``SqueezeExcitation`` with a hard sigmoid.

The ``N = g * g`` input tokens are a ``g x g`` grid (row-major, as the code's ``reshape(b, -1, h, h)``), ``D`` is
the LLM width (``hidden_size``), ``D_vis`` the encoder's (``mm_hidden_size``).

LDP (v1, ``mm_projector_type="ldpnet"``)::

    h  = (gelu(x W_1^T + b_1)) W_3^T + b_3                       per token, D_vis -> D   (exact erf GELU)
    h  = IR_1(h) = h + B_1(h)                                   stride 1, residual
    y  = IR_2(h) = B_2(h)                                       stride 2, no residual: g x g -> ceil(g/2)^2
    B(h) = LN(PW(SE(hswish(LN(DW_s(h))))))
    DW_s: depthwise 3x3 conv, stride s, zero padding 1, no bias;  LN: LayerNorm over the D channels of each
    position (eps 1e-5);  hswish(z) = z relu6(z + 3) / 6;  PW: pointwise (1x1) conv D -> D, no bias;
    SE(z) = z * hsigmoid(fc2(relu(fc1(mean_positions(z)))))    squeeze-excitation, fc1: D -> S, fc2: S -> D (1x1
    convs with bias), hsigmoid(z) = relu6(z + 3) / 6, S = make_divisible(D // 4, 8) in the official code.

LDPv2 (MobileVLM V2, ``mm_projector_type="ldpnetv2"``)::

    h = (gelu(x W_0^T + b_0)) W_2^T + b_2                        per token, D_vis -> D   (feature transformation)
    p = AdaptiveAvgPool2d(h, (m, m))                             token reduction, m = 12 in the code
    y = p + DWconv3x3_stride1(p) + b_peg                         PEG positional encoding (Twins), residual

A stride-2, padding-1, 3x3 convolution maps ``g`` to ``floor((g - 1) / 2) + 1 = ceil(g / 2)`` positions, so v1
outputs ``ceil(g/2)^2`` tokens (144 for CLIP's 24 x 24, 75% fewer). Adaptive average pooling to ``m`` uses
PyTorch's windows ``[floor(i g / m), ceil((i + 1) g / m))``: plain 2 x 2 averaging when ``g = 2 m``, windows of 2
and 3 tokens that overlap by one when ``g`` is odd and ``m = ceil(g / 2)``.

Weights are a dict with the official projector module's ``state_dict`` names (the checkpoint stores them under
``model.mm_projector.``); torch layouts: Linear ``[out, in]``, Conv2d ``[out, in / groups, kh, kw]``.

* v1 (``LDPNetProjector``): ``model.mlp.1.{weight [D, D_vis], bias}``, ``model.mlp.3.{weight [D, D], bias}``, and
  for ``k`` in 1, 2 (``model.mb_block.0`` is an ``nn.Identity``): ``model.mb_block.{k}.block.0.0.weight [D, 1, 3, 3]``
  (depthwise), ``...block.0.1.{weight, bias} [D]`` (LayerNorm), ``...block.1.fc1.{weight [S, D, 1, 1], bias [S]}``,
  ``...block.1.fc2.{weight [D, S, 1, 1], bias [D]}``, ``...block.2.0.weight [D, D, 1, 1]`` (pointwise),
  ``...block.2.1.{weight, bias} [D]`` (LayerNorm).
* v2 (``LDPNetV2Projector``): ``mlp.mlp.0.{weight [D, D_vis], bias}``, ``mlp.mlp.2.{weight [D, D], bias}``,
  ``peg.peg.0.{weight [D, 1, 3, 3], bias [D]}``.

No BatchNorm appears in either (the norm is LayerNorm), so there are no running statistics to fold.

Shape legend:
    x: ``float[N, D_vis]``, ``N = g * g`` a square grid.
    weights: dict of float arrays as above, same dtype as ``x``.
    version: 1 (LDP) or 2 (LDPv2).  pool_grid: v2's pooled side ``m`` (``None``: ``ceil(g / 2)``).
    returns: ``float[ceil(g/2)^2, D]`` (v1, and v2 by default), ``float[m * m, D]`` for v2 with ``pool_grid=m``.

Deviations from the paper: none in the computation. The official v2 pools to a fixed 12 x 12 grid
(``TokenDownLayer((12, 12))``); here the pooled side defaults to ``ceil(g / 2)``, which is 12 for its 24 x 24 input,
and ``pool_grid=12`` reproduces the code for any grid (``pool_grid`` must not exceed ``g``). The official v1 only
builds for ``D`` a multiple of 8 (torchvision rounds channel counts with ``make_divisible``); the reference accepts
any ``D`` and any squeeze width ``S`` the weights carry. The V2 paper speaks of an average pooling that takes the
576 tokens to 144; the reference follows the code's adaptive pooling (plain 2 x 2 averaging for even ``g = 2 m``).
"""

from __future__ import annotations

import math

import numpy as np

from mllm_ref import _checks
from mllm_ref.nn.activations import gelu
from mllm_ref.nn.layernorm import layernorm
from mllm_ref.nn.linear import linear
from mllm_ref.oracle.registry import Technique, register
from mllm_ref.tinyvlm.variants import tour_variants

__all__ = [
    "ldp_projector",
    "grid_side",
    "depthwise_conv3x3",
    "adaptive_avg_pool",
    "hardswish",
    "hardsigmoid",
    "make_divisible",
    "weight_shapes",
    "random_weights",
    "LN_EPS",
]

#: timm ``LayerNormAct2d``'s default eps, which the official code keeps.
LN_EPS = 1e-5


def make_divisible(v: float, divisor: int = 8) -> int:
    """torchvision's ``_make_divisible``: the multiple of ``divisor`` nearest ``v`` (at least ``divisor``), raised
    by one ``divisor`` if rounding lost more than 10%. The official v1 uses ``make_divisible(D // 4, 8)`` as the
    squeeze-excitation width."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def weight_shapes(version: int, d_vis: int, d: int, squeeze: int | None = None) -> dict:
    """The official parameter names and shapes for ``version`` 1 or 2 (``squeeze`` defaults to the code's
    ``make_divisible(d // 4, 8)``)."""
    if version == 2:
        return {
            "mlp.mlp.0.weight": (d, d_vis), "mlp.mlp.0.bias": (d,),
            "mlp.mlp.2.weight": (d, d), "mlp.mlp.2.bias": (d,),
            "peg.peg.0.weight": (d, 1, 3, 3), "peg.peg.0.bias": (d,),
        }  # fmt: skip
    s = make_divisible(d // 4, 8) if squeeze is None else squeeze
    out = {"model.mlp.1.weight": (d, d_vis), "model.mlp.1.bias": (d,), "model.mlp.3.weight": (d, d),
           "model.mlp.3.bias": (d,)}  # fmt: skip
    for k in (1, 2):
        p = f"model.mb_block.{k}.block."
        out |= {
            p + "0.0.weight": (d, 1, 3, 3), p + "0.1.weight": (d,), p + "0.1.bias": (d,),
            p + "1.fc1.weight": (s, d, 1, 1), p + "1.fc1.bias": (s,),
            p + "1.fc2.weight": (d, s, 1, 1), p + "1.fc2.bias": (d,),
            p + "2.0.weight": (d, d, 1, 1), p + "2.1.weight": (d,), p + "2.1.bias": (d,),
        }  # fmt: skip
    return out


# ------------------------------------------------------------------------------------------------- building blocks
def hardswish(z: np.ndarray) -> np.ndarray:
    """``z * relu6(z + 3) / 6`` (``torch.nn.Hardswish``), elementwise, in ``z``'s dtype."""
    t = z.dtype.type
    return z * np.clip(z + t(3), t(0), t(6)) / t(6)


def hardsigmoid(z: np.ndarray) -> np.ndarray:
    """``relu6(z + 3) / 6`` (``torch.nn.Hardsigmoid``), elementwise, in ``z``'s dtype."""
    t = z.dtype.type
    return np.clip(z + t(3), t(0), t(6)) / t(6)


def depthwise_conv3x3(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None, stride: int = 1) -> np.ndarray:
    """Depthwise 3 x 3 convolution with zero padding 1 (``nn.Conv2d(C, C, 3, stride, 1, groups=C)``), channels last.

    Args:
        x: ``float[h, w, C]``.
        weight: ``float[C, 1, 3, 3]`` (torch layout), same dtype.
        bias: ``float[C]`` or None.
        stride: 1 or 2.

    Returns:
        ``float[(h - 1) // stride + 1, (w - 1) // stride + 1, C]``:
        ``y[i, j, c] = sum_{dy, dx < 3} weight[c, 0, dy, dx] * xpad[s i + dy, s j + dx, c] + bias[c]``.
    """
    x = _checks.float_array(x, "x", ndim=3)
    weight = _checks.float_array(weight, "weight", ndim=4)
    _checks.same_dtype("x", x, "weight", weight)
    if weight.shape != (x.shape[2], 1, 3, 3):
        raise ValueError(f"weight must have shape {(x.shape[2], 1, 3, 3)}, got {weight.shape}")
    stride = _checks.integer(stride, "stride", low=1, high=2)
    h, w, c = x.shape
    oh, ow = (h - 1) // stride + 1, (w - 1) // stride + 1
    xp = np.zeros((h + 2, w + 2, c), dtype=x.dtype)
    xp[1:-1, 1:-1] = x
    y = np.zeros((oh, ow, c), dtype=x.dtype)
    for dy in range(3):
        for dx in range(3):
            win = xp[dy : dy + stride * (oh - 1) + 1 : stride, dx : dx + stride * (ow - 1) + 1 : stride]
            y += win * weight[:, 0, dy, dx]
    if bias is not None:
        bias = _checks.float_array(bias, "bias", ndim=1)
        _checks.same_dtype("x", x, "bias", bias)
        _checks.dim("bias", bias, 0, c, "the channels of x")
        y += bias
    return y


def _pool_windows(n: int, m: int) -> list[tuple[int, int]]:
    """PyTorch's adaptive pooling windows: ``[floor(i n / m), ceil((i + 1) n / m))`` for ``i < m``."""
    return [((i * n) // m, -((-(i + 1) * n) // m)) for i in range(m)]


def adaptive_avg_pool(x: np.ndarray, out: int) -> np.ndarray:
    """``nn.AdaptiveAvgPool2d((out, out))`` on a channels-last grid ``float[h, w, C]`` -> ``float[out, out, C]``.

    Each output is the mean of the rectangle of rows ``[floor(a h / out), ceil((a + 1) h / out))`` and the like
    columns: the window sum divided by its size.
    """
    x = _checks.float_array(x, "x", ndim=3)
    h, w, c = x.shape
    out = _checks.integer(out, "out", low=1, high=min(h, w))
    rows = np.stack([x[s:e].sum(axis=0) for s, e in _pool_windows(h, out)])  # [out, w, C]
    cells = np.stack([rows[:, s:e].sum(axis=1) for s, e in _pool_windows(w, out)], axis=1)  # [out, out, C]
    rh = np.array([e - s for s, e in _pool_windows(h, out)], dtype=x.dtype)
    rw = np.array([e - s for s, e in _pool_windows(w, out)], dtype=x.dtype)
    return cells / (rh[:, None, None] * rw[None, :, None])


def _pointwise(z: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """1 x 1 convolution on channels-last ``z`` with a torch ``[out, in, 1, 1]`` weight."""
    return linear(z, weight[:, :, 0, 0], bias)


def _squeeze_excite(z: np.ndarray, p: dict, prefix: str) -> np.ndarray:
    """torchvision ``SqueezeExcitation`` with ``scale_activation=Hardsigmoid`` on ``z[h, w, D]``."""
    s = z.reshape(-1, z.shape[-1]).mean(axis=0)
    s = np.maximum(_pointwise(s, p[prefix + "fc1.weight"], p[prefix + "fc1.bias"]), z.dtype.type(0))
    s = hardsigmoid(_pointwise(s, p[prefix + "fc2.weight"], p[prefix + "fc2.bias"]))
    return z * s


def _inverted_residual(h: np.ndarray, p: dict, k: int, stride: int) -> np.ndarray:
    """MobileNetV3 ``InvertedResidual`` as v1 configures it (no expansion, SE, hard swish, LayerNorm)."""
    pre = f"model.mb_block.{k}.block."
    z = depthwise_conv3x3(h, p[pre + "0.0.weight"], None, stride)
    z = hardswish(layernorm(z, p[pre + "0.1.weight"], p[pre + "0.1.bias"], eps=LN_EPS))
    z = _squeeze_excite(z, p, pre + "1.")
    z = layernorm(_pointwise(z, p[pre + "2.0.weight"]), p[pre + "2.1.weight"], p[pre + "2.1.bias"], eps=LN_EPS)
    return z + h if stride == 1 else z  # use_res_connect: stride 1 and equal in/out channels


# ---------------------------------------------------------------------------------------------------- the projector
def grid_side(n: int, name: str = "x") -> int:
    """``g`` with ``g * g == n``; ``ValueError`` naming ``name`` if ``n`` tokens are not a square grid."""
    g = math.isqrt(n)
    if g * g != n:
        raise ValueError(f"{name} must hold a square grid of tokens (N = g * g), got N = {n}")
    return g


def _validate(x, weights, version, pool_grid):
    """Entry checks (shared with any fast path). Returns ``(x, weights, version, g, m)``."""
    x = _checks.float_array(x, "x", ndim=2)
    if x.dtype == np.float16:
        raise TypeError("x must be float32 or float64, got float16")
    version = _checks.integer(version, "version", low=1, high=2)
    g = grid_side(x.shape[0])
    if version == 1:
        if pool_grid is not None:
            raise ValueError(f"pool_grid is for version 2 only (v1 downsamples by a stride-2 conv), got {pool_grid}")
        m = (g - 1) // 2 + 1
    else:
        m = (g + 1) // 2 if pool_grid is None else _checks.integer(pool_grid, "pool_grid", low=1, high=g)
    if not isinstance(weights, dict):
        raise TypeError(f"weights must be a dict of named arrays, got {type(weights).__name__}")
    first = "model.mlp.1.weight" if version == 1 else "mlp.mlp.0.weight"
    if first not in weights:
        raise ValueError(f"weights lack {first!r} (version {version} names; got keys {sorted(map(str, weights))})")
    w0 = _checks.float_array(weights[first], f"weights[{first!r}]", ndim=2)
    d = w0.shape[0]
    squeeze = None
    if version == 1:
        fc1 = weights.get("model.mb_block.1.block.1.fc1.weight")
        squeeze = fc1.shape[0] if isinstance(fc1, np.ndarray) and fc1.ndim == 4 else None
    shapes = weight_shapes(version, x.shape[1], d, squeeze)
    if set(weights) != set(shapes):
        missing, extra = sorted(set(shapes) - set(weights)), sorted(map(str, set(weights) - set(shapes)))
        raise ValueError(f"weights must hold the version-{version} parameters: missing {missing}, unexpected {extra}")
    out = {}
    for key, shape in shapes.items():
        name = f"weights[{key!r}]"
        arr = _checks.float_array(weights[key], name, ndim=len(shape))
        if arr.dtype != x.dtype:
            raise TypeError(f"{name} must have the same dtype as x ({x.dtype}), got {arr.dtype}")
        if arr.shape != shape:
            raise ValueError(f"{name} must have shape {shape} (D_vis={x.shape[1]} from x, D={d}), got {arr.shape}")
        out[key] = arr
    return x, out, version, g, m


def ldp_projector(x: np.ndarray, weights: dict, *, version: int = 2, pool_grid: int | None = None) -> np.ndarray:
    """MobileVLM's LDP (``version=1``) or LDPv2 (``version=2``) on a square grid of visual tokens.

    Args:
        x: ``float[g * g, D_vis]`` visual tokens, row-major on their ``g x g`` grid (float32 or float64, finite).
        weights: the official projector's ``state_dict`` for that version (names in the module docstring), same
            dtype as ``x``.
        version: 1 (``LDPNetProjector``) or 2 (``LDPNetV2Projector``).
        pool_grid: v2 only: the pooled side ``m`` (``1 <= m <= g``); ``None`` is ``ceil(g / 2)``, the official 12
            for a 24 x 24 grid.

    Returns:
        ``float[ceil(g/2)^2, D]`` (``float[m * m, D]`` for v2 with ``pool_grid=m``), row-major on the output grid,
        in ``x``'s dtype.
    """
    x, p, version, g, m = _validate(x, weights, version, pool_grid)
    if version == 1:
        h = linear(gelu(linear(x, p["model.mlp.1.weight"], p["model.mlp.1.bias"]), approximate="none"),
                   p["model.mlp.3.weight"], p["model.mlp.3.bias"])  # fmt: skip
        h = h.reshape(g, g, -1)
        h = _inverted_residual(h, p, 1, stride=1)
        y = _inverted_residual(h, p, 2, stride=2)
    else:
        h = linear(gelu(linear(x, p["mlp.mlp.0.weight"], p["mlp.mlp.0.bias"]), approximate="none"),
                   p["mlp.mlp.2.weight"], p["mlp.mlp.2.bias"])  # fmt: skip
        q = adaptive_avg_pool(h.reshape(g, g, -1), m)
        y = q + depthwise_conv3x3(q, p["peg.peg.0.weight"], p["peg.peg.0.bias"], 1)
    return y.reshape(-1, y.shape[-1])


# --------------------------------------------------------------------------------------------------- registration
_SIZES = {  # g grid side, D_vis, D, version, pool_grid
    "v1_even": (4, 12, 16, 1, None),
    "v1_odd": (5, 8, 8, 1, None),
    "v1_one": (1, 6, 8, 1, None),
    "v2_even": (6, 12, 16, 2, None),
    "v2_odd": (7, 10, 8, 2, None),
    "v2_fixed12": (13, 6, 8, 2, 12),  # the official fixed 12 x 12 pool on a 13 x 13 grid
    "bench_v1": (24, 1024, 2048, 1, None),  # CLIP ViT-L/14-336 (576 tokens) -> MobileLLaMA 1.4B/1.7B width 2048
    "bench_v2": (24, 1024, 2048, 2, None),
}


def random_weights(version: int, d_vis: int, d: int, rng: np.random.Generator, dtype=np.float32) -> dict:
    """Random weights under the official names, scaled ``1 / sqrt(fan_in)``; norm gains near 1."""
    out = {}
    for key, shape in weight_shapes(version, d_vis, d).items():
        if key.endswith(("0.1.weight", "2.1.weight")):  # LayerNorm gains
            arr = 1.0 + 0.1 * rng.standard_normal(shape)
        elif len(shape) == 1:
            arr = 0.1 * rng.standard_normal(shape)
        else:
            fan_in = int(np.prod(shape[1:]))
            arr = rng.standard_normal(shape) / np.sqrt(fan_in)
        out[key] = arr.astype(dtype)
    return out


def _case(size: str, rng: np.random.Generator) -> dict:
    g, d_vis, d, version, pool_grid = _SIZES[size]
    x = rng.standard_normal((g * g, d_vis)).astype(np.float32)
    kw = {"x": x, "weights": random_weights(version, d_vis, d, rng), "version": version}
    if pool_grid is not None:
        kw["pool_grid"] = pool_grid
    return kw


def _cost(kwargs: dict) -> dict:
    x, p = kwargs["x"], kwargs["weights"]
    n, d_vis = x.shape
    g = math.isqrt(n)
    version = kwargs.get("version", 2)
    d = p["model.mlp.1.weight" if version == 1 else "mlp.mlp.0.weight"].shape[0]  # the LLM width D
    flops = 2.0 * n * d * (d_vis + d) + 8.0 * n * d  # the two linears and the GELU
    if version == 1:
        m = (g + 1) // 2
        for pos in (g * g, m * m):  # each inverted residual: depthwise, 2 LayerNorms, hswish, SE scale, pointwise
            flops += pos * (18.0 * d + 2.0 * d * d + 20.0 * d)
    else:
        m = kwargs.get("pool_grid") or (g + 1) // 2
        flops += n * d + m * m * 20.0 * d
    w_bytes = sum(a.nbytes for a in p.values())
    return {"flops": flops, "bytes": float(x.nbytes + w_bytes + m * m * d * x.itemsize)}


def _strategy():
    from hypothesis import strategies as st

    @st.composite
    def cases(draw):
        version = draw(st.sampled_from([1, 2]))
        g = draw(st.integers(1, 9))
        d_vis = draw(st.integers(1, 12))
        d = draw(st.integers(1, 12))
        dtype = draw(st.sampled_from([np.float32, np.float64]))
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        kw = {
            "x": rng.standard_normal((g * g, d_vis)).astype(dtype),
            "weights": random_weights(version, d_vis, d, rng, dtype),
            "version": version,
        }
        if version == 2 and draw(st.booleans()):
            kw["pool_grid"] = draw(st.integers(1, g))
        return kw

    return cases()


register(
    Technique(
        id="connectors.ldp",
        reference=ldp_projector,
        make_case=_case,
        paper=(
            "X. Chu et al., MobileVLM: A Fast, Strong and Open Vision Language Assistant for Mobile Devices, 2023 "
            "(arXiv 2312.16886); X. Chu et al., MobileVLM V2: Faster and Stronger Baseline for Vision Language Model, "
            "2024 (arXiv 2402.03766)"
        ),
        test_sizes=("v1_even", "v1_odd", "v1_one", "v2_even", "v2_odd", "v2_fixed12"),
        bench_sizes=("bench_v1", "bench_v2"),
        compare="tolerance",
        strategy=_strategy,
        cost=_cost,
        chapter="book/03-connectors.md",
        model_level=True,
        extra={"variants": tour_variants({"ldp": "LDPv2, 12x12 -> 6x6 (trained, base frozen)"})},
        notes=(
            "official MobileVLM state_dict names; v2 pools to ceil(g/2) by default (the code's fixed 12 for 24x24; "
            "pool_grid=12 reproduces it on any grid)"
        ),
    )
)
