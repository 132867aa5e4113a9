"""Early exit and elastic depth: a threshold that never exits, exiting at the last layer, capacity 100% and the
largest MatFormer sub-model all equal the full model; layers run fall monotonically as the threshold loosens; the
KV of skipped layers equals a re-forward from the exit state; the references' own invariants."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mllm_ref.decoding.self_speculative import load_exit_heads
from mllm_ref.dynamic.deer import DeeRExit, deer_threshold, exit_distances, exit_layer_for
from mllm_ref.dynamic.early_exit import MEASURES, EarlyExit, confidences, copy_kv, exit_layer
from mllm_ref.dynamic.layer_skip import SharedHeadExit, StaticSkip, skipped_layers
from mllm_ref.dynamic.matformer import MatFormerLinear, load_matformer, matformer_ffn, matformer_plugs
from mllm_ref.dynamic.mod import MoDPolicy, load_routers, mod_route
from mllm_ref.dynamic.parallel_block import ParallelBlocks, decoder_block
from mllm_ref.nn.activations import silu
from mllm_ref.tinyvlm import tokenizer, world
from mllm_ref.tinyvlm.model import decode_step, forward_logits, generate, load, logits_from_hidden, prefill
from mllm_ref.tinyvlm.plugs import ExitPolicy, Plugs


@pytest.fixture(scope="module")
def model():
    return load()


@pytest.fixture(scope="module")
def heads():
    return load_exit_heads()


def requests(n):
    rng = np.random.default_rng(5)
    out = []
    for _ in range(n):
        scene = world.make_scene(rng)
        qas = world.all_questions(scene)
        out.append((world.render(scene), tokenizer.prompt_ids(tokenizer.CAPTION_PROMPT)))
        out.append((world.render(scene), tokenizer.prompt_ids(qas[int(rng.integers(len(qas)))].question)))
    return out


def run(model, plugs, image, ids):
    """Question read through the cache (so exits decide the answer), then the answer or caption."""
    return generate(model, image, ids, plugs=plugs, prefill_tokens=1)


# ---------------------------------------------------------------------------------------------------- early exit
def test_a_threshold_that_never_exits_is_the_full_model_exactly(model, heads):
    for image, ids in requests(3):
        plain = run(model, Plugs(), image, ids)
        for measure in ("softmax", "margin", "classifier", "saturation"):
            got = run(model, EarlyExit(heads, measure, 2.0).plugs(), image, ids)
            assert got.tokens == plain.tokens and all(n == model.config.layers for n in got.trace.decode_layers)
        got = run(model, EarlyExit(heads, "entropy", -1.0).plugs(), image, ids)
        assert got.tokens == plain.tokens
        got = run(model, EarlyExit(heads, "patience", 0.0, patience=99).plugs(), image, ids)
        assert got.tokens == plain.tokens


class _ExitAt(ExitPolicy):
    def __init__(self, layer):
        self.layer = layer

    def should_exit(self, layer, hidden, logits_fn):
        return layer == self.layer


def test_exiting_at_the_last_layer_is_the_full_model(model):
    image, ids = requests(1)[0]
    _, state = prefill(model, image, ids)
    plain, _ = decode_step(model, state, 5)
    got, _ = decode_step(model, state, 5, Plugs(exit_policy=_ExitAt(model.config.layers - 1)))
    np.testing.assert_array_equal(plain, got)  # the model never asks after the last layer: nothing changes


def test_layers_run_fall_monotonically_as_the_threshold_loosens(model, heads):
    reqs = requests(2)
    for measure, thresholds in (("softmax", [1.01, 0.9999, 0.999, 0.99, 0.9, 0.5]), ("margin", [1.0, 0.99, 0.9, 0.5]),
                                ("entropy", [-1.0, 0.01, 0.1, 0.5, 2.0])):  # fmt: skip
        means = []
        for thr in thresholds:
            layers = [n for image, ids in reqs for n in run(model, EarlyExit(heads, measure, thr).plugs(), image,
                                                             ids).trace.decode_layers]  # fmt: skip
            means.append(np.mean(layers))
        assert all(a >= b for a, b in zip(means, means[1:])), (measure, means)
        assert means[0] == model.config.layers and means[-1] < means[0]


def test_skipped_layers_kv_equals_a_reforward_from_the_exit_state(model):
    """CALM's propagation: after an exit at layer l, layer j > l holds the key and value that layer j computes
    when fed h_l (a re-forward through each skipped layer from the exit state), and copy_kv gives the same."""
    image, ids = requests(1)[0]
    _, state = prefill(model, image, ids)
    exit_at = 4
    record = {}

    class Record(_ExitAt):
        def should_exit(self, layer, hidden, logits_fn):
            record[layer] = hidden.copy()
            return layer == self.layer

    _, new = decode_step(model, state, 7, Plugs(exit_policy=Record(exit_at)))
    h = record[exit_at]
    cfg = model.config
    from mllm_ref.tinyvlm.model import _decoder_layer

    for j in range(exit_at + 1, cfg.layers):
        _, k_ref, v_ref, _ = _decoder_layer(model, Plugs(), j, h[None], np.array([state.next_position]),
                                            (new.caches[j].k[0][:, :-1], new.caches[j].v[0][:, :-1]), causal=True,
                                            want_weights=False)  # fmt: skip
        np.testing.assert_allclose(new.caches[j].k[0][:, -1:], k_ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(new.caches[j].v[0][:, -1:], v_ref, rtol=1e-5, atol=1e-6)
    layers = range(exit_at + 1, cfg.layers)
    k, v = copy_kv(h, np.stack([model[f"dec.{j}.norm1.weight"] for j in layers]),
                   np.stack([model[f"dec.{j}.k.weight"] for j in layers]),
                   np.stack([model[f"dec.{j}.v.weight"] for j in layers]), position=state.next_position,
                   kv_heads=cfg.kv_heads, theta=cfg.rope_theta, eps=cfg.rms_eps)  # fmt: skip
    for n, j in enumerate(layers):
        np.testing.assert_allclose(k[n], new.caches[j].k[0][:, -1], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(v[n], new.caches[j].v[0][:, -1], rtol=1e-5, atol=1e-6)


def test_an_exited_token_is_decoded_by_its_exit_head(model, heads):
    image, ids = requests(1)[0]
    _, state = prefill(model, image, ids)
    record = {}

    class Record(EarlyExit):
        def should_exit(self, layer, hidden, logits_fn):
            record[layer] = hidden.copy()
            return layer == 3

    logits, _ = decode_step(model, state, 7, Record(heads).plugs())
    np.testing.assert_allclose(logits, heads.logits(3, record[3]), rtol=1e-6)


@given(st.integers(0, 2**32 - 1), st.sampled_from(MEASURES), st.integers(1, 8))
def test_exit_layer_is_the_first_layer_past_the_threshold(seed, measure, layers):
    rng = np.random.default_rng(seed)
    logits, hidden, scores = rng.standard_normal((layers, 5)) * 3, rng.standard_normal((layers, 4)), rng.standard_normal(layers)
    conf = confidences(logits, hidden, scores, measure=measure)
    thr = float(np.median(conf))
    got = exit_layer(logits, hidden, scores, measure=measure, threshold=thr, patience=2, min_layer=0)
    ok = {"entropy": -conf <= thr, "patience": conf >= 2}.get(measure, conf >= thr)
    want = int(np.flatnonzero(ok)[0]) if ok.any() else layers - 1
    assert got == want
    # a threshold nothing passes: the last layer
    never = {"entropy": -1.0, "patience": 0.0}.get(measure, 2.0)
    if measure != "patience":
        assert exit_layer(logits, hidden, scores, measure=measure, threshold=never, min_layer=0) == layers - 1


def test_confidence_measures_on_known_values():
    logits = np.log(np.array([[0.7, 0.2, 0.1], [0.5, 0.5, 1e-12]]))
    np.testing.assert_allclose(confidences(logits, np.ones((2, 2)), np.zeros(2), measure="softmax"), [0.7, 0.5])
    np.testing.assert_allclose(confidences(logits, np.ones((2, 2)), np.zeros(2), measure="margin"), [0.5, 0.0],
                               atol=1e-9)  # fmt: skip
    sat = confidences(logits, np.array([[1.0, 0.0], [1.0, 1.0]]), np.zeros(2), measure="saturation")
    np.testing.assert_allclose(sat, [-1.0, np.sqrt(0.5)])
    big = confidences(np.array([[1e4, 0.0, -1e4]]), np.ones((1, 2)), np.array([50.0]), measure="entropy")
    assert np.isfinite(big).all()
    assert confidences(np.zeros((1, 2)), np.ones((1, 2)), np.array([800.0]), measure="classifier")[0] == 1.0


# -------------------------------------------------------------------------------------------------------- DeeR
def test_deer_threshold_meets_the_budget_and_is_the_smallest_that_does():
    rng = np.random.default_rng(0)
    d = np.clip(rng.uniform(0, 1, (200, 11)) * np.exp(-np.linspace(0, 3, 11)), 0, 1)
    d[:, 0] = 1.0
    for budget in (3.0, 6.0, 9.0, 11.0):
        eta = deer_threshold(d, budget)
        used = (exit_layer_for(d, eta) + 1).mean()
        assert used <= budget + 1e-12
        smaller = np.nextafter(eta, -np.inf)
        if eta > 0:
            assert (exit_layer_for(d, smaller) + 1).mean() > budget


def test_deer_exits_when_consecutive_exits_agree(model, heads):
    image, ids = requests(1)[0]
    plain = run(model, Plugs(), image, ids)
    never = run(model, DeeRExit(heads, threshold=0.0).plugs(), image, ids)
    assert never.tokens == plain.tokens and set(never.trace.decode_layers) == {model.config.layers}
    loose = run(model, DeeRExit(heads, threshold=0.5).plugs(), image, ids)
    assert np.mean(loose.trace.decode_layers) < model.config.layers
    p = np.array([[0.0, 0.0], [1.0, 0.0]])
    np.testing.assert_allclose(exit_distances(p), [1.0, 0.5 * np.abs(np.array([0.5, 0.5]) - np.array([np.e, 1]) / (np.e + 1)).sum()])


# -------------------------------------------------------------------------------------------------- layer skip
def test_static_skipping(model):
    assert skipped_layers(12, interval=2, start=4).tolist() == [False] * 4 + [True, False] * 3 + [True, False]
    assert not skipped_layers(12, interval=1, start=0)[-1]  # the last layer always runs
    image, ids = requests(1)[0]
    got = run(model, StaticSkip(12, 2, 4).plugs(), image, ids)
    assert set(got.trace.decode_layers) == {12 - int(skipped_layers(12, interval=2, start=4).sum())}
    none = run(model, StaticSkip(12, 2, 11).plugs(), image, ids)
    assert none.tokens == run(model, Plugs(), image, ids).tokens


def test_shared_head_exit(model):
    shared = load_exit_heads(kind="shared-exit")
    assert shared.shared
    image, ids = requests(1)[0]
    got = run(model, SharedHeadExit(shared, 8).plugs(), image, ids)
    assert set(got.trace.decode_layers) == {9}


# ---------------------------------------------------------------------------------------------------------- MoD
@given(st.integers(0, 2**32 - 1), st.integers(1, 40), st.floats(0.01, 1.0))
def test_mod_route_keeps_the_top_capacity(seed, t, capacity):
    s = np.random.default_rng(seed).integers(0, 5, t).astype(np.float64)  # ties on purpose
    idx = mod_route(s, capacity)
    k = idx.size
    assert k == max(1, int(np.ceil(capacity * t - 1e-9))) and np.all(np.diff(idx) > 0)
    rest = np.setdiff1d(np.arange(t), idx)
    if rest.size:
        assert s[idx].min() >= s[rest].max()
        tied = rest[s[rest] == s[idx].min()]
        assert np.all(tied > idx[s[idx] == s[idx].min()].max())  # ties to the lower index


def test_mod_at_full_capacity_is_the_dense_model(model):
    routers = load_routers()
    for image, ids in requests(2):
        plain = generate(model, image, ids)
        got = generate(model, image, ids, plugs=MoDPolicy(routers, 1.0).plugs())
        assert got.tokens == plain.tokens and got.trace.layer_tokens == plain.trace.layer_tokens
        _, s1 = prefill(model, image, ids)
        _, s2 = prefill(model, image, ids, MoDPolicy(routers, 1.0).plugs())
        for a, b in zip(s1.caches, s2.caches):
            np.testing.assert_array_equal(a.k, b.k)


def test_mod_routes_the_prefill_and_skips_in_decoding(model):
    routers = load_routers()
    image, ids = requests(1)[0]
    g = generate(model, image, ids, plugs=MoDPolicy(routers, 0.5).plugs())
    t = g.trace.layer_tokens
    for i in range(model.config.layers):
        if i in routers.router:
            assert t[i] == int(np.ceil(0.5 * t[0] - 1e-9))
        else:
            assert t[i] == t[0]
    assert all(n <= model.config.layers for n in g.trace.decode_layers)


# -------------------------------------------------------------------------------------------------- MatFormer
def test_the_largest_matformer_sub_model_is_the_full_model(model):
    mat = load_matformer(model)
    image, ids = requests(1)[0]
    full = forward_logits(mat, image, ids)
    widest = forward_logits(mat, image, ids, matformer_plugs(mat, 3))
    np.testing.assert_array_equal(full, widest)


@given(st.integers(0, 2**32 - 1), st.integers(1, 8))
def test_matformer_sub_models_are_prefix_slices(seed, f):
    rng = np.random.default_rng(seed)
    h, gate, up, down = rng.standard_normal((3, 4)), rng.standard_normal((f, 4)), rng.standard_normal((f, 4)), rng.standard_normal((4, f))
    for m in range(1, f + 1):
        want = (silu(h @ gate[:m].T) * (h @ up[:m].T)) @ down[:, :m].T
        np.testing.assert_allclose(matformer_ffn(h, gate, up, down, m), want, rtol=1e-12)
        # a sub-model is the full FFN with the other units' weights zeroed
        g2, u2 = gate.copy(), up.copy()
        g2[m:], u2[m:] = 0.0, 0.0
        np.testing.assert_allclose(matformer_ffn(h, g2, u2, down, f), want, rtol=1e-9, atol=1e-12)


def test_matformer_linear_plug_slices_only_the_ffn():
    plug = MatFormerLinear((2,) * 12)
    x = np.ones((1, 4))
    w = np.arange(32.0).reshape(8, 4)
    assert plug(x, w, None, "dec.3.gate").shape == (1, 2)
    assert plug(x, w, None, "dec.3.q").shape == (1, 8)


# ------------------------------------------------------------------------------------------------ parallel block
def test_parallel_block_reads_one_input_and_the_plug_matches_the_reference(model):
    from mllm_ref.oracle import registry

    kw = dict(registry.get("dynamic.parallel_block").cases("test")[1][1])
    seq = decoder_block(**{**kw, "parallel": False})
    par = decoder_block(**{**kw, "parallel": True})
    assert not np.allclose(seq, par)
    # the tiny VLM's layer 0 as a block equals the reference in both forms
    cfg = model.config
    x = np.random.default_rng(1).standard_normal((6, cfg.dim)).astype(np.float32)
    weights = {n: model[f"dec.0.{k}.weight"] for n, k in (("norm1", "norm1"), ("wq", "q"), ("wk", "k"), ("wv", "v"),
                                                           ("wo", "o"), ("norm2", "norm2"), ("gate", "gate"),
                                                           ("up", "up"), ("down", "down"))}  # fmt: skip
    from mllm_ref.tinyvlm.model import _decoder_layer

    for parallel in (False, True):
        got, _, _, _ = _decoder_layer(model, ParallelBlocks((0,) if parallel else ()).plugs(), 0, x, np.arange(6), None,
                                      causal=True, want_weights=False)  # fmt: skip
        want = decoder_block(x, **weights, heads=cfg.heads, kv_heads=cfg.kv_heads, parallel=parallel,
                             theta=cfg.rope_theta, eps=cfg.rms_eps)  # fmt: skip
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_no_parallel_layer_is_the_plain_model(model):
    image, ids = requests(1)[0]
    np.testing.assert_array_equal(forward_logits(model, image, ids), forward_logits(model, image, ids,
                                                                                     ParallelBlocks(()).plugs()))
