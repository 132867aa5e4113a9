"""Paged KV cache: fixed-size blocks, block tables, a free list, ref counts, copy-on-write; paged decode attention.

Paper: Woosuk Kwon, Zhuohan Li, Siyuan Zhuang, Ying Sheng, Lianmin Zheng, Cody Hao Yu, Joseph E. Gonzalez, Hao
Zhang and Ion Stoica, "Efficient Memory Management for Large Language Model Serving with PagedAttention", SOSP 2023
(arXiv:2309.06180); the design follows vLLM (block manager, block tables, ``paged_attention`` decode kernel).

The idea. A contiguous per-request cache must reserve room for the longest possible output, and the reserved but
unused room (internal fragmentation) plus the gaps between requests (external fragmentation) waste most of the
memory. PagedAttention cuts the cache into *blocks* of ``Bs`` tokens, allocated on demand from one pool like pages
of virtual memory. A sequence keeps a *block table*, its logical blocks mapped to physical ones::

    token t of a sequence  ->  physical block  table[t // Bs],  slot  t % Bs
    memory of n tokens     =   ceil(n / Bs) blocks:  at most Bs - 1 slots wasted, in the last block

Blocks carry *reference counts*. :func:`fork` (parallel sampling, beam search, a shared prompt) copies only the
table and increments the counts: the sequences share their blocks. A full block is never written again, so sharing
it is free; before a sequence writes into a *shared* partly-filled last block, :func:`append` copies that block to
a fresh one (copy-on-write) and decrements the old block's count. :func:`free` decrements every count of a table;
blocks that reach zero go back on the free list.

Decode attention gathers through the block table (:func:`paged_attention`), for query head ``h`` of sequence ``b``
reading kv head ``j = h // g`` (``g = H / Hkv``, grouped-query attention) and its ``C_b = context_lens[b]`` tokens::

    K_b[t] = k_blocks[block_tables[b, t // Bs], j, t % Bs]          t = 0 .. C_b - 1   (V_b likewise)
    s_t    = scale * q[b, h] . K_b[t]                                scale = 1 / sqrt(d) unless given
    out[b, h] = sum_t softmax(s)_t V_b[t]                            (zeros when C_b = 0)

which equals ordinary attention over the contiguous cache: only the addressing changes. The reference gathers each
sequence's blocks into a contiguous copy and calls :func:`mllm_ref.nn.attention.attention`; the fast paths read the
blocks in place.

Shape legend:
    N blocks in the pool, Hkv key/value heads, Bs tokens per block, d key head size, dv value head size,
    B sequences in a decode batch, H query heads (a multiple of Hkv), M block-table columns.
    q: ``float[B, H, d]`` (one new token per sequence, rotated); k_blocks: ``float[N, Hkv, Bs, d]``; v_blocks:
    ``float[N, Hkv, Bs, dv]``; block_tables: ``int[B, M]``, every entry a block id in ``[0, N)`` (columns past a
    sequence's last block are not read, but must still be valid ids; pad with 0); context_lens: ``int[B]``,
    ``0 <= C_b <= M * Bs``; returns ``float[B, H, dv]`` in q's dtype.

On the tiny VLM, :class:`PagedKV` keeps each layer's cache in blocks of 16 (vLLM's default). The ~150-175 tokens
of a request fill 10-11 blocks, so at most 15 slots per layer (under 10%) are allocated but empty; ``nbytes``
counts whole allocated blocks, so the tour shows that waste. Decoding attends through :func:`paged_attention`, and
the outputs equal the plain cache's up to float32 rounding (the same tokens are generated).

Deviations from the paper: vLLM lays keys out as ``[N, Hkv, d/x, Bs, x]`` and values as ``[N, Hkv, dv, Bs]`` for
coalesced GPU loads; here both are ``[N, Hkv, Bs, d]``. Values are immutable: every write returns a new pool (a
copy of the arrays), where an engine writes in place. The free list is first-in first-out (freed blocks go to the
back, allocation takes the front), like vLLM v1's free-block queue, without its prefix-cache eviction (see
:mod:`mllm_ref.kvcache.prefix`). There is no preemption or swapping: running out of blocks raises
:class:`OutOfBlocks`, and :class:`PagedKV` grows its per-request pool instead. Only decode (one query token per
sequence) is paged; the prefill attends over its own contiguous keys, then writes them into blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mllm_ref import _checks
from mllm_ref.nn.attention import attention
from mllm_ref.oracle.registry import Technique, register
from mllm_ref.tinyvlm.plugs import KVPolicy, Plugs

__all__ = [
    "BlockPool",
    "BlockTable",
    "OutOfBlocks",
    "new_pool",
    "blocks_needed",
    "append",
    "fork",
    "free",
    "grow",
    "gather",
    "table_array",
    "paged_attention",
    "PagedKV",
]


class OutOfBlocks(MemoryError):
    """The pool has fewer free blocks than a write needs (an engine would preempt or swap a request)."""


@dataclass(frozen=True, eq=False)
class BlockPool:
    """The physical blocks shared by all sequences.

    Attributes:
        k_blocks: ``float[N, Hkv, Bs, d]`` keys (rotated), v_blocks: ``float[N, Hkv, Bs, dv]`` values.
        ref_counts: ``int64[N]``: how many block tables hold each block (0: free).
        free: ids of the free blocks, in the order they are handed out.
    """

    k_blocks: np.ndarray
    v_blocks: np.ndarray
    ref_counts: np.ndarray
    free: tuple[int, ...]

    @property
    def n_blocks(self) -> int:
        return int(self.k_blocks.shape[0])

    @property
    def block_size(self) -> int:
        return int(self.k_blocks.shape[2])

    @property
    def n_free(self) -> int:
        return len(self.free)

    @property
    def block_nbytes(self) -> int:
        """Bytes of one block, keys and values."""
        return int(self.k_blocks[0].nbytes + self.v_blocks[0].nbytes)


@dataclass(frozen=True)
class BlockTable:
    """One sequence's logical-to-physical map: ``blocks[i]`` holds its tokens ``i * Bs .. (i + 1) * Bs - 1``."""

    blocks: tuple[int, ...] = ()
    length: int = 0


def blocks_needed(n_tokens: int, block_size: int) -> int:
    """``ceil(n_tokens / block_size)``: the blocks that hold ``n_tokens`` tokens."""
    n_tokens = _checks.integer(n_tokens, "n_tokens", low=0)
    block_size = _checks.integer(block_size, "block_size", low=1)
    return -(-n_tokens // block_size)


def new_pool(n_blocks: int, kv_heads: int, block_size: int, head_dim: int, value_dim: int | None = None,
             dtype=np.float32) -> BlockPool:  # fmt: skip
    """An all-free pool of ``n_blocks`` zeroed blocks, handed out in the order ``0, 1, ...``."""
    n_blocks = _checks.integer(n_blocks, "n_blocks", low=0)
    kv_heads = _checks.integer(kv_heads, "kv_heads", low=1)
    block_size = _checks.integer(block_size, "block_size", low=1)
    head_dim = _checks.integer(head_dim, "head_dim", low=1)
    value_dim = head_dim if value_dim is None else _checks.integer(value_dim, "value_dim", low=1)
    dtype = np.dtype(dtype)
    if dtype.type not in _checks.FLOAT_DTYPES:
        raise TypeError(f"dtype must be float16, float32 or float64, got {dtype}")
    return BlockPool(
        np.zeros((n_blocks, kv_heads, block_size, head_dim), dtype=dtype),
        np.zeros((n_blocks, kv_heads, block_size, value_dim), dtype=dtype),
        np.zeros(n_blocks, dtype=np.int64),
        tuple(range(n_blocks)),
    )


def _check_pool(pool) -> BlockPool:
    if not isinstance(pool, BlockPool):
        raise TypeError(f"pool must be a BlockPool, got {type(pool).__name__}")
    return pool


def _check_table(table, pool: BlockPool) -> BlockTable:
    if not isinstance(table, BlockTable):
        raise TypeError(f"table must be a BlockTable, got {type(table).__name__}")
    if blocks_needed(table.length, pool.block_size) != len(table.blocks):
        raise ValueError(f"table holds {len(table.blocks)} blocks for {table.length} tokens of block size "
                         f"{pool.block_size}")  # fmt: skip
    for b in table.blocks:
        if not 0 <= b < pool.n_blocks or pool.ref_counts[b] < 1:
            raise ValueError(f"table refers to block {b}, which is not an allocated block of the pool")
    return table


def _take(free: list[int], n: int, pool: BlockPool) -> list[int]:
    if n > len(free):
        raise OutOfBlocks(f"the pool has {len(free)} free blocks of {pool.n_blocks}, the write needs {n}")
    taken = free[:n]
    del free[:n]
    return taken


def append(pool: BlockPool, table: BlockTable, k: np.ndarray, v: np.ndarray) -> tuple[BlockPool, BlockTable]:
    """Write ``t`` new tokens at the end of a sequence, allocating blocks as needed (copy-on-write on a shared,
    partly filled last block).

    Args:
        pool: the pool; table: the sequence's block table.
        k: ``float[Hkv, t, d]`` keys, v: ``float[Hkv, t, dv]`` values, in the pool's dtype.

    Returns:
        ``(new pool, new table)``; the inputs are not modified.
    """
    pool = _check_pool(pool)
    table = _check_table(table, pool)
    k = _checks.float_array(k, "k", ndim=3, allow_empty=True)
    v = _checks.float_array(v, "v", ndim=3, allow_empty=True)
    if k.dtype != pool.k_blocks.dtype or v.dtype != pool.k_blocks.dtype:
        raise TypeError(f"k and v must have the pool's dtype {pool.k_blocks.dtype}, got {k.dtype} and {v.dtype}")
    _, hkv, bs, d = pool.k_blocks.shape
    if k.shape[0] != hkv or k.shape[2] != d:
        raise ValueError(f"k must have shape [{hkv}, t, {d}] (the pool's kv heads and head size), got {k.shape}")
    if v.shape != (hkv, k.shape[1], pool.v_blocks.shape[3]):
        raise ValueError(f"v must have shape [{hkv}, {k.shape[1]}, {pool.v_blocks.shape[3]}], got {v.shape}")
    t = k.shape[1]
    if t == 0:
        return pool, table
    blocks = list(table.blocks)
    free = list(pool.free)
    refs = pool.ref_counts.copy()
    kb, vb = pool.k_blocks.copy(), pool.v_blocks.copy()
    filled = table.length % bs
    if filled and refs[blocks[-1]] > 1:  # copy-on-write: the partly filled last block is shared
        old = blocks[-1]
        (new,) = _take(free, 1, pool)
        kb[new, :, :filled], vb[new, :, :filled] = kb[old, :, :filled], vb[old, :, :filled]
        refs[old] -= 1
        refs[new] = 1
        blocks[-1] = new
    fresh = _take(free, blocks_needed(table.length + t, bs) - len(blocks), pool)
    refs[fresh] = 1
    blocks += fresh
    pos = np.arange(table.length, table.length + t)
    ids = np.asarray(blocks, dtype=np.int64)[pos // bs]
    kb[ids, :, pos % bs] = k.transpose(1, 0, 2)  # advanced indices first: [t, Hkv, d]
    vb[ids, :, pos % bs] = v.transpose(1, 0, 2)
    return BlockPool(kb, vb, refs, tuple(free)), BlockTable(tuple(blocks), table.length + t)


def fork(pool: BlockPool, table: BlockTable) -> tuple[BlockPool, BlockTable]:
    """A second sequence sharing every block of ``table`` (ref counts + 1): ``(new pool, the child's table)``."""
    pool = _check_pool(pool)
    table = _check_table(table, pool)
    refs = pool.ref_counts.copy()
    np.add.at(refs, np.asarray(table.blocks, dtype=np.int64), 1)
    return BlockPool(pool.k_blocks, pool.v_blocks, refs, pool.free), BlockTable(table.blocks, table.length)


def free(pool: BlockPool, table: BlockTable) -> BlockPool:
    """Release a sequence: ref counts - 1; blocks that reach 0 go to the back of the free list (in table order)."""
    pool = _check_pool(pool)
    table = _check_table(table, pool)
    refs = pool.ref_counts.copy()
    released = []
    for b in table.blocks:
        refs[b] -= 1
        if refs[b] == 0:
            released.append(b)
    return BlockPool(pool.k_blocks, pool.v_blocks, refs, pool.free + tuple(released))


def grow(pool: BlockPool, n_more: int) -> BlockPool:
    """The pool with ``n_more`` new free blocks (ids ``N .. N + n_more - 1``) at the back of the free list."""
    pool = _check_pool(pool)
    n_more = _checks.integer(n_more, "n_more", low=0)
    shape_k, shape_v = pool.k_blocks.shape, pool.v_blocks.shape
    kb = np.concatenate([pool.k_blocks, np.zeros((n_more, *shape_k[1:]), dtype=pool.k_blocks.dtype)])
    vb = np.concatenate([pool.v_blocks, np.zeros((n_more, *shape_v[1:]), dtype=pool.v_blocks.dtype)])
    refs = np.concatenate([pool.ref_counts, np.zeros(n_more, dtype=np.int64)])
    return BlockPool(kb, vb, refs, pool.free + tuple(range(pool.n_blocks, pool.n_blocks + n_more)))


def gather(pool: BlockPool, table: BlockTable) -> tuple[np.ndarray, np.ndarray]:
    """The sequence's keys and values as contiguous arrays ``[Hkv, S, d]`` and ``[Hkv, S, dv]`` (copies)."""
    pool = _check_pool(pool)
    table = _check_table(table, pool)
    ids = np.asarray(table.blocks, dtype=np.int64)
    _, hkv, bs, d = pool.k_blocks.shape
    k = pool.k_blocks[ids].transpose(1, 0, 2, 3).reshape(hkv, ids.size * bs, d)[:, : table.length]
    v = pool.v_blocks[ids].transpose(1, 0, 2, 3).reshape(hkv, ids.size * bs, pool.v_blocks.shape[3])
    return k, v[:, : table.length]


def table_array(tables, pad: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(block_tables int64[B, M], context_lens int64[B])`` of a list of :class:`BlockTable` for
    :func:`paged_attention`; short rows are padded with block id ``pad``."""
    tables = list(tables)
    for t in tables:
        if not isinstance(t, BlockTable):
            raise TypeError(f"tables must hold BlockTable values, got {type(t).__name__}")
    width = max((len(t.blocks) for t in tables), default=0)
    out = np.full((len(tables), width), _checks.integer(pad, "pad", low=0), dtype=np.int64)
    for i, t in enumerate(tables):
        out[i, : len(t.blocks)] = t.blocks
    return out, np.array([t.length for t in tables], dtype=np.int64)


# --------------------------------------------------------------------------------------------- paged attention
def _validate(q, k_blocks, v_blocks, block_tables, context_lens, scale, *, finite_kv: bool = True):
    """Entry checks shared with the fast paths. ``finite_kv=False`` leaves the NaN/inf scan of the pool to a fast
    path that detects them itself and raises the same ``ValueError``."""
    q = _checks.float_array(q, "q", ndim=3)
    k_blocks = _checks.float_array(k_blocks, "k_blocks", ndim=4, allow_nonfinite=not finite_kv)
    v_blocks = _checks.float_array(v_blocks, "v_blocks", ndim=4, allow_nonfinite=not finite_kv)
    _checks.same_dtype("q", q, "k_blocks", k_blocks)
    _checks.same_dtype("q", q, "v_blocks", v_blocks)
    b, h, d = q.shape
    n, hkv, bs, dk = k_blocks.shape
    if dk != d:
        raise ValueError(f"k_blocks has head size {dk} (axis 3) but q has {d} (axis 2)")
    _checks.dim("v_blocks", v_blocks, 0, n, "the blocks of k_blocks")
    _checks.dim("v_blocks", v_blocks, 1, hkv, "the kv heads of k_blocks")
    _checks.dim("v_blocks", v_blocks, 2, bs, "the block size of k_blocks")
    if h % hkv:
        raise ValueError(f"q has H = {h} heads, not a multiple of the Hkv = {hkv} heads of k_blocks")
    block_tables = _checks.int_array(block_tables, "block_tables", ndim=2, low=0, high=n - 1)
    if block_tables.shape[0] != b:
        raise ValueError(f"block_tables must have one row per sequence of q ({b}), got shape {block_tables.shape}")
    context_lens = _checks.int_array(context_lens, "context_lens", ndim=1, low=0)
    if context_lens.shape != (b,):
        raise ValueError(f"context_lens must have shape ({b},) (the sequences of q), got {context_lens.shape}")
    cap = block_tables.shape[1] * bs
    if b and context_lens.max() > cap:
        raise ValueError(f"context_lens holds {context_lens.max()} tokens, more than the {block_tables.shape[1]} "
                         f"columns of block_tables of {bs} tokens each hold ({cap})")  # fmt: skip
    if scale is None:
        scale = 1.0 / np.sqrt(d)
    else:
        scale = _checks.real(scale, "scale", low=0.0, low_open=True)
        with np.errstate(over="ignore", under="ignore"):
            scale_q = q.dtype.type(scale)
        if not 0 < scale_q < np.inf:
            raise ValueError(f"scale must stay positive and finite in q's dtype {q.dtype}, got {scale}")
    return q, k_blocks, v_blocks, block_tables.astype(np.int64), context_lens.astype(np.int64), float(scale)


def paged_attention(q, k_blocks, v_blocks, block_tables, context_lens, scale=None):
    """Decode attention of one new token per sequence over its paged cache (grouped-query heads).

    Args:
        q: ``float[B, H, d]`` the new tokens' rotated queries.
        k_blocks: ``float[N, Hkv, Bs, d]`` the pool's keys (rotated); v_blocks: ``float[N, Hkv, Bs, dv]`` its
            values; same dtype as ``q``, finite.
        block_tables: ``int[B, M]``, block ids in ``[0, N)``: sequence ``b``'s token ``t`` is in block
            ``block_tables[b, t // Bs]``, slot ``t % Bs``.
        context_lens: ``int[B]``, the cached tokens of each sequence (the new token included, if it was written
            before attending), ``0 <= C_b <= M * Bs``.
        scale: score multiplier > 0; default ``1 / sqrt(d)``.

    Returns:
        ``out[B, H, dv]`` in q's dtype (zeros for a sequence with ``C_b = 0``).
    """
    q, k_blocks, v_blocks, block_tables, context_lens, scale = _validate(
        q, k_blocks, v_blocks, block_tables, context_lens, scale
    )
    b, h, _ = q.shape
    _, hkv, bs, _ = k_blocks.shape
    out = np.zeros((b, h, v_blocks.shape[3]), dtype=q.dtype)
    for i in range(b):
        c = int(context_lens[i])
        if c == 0:
            continue
        ids = block_tables[i, : -(-c // bs)]
        k = k_blocks[ids].transpose(1, 0, 2, 3).reshape(hkv, ids.size * bs, -1)[:, :c]
        v = v_blocks[ids].transpose(1, 0, 2, 3).reshape(hkv, ids.size * bs, -1)[:, :c]
        out[i] = attention(q[i][None, :, None], k[None], v[None], scale=scale)[0, :, 0]
    return out


# ------------------------------------------------------------------------------------------- the tiny VLM plug
DEFAULT_BLOCK_SIZE = 16  # vLLM's default


@dataclass(frozen=True, eq=False)
class PagedLayerCache:
    """One layer's cache of one request: the pool and the request's block table."""

    pool: BlockPool
    table: BlockTable


class PagedKV(KVPolicy):
    """The tiny VLM's cache in blocks of ``block_size`` tokens, decoded through :func:`paged_attention`.

    Each layer's cache value holds its own pool (one request at a time here), sized to the prefill plus
    ``headroom`` blocks and grown by ``headroom`` blocks when full; :meth:`nbytes` counts the blocks the request
    holds (whole blocks: the empty slots of the last one are paid for), not the free ones.
    """

    name = "paged"

    def __init__(self, block_size: int = DEFAULT_BLOCK_SIZE, headroom: int = 2):
        self.block_size = _checks.integer(block_size, "block_size", low=1)
        self.headroom = _checks.integer(headroom, "headroom", low=1)

    def store(self, layer, k, v, attn, info, *, positions, n_visual):
        pool = new_pool(blocks_needed(k.shape[1], self.block_size) + self.headroom, k.shape[0], self.block_size,
                        k.shape[2], v.shape[2], dtype=k.dtype)  # fmt: skip
        return PagedLayerCache(*append(pool, BlockTable(), k, v))

    def extend(self, layer, cache, k, v, attn, *, position):
        pool, table = cache.pool, cache.table
        if blocks_needed(table.length + k.shape[1], self.block_size) - len(table.blocks) > pool.n_free:
            pool = grow(pool, self.headroom)
        return PagedLayerCache(*append(pool, table, k, v))

    def read(self, layer, cache):
        return gather(cache.pool, cache.table)

    def attend(self, layer, cache, q, k, v, *, want_weights):
        if want_weights:
            return None  # the model reads the cache and computes the weights itself
        full = self.extend(layer, cache, k, v, None, position=0)  # the new token attends to itself too
        tables, lens = table_array([full.table])
        out = paged_attention(q.transpose(1, 0, 2), full.pool.k_blocks, full.pool.v_blocks, tables, lens)
        return out.transpose(1, 0, 2), None  # [1, H, dv] -> [H, 1, dv]

    def length(self, layer, cache):
        return cache.table.length

    def nbytes(self, cache):
        return len(cache.table.blocks) * cache.pool.block_nbytes


# ----------------------------------------------------------------------------------------------- registration
_SIZES = {
    # name: (B, H, Hkv, Bs, d, dv, contexts, spare blocks, dtype, scale)
    "tiny": (1, 1, 1, 2, 2, 3, (3,), 1, np.float64, None),
    "small-gqa": (3, 4, 2, 4, 8, 8, (9, 13, 16), 3, np.float32, None),
    "ragged": (4, 6, 3, 8, 16, 12, (37, 0, 8, 20), 2, np.float32, 0.3),
    "tinyvlm": (1, 4, 2, 16, 32, 32, (161,), 2, np.float32, None),
    "bench-mha-4k": (1, 32, 32, 16, 128, 128, (4096,), 0, np.float32, None),
    "bench-gqa-4x4k": (4, 32, 8, 16, 128, 128, (4096, 4000, 3077, 4096), 0, np.float32, None),
}


def _paged_case(rng, b, h, hkv, bs, d, dv, contexts, spare, dtype, scale, *, prefix_share=True):
    """A pool whose blocks are handed out in a shuffled order; sequences 0 and 1 share their first full blocks
    (a forked prompt) when both are long enough."""
    need = [-(-c // bs) for c in contexts]
    shared = min(contexts[0] // bs, contexts[1] // bs) if prefix_share and b > 1 else 0
    n = max(sum(need) - shared + spare, 1)
    order = rng.permutation(n)
    width = max(max(need), 1)
    tables = np.zeros((b, width), dtype=np.int64)
    nxt = 0
    for i, m in enumerate(need):
        start = shared if i == 1 else 0
        if i == 1:
            tables[1, :shared] = tables[0, :shared]
        tables[i, start:m] = order[nxt : nxt + m - start]
        nxt += m - start
    return {
        "q": rng.standard_normal((b, h, d)).astype(dtype),
        "k_blocks": rng.standard_normal((n, hkv, bs, d)).astype(dtype),
        "v_blocks": rng.standard_normal((n, hkv, bs, dv)).astype(dtype),
        "block_tables": tables,
        "context_lens": np.array(contexts, dtype=np.int64),
        "scale": scale,
    }


def _case(size: str, rng: np.random.Generator) -> dict:
    return _paged_case(rng, *_SIZES[size])


def _cost(kw: dict) -> dict:
    """Every cached key and value a sequence attends over is read once; the queries read, the outputs written."""
    b, h, d = kw["q"].shape
    hkv, dv = kw["k_blocks"].shape[1], kw["v_blocks"].shape[3]
    tokens = float(np.sum(kw["context_lens"]))
    item = kw["q"].itemsize
    return {"flops": 2.0 * h * tokens * (d + dv), "bytes": tokens * hkv * (d + dv) * item + 2.0 * b * h * d * item}


def _strategy():
    from hypothesis import strategies as st

    @st.composite
    def cases(draw):
        b = draw(st.integers(1, 4))
        hkv = draw(st.integers(1, 3))
        h = hkv * draw(st.integers(1, 3))
        bs = draw(st.integers(1, 8))
        d = 2 * draw(st.integers(1, 8))
        dv = draw(st.integers(1, 12))
        contexts = tuple(draw(st.lists(st.integers(0, 40), min_size=b, max_size=b)))
        spare = draw(st.integers(0, 3))
        dtype = draw(st.sampled_from([np.float32, np.float64]))
        scale = draw(st.sampled_from([None, 0.25, 1.0]))
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        return _paged_case(rng, b, h, hkv, bs, d, dv, contexts, spare, dtype, scale)

    return cases()


register(
    Technique(
        id="kvcache.paged",
        reference=paged_attention,
        make_case=_case,
        paper=(
            "W. Kwon, Z. Li, S. Zhuang, Y. Sheng, L. Zheng, C. H. Yu, J. E. Gonzalez, H. Zhang, I. Stoica, Efficient "
            "Memory Management for Large Language Model Serving with PagedAttention, SOSP 2023 (arXiv 2309.06180)"
        ),
        test_sizes=("tiny", "small-gqa", "ragged", "tinyvlm"),
        bench_sizes=("bench-mha-4k", "bench-gqa-4x4k"),
        compare="tolerance",
        float_args=("q", "k_blocks", "v_blocks"),
        strategy=_strategy,
        cost=_cost,
        chapter="book/04-kv-cache.md",
        model_level=True,
        notes=(
            "blocks of 16 tokens on the tiny VLM: the same answers, KV bytes counted in whole blocks (the last "
            "block's empty slots); layout [N, Hkv, Bs, d] instead of vLLM's vectorised key layout"
        ),
        extra={
            "plugs": lambda model: Plugs(kv_policy=PagedKV(DEFAULT_BLOCK_SIZE)),
            "setting": f"block {DEFAULT_BLOCK_SIZE}",
            "question_after_image": True,
        },
    )
)
