"""Token Merging (ToMe): bipartite soft matching with size-weighted merging, and its unmerge map.

Paper: D. Bolya, C.-Y. Fu, X. Dai, P. Zhang, C. Feichtenhofer, J. Hoffman, "Token Merging: Your ViT But Faster",
ICLR 2023 (arXiv:2210.09461). Survey: token compression in the vision encoder (TECHNIQUES.md, ``tokens.tome``).
The reference follows the paper's implementation (facebookresearch/ToMe, ``tome/merge.py``:
``bipartite_soft_matching``, ``merge_wavg``, ``merge_source``; ``tome/patch/timm.py`` for where it runs).

Inside each transformer block, between the attention and the MLP, ToMe removes ``r`` tokens by merging:

1. Metric: the block's keys averaged over heads, ``m_i = mean_h k_{h,i}``, and normalised, ``m_i / ||m_i||``.
2. Bipartite split by alternation: ``A = {0, 2, 4, ...}`` (``ceil(N/2)`` tokens), ``B = {1, 3, 5, ...}``.
3. For each ``a`` in ``A`` its best match ``b(a) = argmax_b cos(m_a, m_b)`` and score ``s_a = max_b cos(m_a, m_b)``.
4. The ``r`` edges with the largest ``s_a`` are merged: each such ``a`` goes into its ``b(a)``. Several ``a`` may
   go into the same ``b``; a ``b`` never merges away, so exactly ``r`` tokens disappear (``r <= N // 2``).
5. Size-weighted average (``merge_wavg``): a destination ``b`` with the set ``S_b`` of sources becomes
   ``x_b' = (s_b x_b + sum_{a in S_b} s_a x_a) / (s_b + sum_{a in S_b} s_a)`` with size ``s_b + sum s_a``; so
   ``sum_i s_i x_i`` and ``sum_i s_i`` are preserved.
6. Proportional attention in later blocks: ``softmax(q k^T / sqrt(d) + log s)``, so a token standing for ``s``
   patches weighs like ``s`` copies (the tiny VLM applies it: ``_proportional_attention`` in
   :mod:`mllm_ref.tinyvlm.model`).

Output order (as the paper's implementation concatenates ``[unm, dst]``): first the ``ceil(N/2) - r`` unmerged
``A`` tokens in order of *decreasing* best-match score ``s_a`` (not their original order: ToMe sorts them only
when a class token must stay first, and there is none here), then all ``N // 2`` ``B`` tokens in their original
order. The unmerge map says, for each input token, which output token now carries it; ``unmerge(merged, map)``
copies each output back to every input position it stands for (ToMe's ``unmerge``), and composing the maps of
successive blocks gives ToMe's ``source`` (patch -> token) map.

Tie-breaking (discrete outputs are compared exactly): ``b(a)`` is the lowest-index ``B`` token among equal
scores; edges with equal ``s_a`` are ranked by increasing ``A`` index (a stable sort). A zero metric vector has
cosine 0 with everything.

Shape legend:
    x: ``[N, C]`` tokens; keys: ``[H, N, d]`` the block's keys (averaged over the ``H`` heads), or ``[N, d]`` a
    metric used as given; size: ``[N]`` > 0 patches per token; r: tokens to remove, ``0 <= r <= N // 2``.
    returns: ``merged[N - r, C]``, ``size_out[N - r]``, ``unmerge_map int64[N]`` with values in ``[0, N - r)``.

Deviations from the paper: none in the matching and merge. Protected tokens (class/distillation token) are not
supported (the tiny VLM has no class token). ToMe silently clamps ``r`` to ``N // 2``; the reference rejects a
larger ``r`` (the tiny-VLM policy clamps as ToMe does). The tiny-VLM default scales the paper's constant schedule
to 3 encoder blocks (see :data:`DEFAULT_R`).
"""

from __future__ import annotations

import numpy as np

from mllm_ref import _checks
from mllm_ref.oracle.registry import Technique, register
from mllm_ref.tinyvlm.plugs import Plugs, TokenPolicy, VisualTokens
from mllm_ref.tokens._common import keep_count, l2_normalize, merge_into

__all__ = ["tome_merge", "unmerge", "compose_source", "ToMePolicy", "make_policy", "schedule_for", "DEFAULT_R"]

#: Tiny-VLM default: tokens removed in each of the 3 encoder blocks. ToMe's off-the-shelf setting (ViT-L/16,
#: r = 8 on 24 layers) merges away almost every token, which only a classifier reading the class token can
#: afford; in a VLM every visual token reaches the decoder. Our choice: ToMe's constant schedule with
#: r = 144 / 6 = 24 per block, so the decoder sees half of the 144 patches (144 -> 120 -> 96 -> 72), which
#: roughly halves the LLM prefill (the paper's headline is about 2x ViT throughput).
DEFAULT_R = 24


def _float_input(x, name: str, ndim) -> np.ndarray:
    x = _checks.float_array(x, name, ndim=ndim)
    if x.dtype == np.float16:
        raise TypeError(f"{name} must be float32 or float64, got float16")
    return x.astype(x.dtype.newbyteorder("="), copy=False)  # outputs in native byte order, like NumPy's ufuncs


def _validate(x, keys, r, size):
    """Shared entry checks (also used by the fast paths). Returns ``(x, metric_source, r, size)``."""
    x, keys, size = _validate_tokens(x, keys, size)
    r = _checks.integer(r, "r", low=0, high=x.shape[0] // 2)
    return x, keys, r, size


def _validate_tokens(x, keys, size):
    """Checks of the tokens, their keys and sizes (shared with :mod:`mllm_ref.tokens.folder`)."""
    x = _float_input(x, "x", 2)
    keys = _float_input(keys, "keys", (2, 3))
    _checks.same_dtype("x", x, "keys", keys)
    n = x.shape[0]
    if size is None:
        size = np.ones(n, dtype=x.dtype)
    else:
        size = _float_input(size, "size", 1)
        _checks.same_dtype("x", x, "size", size)
    if keys.shape[-2] != n or size.shape[0] != n:
        raise ValueError(
            f"x, keys and size must agree on the token count: x has {n} tokens (axis 0), keys {keys.shape[-2]} "
            f"(axis -2), size {size.shape[0]}"
        )
    if not np.all(size > 0):
        raise ValueError("size must be > 0 (patches per token)")
    return x, keys, size


def _metric(keys: np.ndarray) -> np.ndarray:
    """``[N, d]``: keys averaged over heads (ToMe's ``k.mean(1)``), or the 2-D metric as given."""
    return keys if keys.ndim == 2 else keys.mean(axis=0)


def _match(metric: np.ndarray):
    """Bipartite soft matching: ``(node_idx[nA], edge_order[nA])`` for ``A = 0::2``, ``B = 1::2``.

    ``node_idx[a]`` is the best ``B`` match of ``A`` token ``a`` (lowest index on ties); ``edge_order`` lists the
    ``A`` tokens by decreasing best score (stable: ties by increasing index).
    """
    m = l2_normalize(metric)
    scores = m[0::2] @ m[1::2].T  # [nA, nB] cosine similarities
    node_idx = np.argmax(scores, axis=1)
    node_max = scores[np.arange(scores.shape[0]), node_idx]
    edge_order = np.argsort(-node_max, kind="stable")
    return node_idx.astype(np.int64), edge_order.astype(np.int64)


def _unmerge_map(node_idx: np.ndarray, edge_order: np.ndarray, n: int, r: int) -> np.ndarray:
    """ToMe's output order ``[unmerged A by decreasing score, all B]``: the output index of every input token."""
    n_a, n_b = (n + 1) // 2, n // 2
    unm, src = edge_order[r:], edge_order[:r]
    out = np.empty(n, dtype=np.int64)
    out[2 * unm] = np.arange(n_a - r)
    out[1::2] = (n_a - r) + np.arange(n_b)
    out[2 * src] = (n_a - r) + node_idx[src]
    return out


def tome_merge(
    x: np.ndarray, keys: np.ndarray, r: int, size: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge ``r`` of the ``N`` tokens of ``x`` by ToMe's bipartite soft matching on ``keys``.

    Args:
        x: ``float[N, C]`` the tokens (the block's hidden state after attention).
        keys: ``float[H, N, d]`` the block's keys (averaged over heads to get the metric) or ``float[N, d]``.
        r: tokens to remove, ``0 <= r <= N // 2``; 0 is the identity.
        size: ``float[N]`` > 0, patches each token stands for (default all 1).

    Returns:
        ``(merged[N - r, C], size_out[N - r], unmerge_map int64[N])``: the size-weighted merged tokens in ToMe's
        order (unmerged ``A`` tokens by decreasing best-match score, then every ``B`` token), their sizes, and
        for each input token the output token that carries it. Same dtype as ``x``.
    """
    x, keys, r, size = _validate(x, keys, r, size)
    n = x.shape[0]
    if r == 0:
        return x.copy(), size.copy(), np.arange(n, dtype=np.int64)
    node_idx, edge_order = _match(_metric(keys))
    umap = _unmerge_map(node_idx, edge_order, n, r)
    merged, size_out = merge_into(x, size, umap, n - r)
    return merged, size_out, umap


def unmerge(merged: np.ndarray, unmerge_map: np.ndarray) -> np.ndarray:
    """Undo a merge for display or dense outputs: ``out[i] = merged[unmerge_map[i]]`` (ToMe's ``unmerge``).

    Args:
        merged: ``float[M, C]``; unmerge_map: ``int[N]`` with values in ``[0, M)``.

    Returns:
        ``float[N, C]``, every input position given the merged token it went into.
    """
    merged = _float_input(merged, "merged", 2)
    umap = _checks.int_array(unmerge_map, "unmerge_map", ndim=1, low=0, high=merged.shape[0] - 1)
    return merged[umap]


def compose_source(source: np.ndarray, unmerge_map: np.ndarray) -> np.ndarray:
    """The patch-to-token map after a merge: ``source[g]`` (a token index or ``-1``) becomes
    ``unmerge_map[source[g]]`` (ToMe's ``merge_source``, as an index map instead of a 0/1 matrix)."""
    source = np.asarray(source)
    out = np.full(source.shape, -1, dtype=np.int64)
    live = source >= 0
    out[live] = np.asarray(unmerge_map)[source[live]]
    return out


# --------------------------------------------------------------------------------------------------------------
# The tiny-VLM policy.


def schedule_for(n_tokens: int, n_keep: int, n_blocks: int) -> list[int]:
    """A constant-as-possible schedule ``r[0..n_blocks)`` that takes ``n_tokens`` down to ``n_keep``.

    Each block removes at most half of its tokens (ToMe's ``r <= N // 2``); the even share ``ceil(R / blocks)``
    is raised in early blocks when later blocks could not remove the rest. If even halving every block cannot
    reach ``n_keep``, every block halves (the fewest tokens ToMe can leave).
    """
    n_tokens = _checks.integer(n_tokens, "n_tokens", low=1)
    n_keep = _checks.integer(n_keep, "n_keep", low=1, high=n_tokens)
    n_blocks = _checks.integer(n_blocks, "n_blocks", low=1)

    def most_removable(n: int, blocks: int) -> int:
        left = n
        for _ in range(blocks):
            left -= left // 2
        return n - left

    out, n, remaining = [], n_tokens, n_tokens - n_keep
    for i in range(n_blocks):
        blocks_left = n_blocks - i
        r = min(-(-remaining // blocks_left), n // 2)
        while r < n // 2 and remaining - r > most_removable(n - r, blocks_left - 1):
            r += 1
        out.append(r)
        n, remaining = n - r, remaining - r
    return out


class ToMePolicy(TokenPolicy):
    """ToMe in the tiny VLM's encoder: ``r[layer]`` tokens merged in each block, keys averaged over heads as the
    metric, sizes accumulated (the model then applies proportional attention), and the patch map updated.

    Args:
        r: tokens removed per encoder block: an int (the same in every block) or one per block. Clamped to half of
            the block's tokens, as ToMe clamps.
    """

    name = "tome"

    def __init__(self, r: int | tuple[int, ...] | list[int] = DEFAULT_R):
        if isinstance(r, (list, tuple)):
            self.r = tuple(_checks.integer(v, "r", low=0) for v in r)
        else:
            self.r = _checks.integer(r, "r", low=0)

    def r_at(self, layer: int) -> int:
        if isinstance(self.r, tuple):
            return self.r[layer] if layer < len(self.r) else 0
        return self.r

    def in_encoder(self, layer, tokens: VisualTokens, keys, prompt_ids) -> VisualTokens:
        r = min(self.r_at(layer), tokens.n // 2)
        if r == 0:
            return tokens
        merged, size, umap = tome_merge(tokens.x, keys, r, tokens.size)
        return VisualTokens(merged, size, compose_source(tokens.source, umap), tokens.grid)


def make_policy(keep_ratio: float, *, n_tokens: int = 144, n_blocks: int = 3) -> ToMePolicy:
    """ToMe keeping ``keep_ratio`` of the ``n_tokens`` patches after the ``n_blocks`` encoder blocks.

    ``keep_ratio`` maps to the final count ``keep_count(n_tokens, keep_ratio)`` and a constant-as-possible
    schedule (:func:`schedule_for`). ToMe halves at most per block, so below ``1 / 2**n_blocks`` (0.125 for the
    tiny VLM's 3 blocks) it keeps ``n_tokens / 2**n_blocks`` (18 of 144).
    """
    keep_ratio = _checks.real(keep_ratio, "keep_ratio", low=0.0, high=1.0)
    k = keep_count(n_tokens, keep_ratio)
    return ToMePolicy(tuple(schedule_for(n_tokens, k, n_blocks)))


# --------------------------------------------------------------------------------------------------------------
# Registration: cases with well-separated scores, cost and Hypothesis strategy.

_SIZES = {  # N tokens, H heads, d key width, C token width, r
    "tiny": (6, 2, 4, 3, 2),
    "odd": (13, 4, 8, 5, 5),
    "small": (40, 4, 24, 24, 12),
    "half": (24, 3, 16, 8, 12),
    "r0": (9, 2, 8, 4, 0),
    "bench_576": (576, 16, 64, 1024, 144),
    "bench_1024": (1024, 8, 64, 256, 256),
}


def separated_keys(n: int, heads: int, d: int, rng: np.random.Generator, dtype=np.float32) -> np.ndarray:
    """Keys ``[heads, n, d]`` whose head-mean metric has a unique best ``B`` match for every ``A`` token, by a
    margin of >= 0.1 in cosine, and best scores at least ``0.53 / (ceil(n/2) - 1)`` apart (needs ``d > n // 2``).

    The ``B`` metric vectors are orthonormal; ``A`` token ``a`` has cosine ``c_a`` (distinct values on a grid in
    [0.4, 0.93]) with its target and smaller components on the others; per-head noise sums to zero over heads.
    """
    n_a, n_b = (n + 1) // 2, n // 2
    if d <= n_b:
        raise ValueError(f"d must exceed n // 2 = {n_b} for separated keys, got {d}")
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    basis_b, rest = q[:, :n_b].T, q[:, n_b:].T  # [n_b, d] orthonormal, [d - n_b, d] orthogonal to them
    metric = np.zeros((n, d))
    metric[1::2] = basis_b
    cos = rng.permutation(np.linspace(0.4, 0.93, n_a))
    for i in range(n_a if n_b else 0):
        t = rng.integers(n_b)
        comp = rng.uniform(-0.3, 1.0, n_b) * (cos[i] - 0.1)  # the other B tokens: cosine <= c_a - 0.1
        comp[t] = 0.0
        other = float(comp @ comp)
        if cos[i] ** 2 + other > 0.9:  # shrink the others so that a unit vector still has room for the rest
            comp *= np.sqrt((0.9 - cos[i] ** 2) / other)
        comp[t] = cos[i]
        w = rng.standard_normal(rest.shape[0]) @ rest
        # a unit vector: cosine c_a with its target, comp with the other B vectors, the rest orthogonal to B
        metric[2 * i] = comp @ basis_b + np.sqrt(1.0 - float(comp @ comp)) * w / np.linalg.norm(w)
    metric *= rng.uniform(0.5, 2.0, (n, 1))  # cosine ignores the scale
    noise = rng.standard_normal((heads, n, d)) * 0.5
    noise -= noise.mean(axis=0, keepdims=True)
    return (metric[None] + noise).astype(dtype)


def _case(size: str, rng: np.random.Generator) -> dict:
    n, h, d, c, r = _SIZES[size]
    if size.startswith("bench"):
        keys = rng.standard_normal((h, n, d)).astype(np.float32)
    else:
        keys = separated_keys(n, h, d, rng)
    x = rng.standard_normal((n, c)).astype(np.float32)
    s = rng.integers(1, 5, n).astype(np.float32)
    return {"x": x, "keys": keys, "r": r, "size": s}


def _cost(kwargs: dict) -> dict:
    x, keys = kwargs["x"], kwargs["keys"]
    n, c = x.shape
    d = keys.shape[-1]
    flops = keys.size + 3.0 * n * d + 2.0 * (n // 2) * ((n + 1) // 2) * d + 3.0 * n * c
    return {"flops": flops, "bytes": float(x.nbytes * 2 + keys.nbytes + kwargs["size"].nbytes * 2)}


def _strategy():
    from hypothesis import strategies as st

    @st.composite
    def cases(draw):
        n = draw(st.integers(2, 30))
        h = draw(st.integers(1, 4))
        d = draw(st.integers(n // 2 + 1, n // 2 + 6))
        c = draw(st.integers(1, 9))
        r = draw(st.integers(0, n // 2))
        seed = draw(st.integers(0, 2**32 - 1))
        dtype = draw(st.sampled_from([np.float32, np.float64]))
        rng = np.random.default_rng(seed)
        keys = separated_keys(n, h, d, rng, dtype)
        x = rng.standard_normal((n, c)).astype(dtype)
        s = rng.integers(1, 5, n).astype(dtype)
        return {"x": x, "keys": keys, "r": r, "size": s}

    return cases()


register(
    Technique(
        id="tokens.tome",
        reference=tome_merge,
        make_case=_case,
        paper=(
            "D. Bolya, C.-Y. Fu, X. Dai, P. Zhang, C. Feichtenhofer, J. Hoffman, Token Merging: Your ViT But Faster, "
            "ICLR 2023 (arXiv:2210.09461)"
        ),
        test_sizes=("tiny", "odd", "small", "half", "r0"),
        bench_sizes=("bench_576", "bench_1024"),
        compare="tolerance",
        strategy=_strategy,
        cost=_cost,
        chapter="book/02-fewer-visual-tokens.md",
        model_level=True,
        notes=(
            "no protected (class) token; r > N//2 rejected (ToMe clamps); tiny VLM: constant r=24 in each of 3 "
            "encoder blocks (144 -> 72 tokens) instead of ViT-L's r=8 over 24 layers"
        ),
        extra={
            "plugs": lambda model: Plugs(token_policy=ToMePolicy(DEFAULT_R)),
            "setting": f"r={DEFAULT_R}/block x 3 blocks (144 -> 72 tokens), proportional attention",
        },
    )
)
