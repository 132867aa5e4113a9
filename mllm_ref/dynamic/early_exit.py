"""Early exit per token in decoding, with CALM's confidence measures and the entropy and patience criteria.

Papers: T. Schuster, A. Fisch, J. Gupta, M. Dehghani, D. Bahri, V. Q. Tran, Y. Tay, D. Metzler, Confident Adaptive
Language Modeling (CALM), NeurIPS 2022 (arXiv 2207.07061); W. Zhou, C. Xu, T. Ge, J. McAuley, K. Xu, F. Wei, BERT
Loses Patience: Fast and Robust Inference with Early Exit (PABEE), NeurIPS 2020 (arXiv 2006.04152); entropy as in
DeeBERT (J. Xin et al., ACL 2020, arXiv 2004.12993). Survey: dynamic networks / early exit.

After decoder layer ``l`` of a decode step the token's hidden state ``h_l`` gives an early prediction through an
exit head, ``p_l = softmax(head_l(h_l))``. The token stops after the first layer whose confidence passes the
threshold ``λ`` (:func:`exit_layer`, the reference)::

    softmax      max_v p_l(v)                                  >= λ     (CALM)
    margin       p_l(top 1) - p_l(top 2)                       >= λ     (CALM's "softmax response")
    saturation   cos(h_l, h_{l-1})                             >= λ     (CALM's hidden-state saturation)
    classifier   sigmoid(c_l . h_l + b_l)                      >= λ     (CALM's learned early-exit classifier)
    entropy      -sum_v p_l(v) log p_l(v)                      <= λ     (DeeBERT)
    patience     argmax p_l = argmax p_{l-1} = ... for ``patience`` consecutive layers   (PABEE; λ unused)

**Skipped layers' keys and values.** A later token attends, in every layer, to every earlier token, including
those that exited below that layer. CALM propagates the exit hidden state: for every layer ``j > l`` the exited
token's key and value are computed from ``h_l`` itself, ``k_j = RoPE(W_k^j RMSNorm_j(h_l))``,
``v_j = W_v^j RMSNorm_j(h_l)`` (:func:`copy_kv`), as if ``h_l`` were that layer's input. The tiny VLM does this in
:func:`mllm_ref.tinyvlm.model.decode_step`; the tests compare it with a re-forward that feeds ``h_l`` to each
skipped layer.

:class:`EarlyExit` is the exit policy for the tiny VLM. Its exit heads are the per-layer heads trained by
distillation with the model frozen (:mod:`kernels_torch.tinyvlm.train_decoding` ``--kind exits``), which also hold
CALM's classifier; an exited token's logits are its exit head's.

Shapes: L layers (the rows of the per-layer arrays), V vocabulary, D width.

Deviations from the papers: CALM trains the model itself with a weighted early-exit loss and calibrates ``λ`` with
Learn-then-Test for a stated risk; here the model is frozen, each layer has its own distilled exit head, and ``λ``
is a knob (the chapter sweeps it). CALM never exits before a minimum layer only through its calibration; here
``min_layer`` (default 1) states it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mllm_ref import _checks
from mllm_ref.nn.rmsnorm import rmsnorm
from mllm_ref.nn.rope import rope
from mllm_ref.nn.softmax import softmax
from mllm_ref.oracle.registry import Technique, register
from mllm_ref.tinyvlm.plugs import ExitPolicy, Plugs

MEASURES = ("softmax", "margin", "saturation", "classifier", "entropy", "patience")


def confidences(logits: np.ndarray, hidden: np.ndarray, scores: np.ndarray, *, measure: str) -> np.ndarray:
    """``float64[L]``: each layer's confidence under ``measure`` (higher is more confident; entropy is negated and
    patience counts the consecutive layers, this one included, with an unchanged arg-max)."""
    measure = _checks.choice(measure, "measure", MEASURES)
    logits = _checks.float_array(logits, "logits", ndim=2)
    hidden = _checks.float_array(hidden, "hidden", ndim=2)
    scores = _checks.float_array(scores, "scores", ndim=1)
    _checks.same_dtype("logits", logits, "hidden", hidden)
    _checks.same_dtype("logits", logits, "scores", scores)
    _checks.dim("hidden", hidden, 0, logits.shape[0], "one row per layer (logits)")
    _checks.dim("scores", scores, 0, logits.shape[0], "one score per layer (logits)")
    z = logits.astype(np.float64)
    if measure in ("softmax", "margin", "entropy"):
        p = softmax(z, axis=-1)
        if measure == "softmax":
            return p.max(axis=-1)
        if measure == "margin":
            top = np.sort(p, axis=-1)
            return top[:, -1] - (top[:, -2] if p.shape[1] > 1 else 0.0)
        return (p * np.log(np.where(p > 0, p, 1.0))).sum(axis=-1)  # minus the entropy
    if measure == "saturation":
        h = hidden.astype(np.float64)
        norms = np.linalg.norm(h, axis=-1)
        cos = np.full(h.shape[0], -1.0)  # the first layer has nothing to compare with: never saturated
        denom = norms[1:] * norms[:-1]
        cos[1:] = np.where(denom > 0, (h[1:] * h[:-1]).sum(axis=-1) / np.where(denom > 0, denom, 1.0), -1.0)
        return cos
    if measure == "classifier":
        s = scores.astype(np.float64)
        return 0.5 * (1.0 + np.tanh(0.5 * s))  # a stable sigmoid
    top = np.argmax(z, axis=-1)  # patience
    run = np.ones(z.shape[0])
    for i in range(1, z.shape[0]):
        run[i] = run[i - 1] + 1 if top[i] == top[i - 1] else 1
    return run


def exit_layer(
    logits: np.ndarray, hidden: np.ndarray, scores: np.ndarray, *, measure: str = "softmax",
    threshold: float = 0.9, patience: int = 2, min_layer: int = 1,
) -> int:  # fmt: skip
    """The layer a token exits after: the first ``l >= min_layer`` whose confidence passes ``threshold`` (for
    ``entropy``: whose entropy is at most ``threshold``; for ``patience``: whose arg-max has held for ``patience``
    layers), else the last layer ``L - 1``.

    Args:
        logits: ``float[L, V]`` each layer's exit-head logits.
        hidden: ``float[L, D]`` each layer's output hidden state (for ``saturation``).
        scores: ``float[L]`` each layer's classifier logit (for ``classifier``).
    Returns:
        the 0-based exit layer.
    """
    conf = confidences(logits, hidden, scores, measure=measure)
    threshold = _checks.real(threshold, "threshold")
    patience = _checks.integer(patience, "patience", low=1)
    min_layer = _checks.integer(min_layer, "min_layer", low=0)
    last = logits.shape[0] - 1
    if measure == "entropy":
        passed = -conf <= threshold
    elif measure == "patience":
        passed = conf >= patience
    else:
        passed = conf >= threshold
    passed[: min(min_layer, last)] = False
    hits = np.flatnonzero(passed)
    return int(hits[0]) if hits.size else last


def copy_kv(
    hidden: np.ndarray, norm_weight: np.ndarray, k_weight: np.ndarray, v_weight: np.ndarray, *, position: int,
    kv_heads: int, theta: float = 10000.0, eps: float = 1e-6,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """CALM's state propagation: the keys and values an exited token leaves in the layers it skipped.

    Args:
        hidden: ``float[D]`` the exit hidden state ``h_l``.
        norm_weight: ``float[S, D]`` each skipped layer's attention RMSNorm weight.
        k_weight, v_weight: ``float[S, Hkv * d, D]`` each skipped layer's key and value projections.
        position: the token's position id (keys are rotated there).
    Returns:
        ``(k float[S, Hkv, d], v float[S, Hkv, d])``.
    """
    h = _checks.float_array(hidden, "hidden", ndim=1)
    g = _checks.float_array(norm_weight, "norm_weight", ndim=2)
    wk = _checks.float_array(k_weight, "k_weight", ndim=3)
    wv = _checks.float_array(v_weight, "v_weight", ndim=3)
    for name, arr in (("norm_weight", g), ("k_weight", wk), ("v_weight", wv)):
        _checks.same_dtype("hidden", h, name, arr)
    _checks.dim("norm_weight", g, 1, h.shape[0], "the width of hidden")
    _checks.dim("k_weight", wk, 0, g.shape[0], "one projection per skipped layer (norm_weight)")
    _checks.dim("v_weight", wv, 0, g.shape[0], "one projection per skipped layer (norm_weight)")
    _checks.dim("k_weight", wk, 2, h.shape[0], "the width of hidden")
    _checks.dim("v_weight", wv, 2, h.shape[0], "the width of hidden")
    position = _checks.integer(position, "position", low=0)
    kv_heads = _checks.integer(kv_heads, "kv_heads", low=1)
    if wk.shape[1] % kv_heads or wv.shape[1] % kv_heads:
        raise ValueError(f"k_weight and v_weight rows ({wk.shape[1]}, {wv.shape[1]}) must split into {kv_heads} heads")
    theta = _checks.real(theta, "theta", low=0.0, low_open=True)
    eps = _checks.real(eps, "eps", low=0.0, low_open=True)
    ks, vs = [], []
    for j in range(g.shape[0]):
        x = rmsnorm(h[None], g[j], eps=eps)
        k = (x @ wk[j].T).reshape(1, kv_heads, -1).transpose(1, 0, 2)  # [Hkv, 1, d]
        v = (x @ wv[j].T).reshape(1, kv_heads, -1).transpose(1, 0, 2)
        ks.append(rope(k, np.array([position]), theta=theta)[:, 0])
        vs.append(v[:, 0])
    return np.stack(ks), np.stack(vs)


@dataclass
class EarlyExit(ExitPolicy):
    """Per-token early exit of the tiny VLM's decode steps (module docstring).

    ``heads``: trained exit heads (:func:`mllm_ref.decoding.self_speculative.load_exit_heads`); ``measure`` one of
    :data:`MEASURES`; ``threshold`` ``λ``; ``patience`` for PABEE; ``min_layer``: the earliest layer (0-based) a
    token may leave after. The policy keeps the previous layer's hidden state and arg-max of the token in flight
    (the per-token state of ``saturation`` and ``patience``), reset at layer 0.
    """

    heads: object
    measure: str = "softmax"
    threshold: float = 0.9
    patience: int = 2
    min_layer: int = 1
    _prev_hidden: np.ndarray | None = field(default=None, repr=False)
    _prev_top: int = field(default=-1, repr=False)
    _run: int = field(default=0, repr=False)

    name = "early_exit"

    def __post_init__(self):
        _checks.choice(self.measure, "measure", MEASURES)
        _checks.real(self.threshold, "threshold")
        _checks.integer(self.patience, "patience", low=1)
        _checks.integer(self.min_layer, "min_layer", low=0)


    def should_exit(self, layer, hidden, logits_fn) -> bool:
        if layer == 0:
            self._prev_hidden, self._prev_top, self._run = None, -1, 0
        logits = self.heads.logits(layer, hidden)
        top = int(np.argmax(logits))
        self._run = self._run + 1 if top == self._prev_top else 1
        prev, self._prev_hidden, self._prev_top = self._prev_hidden, hidden, top
        if layer < self.min_layer:
            return False
        if self.measure == "patience":
            return self._run >= self.patience
        if self.measure == "saturation":
            if prev is None:
                return False
            rows = np.stack([prev, hidden])
            conf = confidences(np.zeros((2, 1), rows.dtype), rows, np.zeros(2, rows.dtype), measure="saturation")[1]
            return bool(conf >= self.threshold)
        score = self.heads.confidence(layer, hidden) if self.measure == "classifier" else 0.0
        conf = confidences(logits[None], hidden[None].astype(logits.dtype), np.array([score], logits.dtype),
                           measure=self.measure)[0]  # fmt: skip
        return bool(-conf <= self.threshold) if self.measure == "entropy" else bool(conf >= self.threshold)

    def exit_logits(self, layer, hidden, logits_fn):
        return self.heads.logits(layer, hidden)


class HiddenRecorder(ExitPolicy):
    """Records the hidden state after every layer of a decode step (clear ``hidden`` between steps); never exits.
    :func:`exit_trace` and DeeR's calibration read the exits from it."""

    def __init__(self):
        self.hidden: list[np.ndarray] = []

    def should_exit(self, layer, hidden, logits_fn) -> bool:
        self.hidden.append(hidden.copy())
        return False


def exit_trace(model, heads, image: np.ndarray, prompt_ids, *, max_new_tokens: int = 24) -> dict:
    """What every exit would have said for each generated token of a plain greedy run (the full model decides).

    The image and ``<bos>`` are prefilled, the rest of the prompt is read through the cache, then the answer is
    generated. Returns ``{"tokens": int[T], "logits": float32[T, L, V], "hidden": float32[T, L, D], "scores":
    float64[T, L]}``: for each decode step (the prompt's steps first), the exit heads' logits, the hidden states
    and the classifier scores of layers ``0 .. L-2``, then the full model's logits and last hidden state as layer
    ``L-1`` (score 50, a sigmoid of 1: the last layer always "exits"), and the token fed at that step. Rows fit
    :func:`exit_layer`, whose result plus one is the layers a token would run."""
    from mllm_ref.tinyvlm import tokenizer
    from mllm_ref.tinyvlm.model import decode_step, prefill

    ids = [int(t) for t in prompt_ids]
    rec = HiddenRecorder()
    plugs = Plugs(exit_policy=rec)
    logits, state = prefill(model, image, ids[:1])
    fed, hidden, logit_rows, score_rows = [], [], [], []
    queue = ids[1:]
    n_exit = model.config.layers - 1
    for _ in range(len(queue) + max_new_tokens):
        from_prompt = bool(queue)
        token = queue.pop(0) if queue else int(np.argmax(logits))
        if not from_prompt and token == tokenizer.EOS:
            break
        rec.hidden.clear()
        logits, state = decode_step(model, state, token, plugs)
        hs = rec.hidden[:n_exit]
        hidden.append(np.stack(hs + [state.hidden]))
        logit_rows.append(np.stack([heads.logits(j, hs[j]) for j in range(n_exit)] + [logits]))
        score_rows.append([heads.confidence(j, hs[j]) if heads.classifier else 0.0 for j in range(n_exit)] + [50.0])
        fed.append(token)
    return {"tokens": np.asarray(fed), "logits": np.stack(logit_rows).astype(np.float32), "hidden": np.stack(hidden),
            "scores": np.asarray(score_rows, dtype=np.float32)}  # fmt: skip


def accuracy_compute_curve(model, heads, measure: str, thresholds, *, n_per_type: int = 5, n_captions: int = 5,
                           min_layer: int = 1) -> list[dict]:  # fmt: skip
    """Held-out accuracy, caption exact match and mean layers run per decode step at each threshold (question read
    through the cache, so exits decide the answers): the accuracy-compute curve of one criterion."""
    from mllm_ref.tinyvlm.evaluate import evaluate

    out = []
    for thr in thresholds:
        r = evaluate(model, n_per_type, n_captions=n_captions, question_after_image=True,
                     plugs=EarlyExit(heads, measure, float(thr), min_layer=min_layer).plugs())  # fmt: skip
        out.append({"measure": measure, "threshold": float(thr), "accuracy": r.accuracy,
                    "caption_exact_match": r.caption_exact_match, "layers": r.decode_layers})  # fmt: skip
    return out


def make_policy(threshold: float, measure: str = "margin") -> Plugs:
    """The tiny VLM with early exit at ``threshold`` (the chapter's sweeps)."""
    from mllm_ref.decoding.self_speculative import load_exit_heads

    return EarlyExit(load_exit_heads(), measure, threshold).plugs()


# ----------------------------------------------------------------------------------------------- registration
_SIZES = {"tiny": (3, 4, 4), "tinyvlm": (12, 42, 128), "llama": (32, 32000, 4096)}


def _case(size: str, rng: np.random.Generator) -> dict:
    n, v, d = _SIZES[size]
    # confidence that grows with depth, as trained exits give
    logits = rng.standard_normal((n, v)) * np.linspace(0.5, 6.0, n)[:, None]
    hidden = np.cumsum(rng.standard_normal((n, d)), axis=0)
    measure = {"tiny": "margin", "tinyvlm": "softmax", "llama": "entropy"}[size]
    return {"logits": logits.astype(np.float32), "hidden": hidden.astype(np.float32),
            "scores": rng.standard_normal(n).astype(np.float32), "measure": measure,
            "threshold": 0.5 if measure != "entropy" else 1.0, "patience": 2, "min_layer": 1}  # fmt: skip


def _strategy():
    from hypothesis import strategies as st

    @st.composite
    def cases(draw):
        n, v, d = draw(st.integers(1, 8)), draw(st.integers(1, 6)), draw(st.integers(1, 5))
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        return {"logits": rng.standard_normal((n, v)) * draw(st.sampled_from([0.1, 1.0, 10.0])),
                "hidden": rng.standard_normal((n, d)), "scores": rng.standard_normal(n),
                "measure": draw(st.sampled_from(MEASURES)), "threshold": draw(st.floats(-1.0, 3.0)),
                "patience": draw(st.integers(1, 4)), "min_layer": draw(st.integers(0, 3))}  # fmt: skip

    return cases()


def _rows(model):
    from mllm_ref.decoding.self_speculative import load_exit_heads

    heads = load_exit_heads()
    return [
        ("softmax >= 0.999", EarlyExit(heads, "softmax", 0.999).plugs()),
        ("margin >= 0.99", EarlyExit(heads, "margin", 0.99).plugs()),
        ("classifier >= 0.999", EarlyExit(heads, "classifier", 0.999).plugs()),
        ("entropy <= 0.01", EarlyExit(heads, "entropy", 0.01).plugs()),
        ("saturation cos >= 0.995", EarlyExit(heads, "saturation", 0.995).plugs()),
        ("patience 4 (PABEE)", EarlyExit(heads, "patience", 0.0, patience=4).plugs()),
    ]


register(
    Technique(
        id="dynamic.early_exit",
        reference=exit_layer,
        make_case=_case,
        paper=(
            "T. Schuster, A. Fisch, J. Gupta, M. Dehghani, D. Bahri, V. Q. Tran, Y. Tay, D. Metzler, Confident Adaptive "
            "Language Modeling, NeurIPS 2022 (arXiv 2207.07061); W. Zhou et al., BERT Loses Patience, NeurIPS 2020 "
            "(arXiv 2006.04152)"
        ),
        test_sizes=("tiny", "tinyvlm"),
        bench_sizes=("llama",),
        compare="exact",
        strategy=_strategy,
        chapter="book/06-early-exit.md",
        exercise="exercises/07-calm-exit",
        model_level=True,
        notes="softmax, margin, saturation, classifier, entropy, patience; skipped layers' KV from the exit state",
        extra={"rows": _rows, "question_after_image": True},
    )
)
