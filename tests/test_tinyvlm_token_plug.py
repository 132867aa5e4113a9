"""The token plug of the tiny VLM: the bookkeeping of VisualTokens, and the checks on what a policy returns."""

from __future__ import annotations

import numpy as np
import pytest

from mllm_ref.tinyvlm import tokenizer, world
from mllm_ref.tinyvlm.model import Trace, encode_tokens, prefill
from mllm_ref.tinyvlm.plugs import DecoderUpdate, Plugs, TokenPolicy, VisualTokens, remap_source


@pytest.fixture(scope="module")
def example():
    return world.vqa_set(world.EVAL_SEED, 1)[2]


def test_visual_tokens_take_and_first_patch():
    x = np.arange(12, dtype=np.float32).reshape(6, 2)
    t = VisualTokens.from_patches(x, (2, 3))
    kept = t.take(np.array([1, 4, 5]))
    assert kept.n == 3 and kept.source.tolist() == [-1, 0, -1, -1, 1, 2]
    assert kept.first_patch().tolist() == [1, 4, 5]
    merged = VisualTokens(x[:2], np.array([4.0, 2.0], np.float32), np.array([1, 0, 0, 1, 0, -1]), (2, 3))
    assert merged.first_patch().tolist() == [1, 0]
    assert remap_source(np.array([2, 2, -1, 0]), np.array([0, 2]), 3).tolist() == [1, 1, -1, 0]


class _Merge2(TokenPolicy):
    """Merge patches 0 and 1 in encoder block 0 (size 2) and keep the rest: a test fixture."""

    def in_encoder(self, layer, tokens, keys, prompt_ids):
        if layer:
            return tokens
        x = np.concatenate([tokens.x[:2].mean(0, keepdims=True), tokens.x[2:]])
        size = np.concatenate([[2.0], tokens.size[2:]]).astype(np.float32)
        source = np.maximum(tokens.source - 1, 0)
        return VisualTokens(x, size, source, tokens.grid)


def test_encoder_merge_uses_proportional_attention_and_counts_tokens(model, example):
    tokens, view, counts = encode_tokens(model, example.image, Plugs(token_policy=_Merge2()))
    n = model.config.n_patches
    assert counts == [(n, n - 1), (n - 1, n - 1), (n - 1, n - 1)]
    assert tokens.n == n - 1 and tokens.size[0] == 2 and tokens.source[:3].tolist() == [0, 0, 1]
    assert view.keys is not None and view.keys.shape[1] == n - 1
    trace = Trace()
    prefill(model, example.image, tokenizer.prompt_ids(example.qa.question), Plugs(token_policy=_Merge2()), trace)
    assert trace.encoder_tokens == [n, n - 1, n - 1] and trace.encoder_mlp_tokens == [n - 1] * 3
    assert trace.n_visual == n - 1


def test_a_merge_in_the_last_block_leaves_no_stale_view(model, example):
    """Keys and weights of the last block describe the tokens before its merge: the view drops both."""

    class MergeLast(_Merge2):
        def in_encoder(self, layer, tokens, keys, prompt_ids):
            return super().in_encoder(0, tokens, keys, prompt_ids) if layer == 2 else tokens

    tokens, view, counts = encode_tokens(model, example.image, Plugs(token_policy=MergeLast()))
    assert counts[-1] == (144, 143) and tokens.n == 143
    assert view.keys is None and view.attn is None and view.features.shape == (143, 64)
    with pytest.raises(ValueError, match="last encoder block"):
        encode_tokens(model, example.image, Plugs(token_policy=MergeLast()), want_attention=True)


def test_proportional_attention_equals_duplicated_keys():
    """log(size) in the scores weighs a token like ``size`` identical copies of its key and value."""
    from mllm_ref.nn.attention import attention
    from mllm_ref.tinyvlm.model import _proportional_attention

    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 3, 4)).astype(np.float32) for _ in range(3))
    size = np.array([1.0, 3.0, 2.0], np.float32)
    got, _ = _proportional_attention(q, k, v, size)
    rep = np.repeat(np.arange(3), size.astype(int))
    want = attention(q[None], k[:, rep][None], v[:, rep][None])[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


class _Bad(TokenPolicy):
    def __init__(self, out):
        self.out = out

    def in_decoder(self, layer, view):
        return self.out(view) if layer == 0 else None


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda v: np.arange(v.n_visual), "every text token"),
        (lambda v: np.arange(v.hidden.shape[0])[::-1], "sorted"),
        (lambda v: DecoderUpdate(v.hidden * 2, v.positions, v.n_visual, v.source), "text tokens"),
        (lambda v: DecoderUpdate(v.hidden, v.positions, v.n_visual + 1, v.source), "visual tokens then"),
        (lambda v: DecoderUpdate(v.hidden, v.positions + 1, v.n_visual, v.source), "positions"),
        (lambda v: "all", "DecoderUpdate"),
    ],
)
def test_bad_policy_output_is_refused(model, example, make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        prefill(model, example.image, tokenizer.prompt_ids(example.qa.question), Plugs(token_policy=_Bad(make)))


def test_a_decoder_update_can_add_tokens(model, example):
    """A policy may replace the visual tokens by new ones (SparseVLM's recycling): here, their mean."""

    def mean_token(v):
        x = np.concatenate([v.hidden[: v.n_visual].mean(0, keepdims=True), v.hidden[v.n_visual :]])
        pos = np.concatenate([[0], v.positions[v.n_visual :]])
        return DecoderUpdate(x, pos, 1, np.where(v.source >= 0, 0, -1))

    trace = Trace()
    ids = tokenizer.prompt_ids(example.qa.question)
    prefill(model, example.image, ids, Plugs(token_policy=_Bad(mean_token)), trace)
    assert trace.layer_tokens[1:] == [1 + len(ids)] * (model.config.layers - 1) and set(trace.source.tolist()) == {0}


class _HalfFeatures(TokenPolicy):
    """Keep the first half of the encoder's features before the connector: a test fixture."""

    def after_encoder(self, tokens, prompt_ids, encoder):
        assert tokens.x.shape[1] == 64 and np.array_equal(tokens.x, encoder.features)
        return tokens.take(np.arange(tokens.n // 2))


def test_after_encoder_reduces_what_the_connector_sees(model, example):
    trace = Trace()
    prefill(model, example.image, tokenizer.prompt_ids(example.qa.question), Plugs(token_policy=_HalfFeatures()), trace)
    assert trace.connector_tokens == 72 and trace.n_visual == 72
    assert trace.encoder_tokens == [144] * 3
    assert np.array_equal(np.flatnonzero(trace.source >= 0), np.arange(72))


def test_dropping_keeps_every_position_id(model, example):
    """After FastV drops half the visual tokens at layer 0, the next layer sees the kept visual tokens at position
    0 and the text at 1..P, exactly the ids those tokens had before."""
    from mllm_ref.tokens.fastv import FastVPolicy

    seen = {}

    class Recorder(FastVPolicy):
        def in_decoder(self, layer, view):
            seen[layer] = (view.positions.copy(), view.n_visual)
            return super().in_decoder(layer, view)

    ids = tokenizer.prompt_ids(example.qa.question)
    prefill(model, example.image, ids, Plugs(token_policy=Recorder(1, 0.5)))
    pos0, n0 = seen[0]
    pos1, n1 = seen[1]
    assert n0 == 144 and n1 == 72
    assert pos0.tolist() == [0] * 144 + list(range(1, len(ids) + 1))
    assert pos1.tolist() == [0] * 72 + list(range(1, len(ids) + 1))


class _DropProtected(TokenPolicy):
    """Protect visual token 0 after the connector, then try to replace every visual token: a test fixture."""

    def after_connector(self, tokens, prompt_ids, encoder):
        protected = np.zeros(tokens.n, dtype=bool)
        protected[0] = True
        return VisualTokens(tokens.x, tokens.size, tokens.source, tokens.grid, protected)

    def in_decoder(self, layer, v):
        x = np.concatenate([v.hidden[:1], v.hidden[v.n_visual :]])
        return DecoderUpdate(x, np.concatenate([[0], v.positions[v.n_visual :]]), 1, np.where(v.source >= 0, 0, -1))


def test_protected_tokens_must_be_carried_by_a_decoder_update(model, example):
    with pytest.raises(ValueError, match="protected"):
        prefill(model, example.image, tokenizer.prompt_ids(example.qa.question), Plugs(token_policy=_DropProtected()))
