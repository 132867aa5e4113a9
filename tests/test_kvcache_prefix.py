"""Prefix caching: chained block hashes, prefix reuse on the tiny VLM (same logits and tokens as recomputing), LRU
eviction, and MPIC-style re-rotation of cached keys."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mllm_ref.kvcache import prefix as PF
from mllm_ref.kvcache.paged import PagedKV
from mllm_ref.nn.attention import attention
from mllm_ref.nn.rope import rope
from mllm_ref.oracle import registry
from mllm_ref.tinyvlm import tokenizer, world
from mllm_ref.tinyvlm.model import decode_step, prefill
from mllm_ref.tinyvlm.plugs import Plugs

TECH = registry.get("kvcache.prefix")
ids_st = st.lists(st.integers(0, 1000), max_size=30)


# ----------------------------------------------------------------------------------------------- block hashes
@given(ids_st, ids_st, st.integers(1, 6), st.integers(0, 2**64 - 1))
def test_hashes_of_a_shared_prefix_agree_up_to_the_first_difference(a, b, bs, root):
    ha = PF.block_hashes(np.array(a, dtype=np.int64), bs, root)
    hb = PF.block_hashes(np.array(b, dtype=np.int64), bs, root)
    assert ha.dtype == np.uint64 and ha.size == len(a) // bs
    common = 0
    while common < min(len(a), len(b)) and a[common] == b[common]:
        common += 1
    same_blocks = common // bs
    n = min(ha.size, hb.size)
    assert np.array_equal(ha[: min(same_blocks, n)], hb[: min(same_blocks, n)])
    # a block that differs, and every block after it, hashes differently (chained; 2^-64 collisions ignored)
    assert not np.any(ha[same_blocks:n] == hb[same_blocks:n])


@given(ids_st.filter(lambda x: len(x) >= 4), st.integers(0, 2**32))
def test_root_and_order_enter_the_hash(ids, root):
    a = np.array(ids, dtype=np.int64)
    h = PF.block_hashes(a, 2, root)
    assert not np.any(h == PF.block_hashes(a, 2, root + 1)), "another image (root) never shares a block"
    if a[0] != a[1]:
        assert PF.block_hashes(a[[1, 0, *range(2, a.size)]], 2, root)[0] != h[0]


def test_hash_depends_on_values_not_dtype_or_layout():
    ids = np.array([3, 1, 4, 1, 5, 9, 2, 6], dtype=np.int64)
    h = PF.block_hashes(ids, 3, 7)
    for variant in (ids.astype(np.int32), ids.astype(np.uint8), ids.astype(">i8"), ids.tolist(),
                    np.repeat(ids, 2)[::2]):  # fmt: skip
        np.testing.assert_array_equal(PF.block_hashes(variant, 3, 7), h)
    assert PF.block_hashes(ids[:2], 3, 7).size == 0


def test_hash_matches_its_definition():
    """The first hash by hand: SHA-256 of the parent as 8 little-endian bytes and the ids as little-endian int64."""
    import hashlib

    digest = hashlib.sha256((5).to_bytes(8, "little") + np.array([1, 2], dtype="<i8").tobytes()).digest()
    assert int(PF.block_hashes([1, 2, 3], 2, root=5)[0]) == int.from_bytes(digest[:8], "little")


@pytest.mark.parametrize("kw, match", [({"token_ids": [-1, 2]}, "token_ids"), ({"block_size": 0}, "block_size"),
                                       ({"root": -1}, "root"), ({"root": 2**64}, "root"),
                                       ({"token_ids": [1.0, 2.0]}, "token_ids")])  # fmt: skip
def test_bad_arguments_are_named(kw, match):
    args = {"token_ids": [1, 2, 3], "block_size": 2, "root": 0, **kw}
    with pytest.raises((ValueError, TypeError), match=match):
        PF.block_hashes(**args)


# ------------------------------------------------------------------------------------------- reuse on the tiny VLM
@pytest.fixture(scope="module")
def examples():
    return world.vqa_set(world.EVAL_SEED, 2)


def _greedy(model, logits, state, steps, plugs=Plugs()):
    out = []
    for _ in range(steps):
        tok = int(np.argmax(logits))
        out.append(tok)
        logits, state = decode_step(model, state, tok, plugs)
    return out


def test_prefix_reuse_gives_the_logits_and_tokens_of_recomputing(model, examples):
    image = examples[0].image
    same_image = [e for e in examples if e.image is image or np.array_equal(e.image, image)]
    questions = [tokenizer.prompt_ids(e.qa.question) for e in same_image]
    questions.append(tokenizer.prompt_ids("what shape is the red object"))
    cache = PF.empty_prefix_cache()
    for n, ids in enumerate(questions):
        ref, ref_state = prefill(model, image, ids)
        logits, state, cache, stats = PF.prefill_with_prefix(model, image, ids, cache)
        assert stats.image_hit == (n > 0)
        assert stats.reused_tokens + stats.computed_tokens == model.config.n_patches + len(ids)
        np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-4)
        assert int(np.argmax(logits)) == int(np.argmax(ref))
        assert state.next_position == ref_state.next_position
        assert [c.k.shape for c in state.caches] == [c.k.shape for c in ref_state.caches]
        assert _greedy(model, logits, state, 5) == _greedy(model, ref, ref_state, 5)


def test_a_second_question_runs_only_its_prompt(model, examples):
    image = examples[0].image
    a = tokenizer.prompt_ids("what color is the circle")
    b = tokenizer.prompt_ids("what color is the square")
    _, _, cache, first = PF.prefill_with_prefix(model, image, a, PF.empty_prefix_cache())
    assert (first.image_hit, first.hit_blocks, first.reused_tokens) == (False, 0, 0)
    _, _, cache2, second = PF.prefill_with_prefix(model, image, b, cache)
    # "<bos> what color is" is a shared full block of 4: reused with the image; only "the square" runs
    assert second.image_hit and second.hit_blocks == 1
    assert second.computed_tokens == len(b) - 4
    assert second.reused_tokens == model.config.n_patches + 4
    _, _, _, other = PF.prefill_with_prefix(model, examples[1].image, b, cache2)
    if not np.array_equal(examples[1].image, image):
        assert not other.image_hit and other.hit_blocks == 0, "the prompt blocks chain from the image"


def test_the_cache_is_a_value(model, examples):
    image = examples[0].image
    ids = tokenizer.prompt_ids("what color is the circle")
    empty = PF.empty_prefix_cache()
    _, _, cache, _ = PF.prefill_with_prefix(model, image, ids, empty)
    assert len(empty.entries) == 0 and len(cache.entries) == 2
    with pytest.raises(TypeError):
        cache.entries[0] = None
    entry = next(iter(cache.entries.values()))
    assert not entry.k[0].flags.writeable


def test_lru_eviction_keeps_the_budget(model, examples):
    ids = tokenizer.prompt_ids("what color is the circle")
    n = model.config.n_patches
    cache = PF.empty_prefix_cache(capacity=n + 4)  # one image and one prompt block
    _, _, cache, _ = PF.prefill_with_prefix(model, examples[0].image, ids, cache)
    assert cache.n_tokens == n + 4
    other = examples[1].image if not np.array_equal(examples[1].image, examples[0].image) else examples[2].image
    _, _, cache, _ = PF.prefill_with_prefix(model, other, ids, cache)
    assert cache.n_tokens <= n + 4
    assert PF.image_key(model, other) in cache and PF.image_key(model, examples[0].image) not in cache
    _, _, cache, stats = PF.prefill_with_prefix(model, examples[0].image, ids, cache)
    assert not stats.image_hit


def test_state_can_use_another_kv_policy(model, examples):
    image = examples[0].image
    ids = tokenizer.prompt_ids(examples[0].qa.question)
    _, _, cache, _ = PF.prefill_with_prefix(model, image, ids, PF.empty_prefix_cache())
    plugs = Plugs(kv_policy=PagedKV(16))
    logits, state, _, stats = PF.prefill_with_prefix(model, image, ids, cache, kv_policy=plugs.kv_policy)
    ref, ref_state = prefill(model, image, ids)
    assert stats.image_hit
    assert _greedy(model, logits, state, 4, plugs) == _greedy(model, ref, ref_state, 4)


def test_bad_prefix_arguments(model, examples):
    with pytest.raises(TypeError, match="cache"):
        PF.prefill_with_prefix(model, examples[0].image, [1, 2], {})
    with pytest.raises(ValueError, match="block_size"):
        PF.prefill_with_prefix(model, examples[0].image, [1, 2], PF.empty_prefix_cache(), block_size=0)
    with pytest.raises(ValueError, match="capacity"):
        PF.empty_prefix_cache(-1)


# ------------------------------------------------------------------------------------- MPIC: re-rotated keys
@given(st.integers(1, 12), st.integers(1, 8), st.integers(0, 3000), st.integers(0, 3000), st.integers(0, 2**32 - 1))
def test_reposition_equals_rotating_at_the_new_positions(t, half, old_offset, new_offset, seed):
    rng = np.random.default_rng(seed)
    raw = rng.standard_normal((2, t, 2 * half))
    old = np.arange(t) + old_offset
    new = np.arange(t) + new_offset
    moved = PF.reposition(rope(raw, old), old, new)
    np.testing.assert_allclose(moved, rope(raw, new), rtol=1e-9, atol=1e-9)
    moved32 = PF.reposition(rope(raw.astype(np.float32), old), old, new)
    np.testing.assert_allclose(moved32, rope(raw, new), atol=1e-4)


def test_reused_image_keys_attend_as_if_computed_at_the_new_offset():
    """1-D positions: an image of N tokens cached at positions 0..N-1 (alone), reused after a text prefix of L
    tokens (positions L..L+N-1). With re-rotated keys the attention of a later query equals attention over keys
    rotated at the new positions; without, it does not."""
    rng = np.random.default_rng(0)
    n, big_l, d = 9, 13, 16
    raw_k, v = rng.standard_normal((2, n, d)), rng.standard_normal((2, n, d))
    cached = rope(raw_k, np.arange(n))
    new_pos = np.arange(n) + big_l
    q = rope(rng.standard_normal((4, 1, d)), np.array([big_l + n + 3]))
    direct = attention(q[None], rope(raw_k, new_pos)[None], v[None])
    moved = attention(q[None], PF.reposition(cached, np.arange(n), new_pos)[None], v[None])
    stale = attention(q[None], cached[None], v[None])
    np.testing.assert_allclose(moved, direct, rtol=1e-10, atol=1e-12)
    assert np.abs(stale - direct).max() > 1e-3
