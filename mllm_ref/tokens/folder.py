"""FOLDER: fold-and-merge of visual tokens in the last block of the vision encoder.

Paper: H. Wang, Z. Yu, G. Spadaro, C. Ju, V. Quetu, S. Xiao, E. Tartaglione, "FOLDER: Accelerating Multi-modal
Large Language Models with Enhanced Performance", ICCV 2025 (arXiv:2501.02430). Survey: semantic aggregation in
the deeper stages of the encoder (TECHNIQUES.md, ``tokens.folder``). Read from the official code
(anakin-skywalker-Joseph/Folder: ``folder.py`` ``merge_features`` / ``bipartite_unimodal_matching`` /
``merge_folder``, and ``llava/model/folder/patch/folder.py`` for where it runs in LLaVA-1.5's CLIP encoder).

FOLDER builds on ToMe's bipartite soft matching (:mod:`mllm_ref.tokens.tome`) and changes *where* and *how much*
is reduced: its analysis finds that reducing late loses less information (less error propagates through later
blocks), so the whole reduction is done in the last encoder block whose output the LLM reads, and far more than
ToMe's one-half-per-block limit is removed there by **folding**: bipartite matching is repeated inside the same
block on the already-merged tokens until the target count is reached. One fold round on ``n`` tokens:

1. Metric ``m`` (keys averaged over heads, as ToMe), normalised; ``A = {0, 2, ...}``, ``B = {1, 3, ...}``.
2. Each ``a`` in ``A`` links to ``b(a) = argmax_b cos(m_a, m_b)`` with score ``s_a``; the ``r_t`` largest ``s_a``
   are merged into their ``b(a)``, with ``r_t = min(r_left, (n - 1) // 2)`` (the official loop's cap).
3. Merge by averaging weighted by size: ``x_b' = (s_b x_b + sum_a s_a x_a) / (s_b + sum_a s_a)``; the metric is
   averaged the same way (for the next round) and sizes add up.
4. The survivors keep their spatial order (the official ``transform_index``: unmerged ``A`` tokens and ``B``
   tokens interleaved by their index), unlike ToMe's ``[unmerged A, B]``.

Rounds repeat until ``r`` tokens are gone: ``N -> N - r``. With ``r <= (N - 1) // 2`` FOLDER is a single ToMe
matching (up to the order of the output). Sums ``sum_i s_i x_i`` and ``sum_i s_i`` are preserved.

Tie-breaking (discrete outputs are compared exactly): ``b(a)`` is the lowest-index ``B`` token among equal
scores; edges with equal scores are ranked by increasing ``A`` index (a stable sort). A tie is one of the scores
as computed: similarities equal in exact arithmetic (quantised keys) can round apart in the fast paths' other
summation orders, so only ties that survive rounding are guaranteed to break alike.

Shape legend:
    x: ``[N, C]`` tokens; keys: ``[H, N, d]`` the block's keys (averaged over heads), or ``[N, d]`` a metric used as
    given; size: ``[N]`` > 0 patches per token; r: tokens to remove, ``0 <= r <= max_reduction(N)``.
    returns: ``merged[N - r, C]``, ``size_out[N - r]``, ``unmerge_map int64[N]`` with values in ``[0, N - r)``.

Deviations from the paper: the LLaVA-1.5 integration adds Turbo's informativity term (``- alpha * 100 *`` the
class token's attention to each ``A`` token) to the scores; the tiny VLM has no class token, so the reference uses
plain cosine (the official simplified ``merge_features`` does the same, on features rather than keys). The
simplified version also multiplies the output by ``1 + log(size)``; that is an option of the tiny-VLM policy
(``log_size_scale``, off by default as in the LLaVA integration). The official ``r_threshold`` (skip merging below
40 tokens) is not applied. The tiny-VLM default merges in the last of the 3 encoder blocks, 70% fewer tokens
(144 -> 43), the paper's headline ratio. The survivors' spatial order is that of the official standalone
``merge_features``; the repository's BLIP integration returns ToMe's ``[unmerged A, B]`` order instead, and since
``A``/``B`` are the even/odd positions of the current sequence, the order changes which tokens later fold rounds
pair up.
"""

from __future__ import annotations

import numpy as np

from mllm_ref import _checks
from mllm_ref.oracle.registry import Technique, register
from mllm_ref.tinyvlm.plugs import EncoderView, Plugs, TokenPolicy, VisualTokens
from mllm_ref.tokens._common import keep_count, l2_normalize, merge_into
from mllm_ref.tokens.tome import _metric, _validate_tokens, compose_source, unmerge

__all__ = ["folder_merge", "unmerge", "max_reduction", "fold_schedule", "FolderPolicy", "make_policy", "DEFAULT_KEEP"]

#: Tiny-VLM default: keep 30% of the visual tokens (FOLDER's headline "70% fewer tokens"), 144 -> 43.
DEFAULT_KEEP = 0.3


def fold_schedule(n: int, r: int) -> list[int]:
    """Tokens removed by each fold round when taking ``n`` tokens down by ``r``: ``min(r_left, (n_t - 1) // 2)``."""
    out = []
    while r > 0:
        r_t = min(r, (n - 1) // 2)
        if r_t <= 0:
            break
        out.append(r_t)
        n, r = n - r_t, r - r_t
    return out


def max_reduction(n: int) -> int:
    """The most tokens folding can remove from ``n`` (rounds of ``(n - 1) // 2`` stop at 2 tokens)."""
    n = _checks.integer(n, "n", low=0)
    return sum(fold_schedule(n, n))


def _validate(x, keys, r, size):
    """Shared entry checks (also used by the fast paths). Returns ``(x, keys, r, size)``."""
    x, keys, size = _validate_tokens(x, keys, size)
    r = _checks.integer(r, "r", low=0, high=max_reduction(x.shape[0]))
    return x, keys, r, size


def _round_map(metric: np.ndarray, r: int, margins: list | None = None) -> np.ndarray:
    """One fold round on ``n`` tokens: the map from each token to its survivor, survivors in spatial order."""
    n = metric.shape[0]
    m = l2_normalize(metric)
    scores = m[0::2] @ m[1::2].T  # [nA, nB]
    node_idx = np.argmax(scores, axis=1)
    node_max = scores[np.arange(scores.shape[0]), node_idx]
    edge_order = np.argsort(-node_max, kind="stable")
    src = edge_order[:r]
    if margins is not None:  # how far the decisions are from a tie (used to draw well-conditioned test cases)
        top = np.sort(scores[src], axis=1)
        margins.append(float(np.min(top[:, -1] - top[:, -2])) if scores.shape[1] > 1 else 1.0)
        if r < len(edge_order):
            margins.append(float(node_max[edge_order[r - 1]] - node_max[edge_order[r]]))
    merged_away = np.zeros(n, dtype=bool)
    merged_away[2 * src] = True
    survivor_index = np.cumsum(~merged_away) - 1  # spatial order of the survivors
    out = survivor_index.astype(np.int64)
    out[2 * src] = survivor_index[2 * node_idx[src] + 1]
    return out


def _fold(x, metric, size, r, margins=None):
    n = x.shape[0]
    umap = np.arange(n, dtype=np.int64)
    for r_t in fold_schedule(n, r):
        step = _round_map(metric, r_t, margins)
        n_out = metric.shape[0] - r_t
        metric, _ = merge_into(metric, size, step, n_out)
        x, size = merge_into(x, size, step, n_out)
        umap = step[umap]
    return x, size, umap


def folder_merge(
    x: np.ndarray, keys: np.ndarray, r: int, size: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Remove ``r`` of the ``N`` tokens of ``x`` by FOLDER's folded bipartite matching on ``keys``.

    Args:
        x: ``float[N, C]`` the tokens (the last block's hidden state after attention).
        keys: ``float[H, N, d]`` the block's keys (averaged over heads to get the metric) or ``float[N, d]``.
        r: tokens to remove, ``0 <= r <= max_reduction(N)`` (``N - 2`` for ``N >= 2``); 0 is the identity.
        size: ``float[N]`` > 0, patches each token stands for (default all 1).

    Returns:
        ``(merged[N - r, C], size_out[N - r], unmerge_map int64[N])``: the merged tokens in spatial order (by the
        index of the token each survivor was), their sizes, and for each input token the output that carries it.
    """
    x, keys, r, size = _validate(x, keys, r, size)
    if r == 0:
        return x.copy(), size.copy(), np.arange(x.shape[0], dtype=np.int64)
    return _fold(x, _metric(keys), size, r)


# --------------------------------------------------------------------------------------------------------------
# The tiny-VLM policy.


class FolderPolicy(TokenPolicy):
    """FOLDER in the tiny VLM: all the reduction in the last encoder block (``layer``, default the last), keys
    averaged over heads as the metric, folded until ``keep_count(N, keep_ratio)`` tokens remain.

    Args:
        keep_ratio: fraction of the block's tokens kept (default 0.3: 70% fewer).
        layer: the encoder block that folds (negative counts from the end; the tiny VLM has 3 blocks).
        log_size_scale: multiply the connector's outputs by ``1 + log(size)`` (the official simplified
            ``merge_features`` does so after merging; the LLaVA integration does not).
        n_layers: encoder blocks of the model (3 for the tiny VLM), to resolve a negative ``layer``.
    """

    name = "folder"

    def __init__(self, keep_ratio: float = DEFAULT_KEEP, *, layer: int = -1, log_size_scale: bool = False,
                 n_layers: int = 3):  # fmt: skip
        self.keep_ratio = _checks.real(keep_ratio, "keep_ratio", low=0.0, high=1.0)
        n_layers = _checks.integer(n_layers, "n_layers", low=1)
        layer = _checks.integer(layer, "layer", low=-n_layers, high=n_layers - 1)
        self.layer = layer % n_layers
        if not isinstance(log_size_scale, bool):
            raise TypeError(f"log_size_scale must be a bool, got {type(log_size_scale).__name__}")
        self.log_size_scale = log_size_scale

    def in_encoder(self, layer, tokens: VisualTokens, keys, prompt_ids) -> VisualTokens:
        if layer != self.layer:
            return tokens
        r = min(tokens.n - keep_count(tokens.n, self.keep_ratio), max_reduction(tokens.n))
        if r == 0:
            return tokens
        merged, size, umap = folder_merge(tokens.x, keys, r, tokens.size)
        return VisualTokens(merged, size, compose_source(tokens.source, umap), tokens.grid)

    def after_connector(self, tokens: VisualTokens, prompt_ids, encoder: EncoderView) -> VisualTokens:
        if not self.log_size_scale:
            return tokens
        scale = (1.0 + np.log(tokens.size.astype(np.float64))).astype(tokens.x.dtype)
        return VisualTokens(tokens.x * scale[:, None], tokens.size, tokens.source, tokens.grid)


def make_policy(keep_ratio: float) -> FolderPolicy:
    """FOLDER keeping ``keep_ratio`` of the visual tokens, all folded in the encoder's last block.

    ``keep_ratio`` maps to ``keep_count(144, keep_ratio)`` tokens (at least 2: folding stops there).
    """
    return FolderPolicy(keep_ratio)


# --------------------------------------------------------------------------------------------------------------
# Registration: cases whose decisions are far from ties, cost and Hypothesis strategy.

_SIZES = {  # N tokens, H heads, d key width, C token width, r
    "tiny": (6, 2, 4, 3, 4),
    "one_round": (13, 4, 8, 5, 5),
    "fold": (40, 4, 12, 24, 28),
    "deep_fold": (31, 3, 6, 8, 29),
    "r0": (9, 2, 8, 4, 0),
    "bench_576": (576, 16, 64, 1024, 403),
    "bench_1024": (1024, 8, 64, 256, 717),
}

#: Smallest distance of any decision from a tie in the seeded and drawn cases (float32 runs agree with float64).
MIN_MARGIN = 2e-3


def well_separated_case(n, h, d, c, r, rng, dtype=np.float32, tries: int = 200) -> dict:
    """Random tokens and keys whose fold decisions (the merged ``A`` tokens' best matches and the cut between
    merged and kept edges, in every round) are at least :data:`MIN_MARGIN` from a tie, in float64."""
    for _ in range(tries):
        keys = rng.standard_normal((h, n, d))
        size = rng.integers(1, 5, n).astype(np.float64)
        margins: list[float] = []
        _fold(np.zeros((n, 1)), keys.mean(axis=0), size, r, margins)
        if not margins or min(margins) >= MIN_MARGIN:
            x = rng.standard_normal((n, c))
            return {"x": x.astype(dtype), "keys": keys.astype(dtype), "r": r, "size": size.astype(dtype)}
    raise RuntimeError(f"no well-separated case found for n={n}, r={r}")  # pragma: no cover


def _case(size: str, rng: np.random.Generator) -> dict:
    n, h, d, c, r = _SIZES[size]
    if size.startswith("bench"):
        keys = rng.standard_normal((h, n, d)).astype(np.float32)
        x = rng.standard_normal((n, c)).astype(np.float32)
        return {"x": x, "keys": keys, "r": r, "size": np.ones(n, dtype=np.float32)}
    return well_separated_case(n, h, d, c, r, rng)


def _cost(kwargs: dict) -> dict:
    x, keys = kwargs["x"], kwargs["keys"]
    n, c = x.shape
    d = keys.shape[-1]
    flops, m = float(keys.size), n
    for r_t in fold_schedule(n, kwargs["r"]):
        flops += 3.0 * m * d + 2.0 * (m // 2) * ((m + 1) // 2) * d + 3.0 * m * (c + d)
        m -= r_t
    return {"flops": flops, "bytes": float(x.nbytes * 2 + keys.nbytes + kwargs["size"].nbytes * 2)}


def _strategy():
    from hypothesis import strategies as st

    @st.composite
    def cases(draw):
        n = draw(st.integers(2, 40))
        h = draw(st.integers(1, 4))
        d = draw(st.integers(2, 12))
        c = draw(st.integers(1, 9))
        r = draw(st.integers(0, max_reduction(n)))
        seed = draw(st.integers(0, 2**32 - 1))
        dtype = draw(st.sampled_from([np.float32, np.float64]))
        return well_separated_case(n, h, d, c, r, np.random.default_rng(seed), dtype, tries=1000)

    return cases()


register(
    Technique(
        id="tokens.folder",
        reference=folder_merge,
        make_case=_case,
        paper=(
            "H. Wang, Z. Yu, G. Spadaro, C. Ju, V. Quetu, S. Xiao, E. Tartaglione, FOLDER: Accelerating Multi-modal "
            "Large Language Models with Enhanced Performance, ICCV 2025 (arXiv:2501.02430)"
        ),
        test_sizes=("tiny", "one_round", "fold", "deep_fold", "r0"),
        bench_sizes=("bench_576", "bench_1024"),
        compare="tolerance",
        strategy=_strategy,
        cost=_cost,
        chapter="book/02-fewer-visual-tokens.md",
        model_level=True,
        notes=(
            "no class token, so no Turbo informativity term (plain key cosine); spatial output order and fold cap "
            "(n-1)//2 as the official merge_features; 1+log(size) scaling off by default; tiny VLM: all in the last "
            "of 3 encoder blocks, 144 -> 43 tokens"
        ),
        extra={
            "plugs": lambda model: Plugs(token_policy=FolderPolicy(DEFAULT_KEEP)),
            "setting": "70% fewer tokens folded in the last encoder block (144 -> 43)",
        },
    )
)
