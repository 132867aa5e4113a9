"""Paged KV cache: paged decode attention equals attention over the contiguous cache (reference and fast paths),
the block manager's invariants (free list, ref counts, copy-on-write), and the PagedKV plug on the tiny VLM."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mllm_ref.kvcache import paged as P
from mllm_ref.nn.attention import attention
from mllm_ref.oracle import registry
from mllm_ref.tinyvlm import tokenizer, world
from mllm_ref.tinyvlm.model import Trace, generate, prefill
from mllm_ref.tinyvlm.plugs import Plugs

TECH = registry.get("kvcache.paged")
CASES = TECH.strategy()
IMPLS = [("reference", P.paged_attention)] + [
    (b, TECH.fast_path(b)) for b in registry.BACKENDS if TECH.fast_path(b) is not None
]


def _contiguous(kw: dict) -> np.ndarray:
    """Attention of each sequence over its cache laid out contiguously, block by block, by plain indexing."""
    q, kb, vb = kw["q"], kw["k_blocks"], kw["v_blocks"]
    bs = kb.shape[2]
    out = np.zeros((q.shape[0], q.shape[1], vb.shape[3]), dtype=np.float64)
    for b, c in enumerate(kw["context_lens"]):
        if c == 0:
            continue
        k = np.stack([kb[kw["block_tables"][b, t // bs], :, t % bs] for t in range(c)], axis=1)
        v = np.stack([vb[kw["block_tables"][b, t // bs], :, t % bs] for t in range(c)], axis=1)
        out[b] = attention(q[b][None, :, None].astype(np.float64), k[None].astype(np.float64),
                           v[None].astype(np.float64), scale=kw["scale"])[0, :, 0]  # fmt: skip
    return out


@pytest.mark.parametrize("impl", [name for name, _ in IMPLS])
@given(CASES)
def test_paged_attention_equals_contiguous_attention(impl, kw):
    fn = dict(IMPLS)[impl]
    got = fn(**kw)
    assert got.shape == kw["q"].shape[:2] + (kw["v_blocks"].shape[3],) and got.dtype == kw["q"].dtype
    tol = 1e-5 if kw["q"].dtype == np.float32 else 1e-12
    np.testing.assert_allclose(got, _contiguous(kw), rtol=tol * 10, atol=tol)
    assert np.all(got[kw["context_lens"] == 0] == 0), "a sequence with no cached token gets zeros"


@given(CASES, st.randoms(use_true_random=False))
def test_physical_placement_does_not_matter(kw, rnd):
    """Permuting the pool's blocks and renaming them in the tables leaves the output bit-identical."""
    n = kw["k_blocks"].shape[0]
    perm = list(range(n))
    rnd.shuffle(perm)
    perm = np.array(perm)  # new block i is old block perm[i]
    inv = np.argsort(perm)
    moved = {**kw, "k_blocks": kw["k_blocks"][perm], "v_blocks": kw["v_blocks"][perm],
             "block_tables": inv[kw["block_tables"]]}  # fmt: skip
    np.testing.assert_array_equal(P.paged_attention(**moved), P.paged_attention(**kw))


def test_columns_past_the_context_are_not_read():
    rng = np.random.default_rng(0)
    kw = TECH.make_case("ragged", rng)
    other = {**kw, "block_tables": kw["block_tables"].copy()}
    bs = kw["k_blocks"].shape[2]
    for b, c in enumerate(kw["context_lens"]):
        other["block_tables"][b, -(-c // bs) :] = kw["k_blocks"].shape[0] - 1
    for _, fn in IMPLS:
        np.testing.assert_array_equal(fn(**other), fn(**kw))


# ------------------------------------------------------------------------------------------- the block manager
def _check_invariants(pool: P.BlockPool, tables: list[P.BlockTable]) -> None:
    counts = np.zeros(pool.n_blocks, dtype=np.int64)
    for t in tables:
        assert len(t.blocks) == -(-t.length // pool.block_size)
        np.add.at(counts, list(t.blocks), 1)
    np.testing.assert_array_equal(pool.ref_counts, counts)
    assert len(set(pool.free)) == len(pool.free), "no block is free twice"
    assert sorted(pool.free) == sorted(np.flatnonzero(counts == 0).tolist()), "free exactly when unreferenced"


chunks = st.lists(st.integers(0, 9), min_size=1, max_size=6)


@given(chunks, st.integers(1, 5), st.integers(0, 2**32 - 1))
def test_append_then_gather_is_the_contiguous_cache(sizes, bs, seed):
    rng = np.random.default_rng(seed)
    hkv, d, dv = 2, 3, 4
    pool = P.new_pool(P.blocks_needed(sum(sizes), bs) + 1, hkv, bs, d, dv)
    table = P.BlockTable()
    ks, vs = [], []
    for t in sizes:
        k = rng.standard_normal((hkv, t, d)).astype(np.float32)
        v = rng.standard_normal((hkv, t, dv)).astype(np.float32)
        pool, table = P.append(pool, table, k, v)
        ks.append(k)
        vs.append(v)
        _check_invariants(pool, [table])
    k, v = P.gather(pool, table)
    np.testing.assert_array_equal(k, np.concatenate(ks, axis=1))
    np.testing.assert_array_equal(v, np.concatenate(vs, axis=1))
    assert table.length == sum(sizes) and pool.n_free == pool.n_blocks - len(table.blocks) == 1


def test_append_does_not_modify_its_inputs():
    pool = P.new_pool(3, 1, 2, 2)
    pool, table = P.append(pool, P.BlockTable(), np.ones((1, 3, 2), np.float32), np.ones((1, 3, 2), np.float32))
    k0, refs0, free0 = pool.k_blocks.copy(), pool.ref_counts.copy(), pool.free
    P.append(pool, table, np.full((1, 2, 2), 7, np.float32), np.full((1, 2, 2), 7, np.float32))
    np.testing.assert_array_equal(pool.k_blocks, k0)
    np.testing.assert_array_equal(pool.ref_counts, refs0)
    assert pool.free == free0


def test_fork_shares_blocks_and_copies_on_write():
    rng = np.random.default_rng(1)
    bs, hkv, d = 4, 2, 3

    def kv(t):
        return rng.standard_normal((hkv, t, d)).astype(np.float32), rng.standard_normal((hkv, t, d)).astype(np.float32)

    pool = P.new_pool(8, hkv, bs, d)
    prompt = kv(10)  # two full blocks and a half-filled third
    pool, parent = P.append(pool, P.BlockTable(), *prompt)
    pool, child = P.fork(pool, parent)
    assert child.blocks == parent.blocks and pool.n_free == 5
    assert pool.ref_counts[list(parent.blocks)].tolist() == [2, 2, 2]
    _check_invariants(pool, [parent, child])

    a, b = kv(1), kv(3)
    pool, child = P.append(pool, child, *a)
    # the shared, partly filled last block was copied for the child; the full blocks stay shared
    assert child.blocks[:2] == parent.blocks[:2] and child.blocks[2] != parent.blocks[2]
    assert pool.ref_counts[list(parent.blocks)].tolist() == [2, 2, 1]
    pool, parent = P.append(pool, parent, *b)  # the parent's last block is its own again: written in place
    assert len(parent.blocks) == 4
    _check_invariants(pool, [parent, child])

    pk, pv = P.gather(pool, parent)
    ck, cv = P.gather(pool, child)
    np.testing.assert_array_equal(pk, np.concatenate([prompt[0], b[0]], axis=1))
    np.testing.assert_array_equal(cv, np.concatenate([prompt[1], a[1]], axis=1))
    np.testing.assert_array_equal(ck[:, :10], pk[:, :10])

    # both sequences attend through one batched call with their block tables
    tables, lens = P.table_array([parent, child])
    q = rng.standard_normal((2, 4, d)).astype(np.float32)
    out = P.paged_attention(q, pool.k_blocks, pool.v_blocks, tables, lens)
    np.testing.assert_allclose(out[0], attention(q[0][None, :, None], pk[None], pv[None])[0, :, 0], rtol=1e-6)
    np.testing.assert_allclose(out[1], attention(q[1][None, :, None], ck[None], cv[None])[0, :, 0], rtol=1e-6)

    pool = P.free(pool, child)
    _check_invariants(pool, [parent])
    pool = P.free(pool, parent)
    assert pool.n_free == pool.n_blocks and not pool.ref_counts.any()


def test_free_list_is_first_in_first_out_and_grow_adds_blocks():
    pool = P.new_pool(4, 1, 2, 2)
    one = (np.zeros((1, 3, 2), np.float32),) * 2
    pool, s = P.append(pool, P.BlockTable(), *one)
    assert s.blocks == (0, 1) and pool.free == (2, 3)
    pool = P.free(pool, s)
    assert pool.free == (2, 3, 0, 1)
    pool, s = P.append(pool, P.BlockTable(), *one)
    assert s.blocks == (2, 3)
    with pytest.raises(P.OutOfBlocks):
        P.append(pool, s, *(np.zeros((1, 7, 2), np.float32),) * 2)
    pool = P.grow(pool, 2)
    assert pool.free == (0, 1, 4, 5) and pool.n_blocks == 6
    pool, s = P.append(pool, s, *(np.zeros((1, 5, 2), np.float32),) * 2)
    assert s.blocks == (2, 3, 0, 1) and s.length == 8


@pytest.mark.parametrize(
    "change, match",
    [
        ({"block_tables": np.array([[0, 9]])}, "block_tables"),
        ({"block_tables": np.array([[0, -1]])}, "block_tables"),
        ({"context_lens": np.array([5])}, "context_lens"),
        ({"context_lens": np.array([-1])}, "context_lens"),
        ({"context_lens": np.array([1, 1])}, "context_lens"),
        ({"q": np.ones((1, 3, 2), np.float32)}, "q"),
        ({"v_blocks": np.ones((2, 2, 2, 2), np.float32)}, "v_blocks"),
        ({"scale": -1.0}, "scale"),
    ],
)
def test_bad_arguments_are_named(change, match):
    kw = {"q": np.ones((1, 4, 2), np.float32), "k_blocks": np.ones((3, 2, 2, 2), np.float32),
          "v_blocks": np.ones((3, 2, 2, 2), np.float32), "block_tables": np.array([[0, 2]]),
          "context_lens": np.array([3]), "scale": None}  # fmt: skip
    kw.update(change)
    for _, fn in IMPLS:
        with pytest.raises(ValueError, match=match):
            fn(**kw)


def test_nonfinite_values_in_unread_slots_are_caught():
    kw = TECH.make_case("small-gqa", np.random.default_rng(0))
    spare = np.setdiff1d(np.arange(kw["k_blocks"].shape[0]), kw["block_tables"])[0]
    for name in ("k_blocks", "v_blocks"):
        bad = kw[name].copy()
        bad[spare, 0, 0, 0] = np.nan
        for _, fn in IMPLS:
            with pytest.raises(ValueError, match=name):
                fn(**{**kw, name: bad})


# ------------------------------------------------------------------------------------------------- tiny VLM
@pytest.fixture(scope="module")
def example():
    return world.vqa_set(world.EVAL_SEED, 1)[0]


def test_paged_plug_generates_what_the_plain_cache_generates(model, example):
    ids = tokenizer.prompt_ids(example.qa.question)
    plain = generate(model, example.image, ids, max_new_tokens=6)
    paged = generate(model, example.image, ids, max_new_tokens=6, plugs=Plugs(kv_policy=P.PagedKV(16)))
    assert paged.tokens == plain.tokens
    assert paged.trace.decode_context == plain.trace.decode_context


@pytest.mark.parametrize("bs", [1, 5, 16, 64])
def test_paged_plug_counts_whole_blocks(model, example, bs):
    ids = tokenizer.prompt_ids(example.qa.question)
    trace = Trace()
    _, state = prefill(model, example.image, ids, Plugs(kv_policy=P.PagedKV(bs)), trace)
    t = model.config.n_patches + len(ids)
    cfg = model.config
    per_block = 2 * cfg.kv_heads * bs * cfg.head_dim * 4
    assert trace.kv_bytes == cfg.layers * P.blocks_needed(t, bs) * per_block
    assert trace.kv_bytes >= cfg.layers * 2 * cfg.kv_heads * t * cfg.head_dim * 4
    assert all(c.table.length == t for c in state.caches)


def test_paged_plug_logits_match_the_plain_model(model, example):
    from mllm_ref.tinyvlm.model import decode_step

    ids = tokenizer.prompt_ids(example.qa.question)
    plugs = Plugs(kv_policy=P.PagedKV(8, headroom=1))  # headroom 1: decoding must grow the pools
    a, sa = prefill(model, example.image, ids)
    b, sb = prefill(model, example.image, ids, plugs)
    np.testing.assert_array_equal(a, b)
    for _ in range(12):
        tok = int(np.argmax(a))
        a, sa = decode_step(model, sa, tok)
        b, sb = decode_step(model, sb, tok, plugs)
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)
    assert sb.caches[0].pool.n_blocks > P.blocks_needed(model.config.n_patches + len(ids), 8) + 1
