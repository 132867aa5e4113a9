"""Greedy speculative decoding: keep the longest draft prefix the target's greedy choice agrees with.

Papers: Y. Leviathan, M. Kalman, Y. Matias, Fast Inference from Transformers via Speculative Decoding, ICML 2023
(arXiv 2211.17192), the greedy case (temperature 0, where ``min(1, p/q)`` is 1 or 0); also called "draft and
verify" in the blockwise parallel decoding of M. Stern, N. Shazeer, J. Uszkoreit, NeurIPS 2018 (arXiv 1811.03115).
Survey: speculative decoding.

With target logits ``z_0, ..., z_k`` from one forward over ``[last token, x_1, ..., x_k]``::

    n = the largest n <= k with x_j = argmax z_{j-1} for every j <= n
    emit x_1, ..., x_n, then argmax z_n            (the correction, or the bonus token when n = k)

Every emitted token is the target's own greedy choice after the tokens before it, so the output equals plain
greedy decoding, token for token, whatever the drafter proposes; a good drafter only makes it faster.
:class:`mllm_ref.decoding.speculative.SpeculativeDecoding` with its default (temperature 0) sampler runs it on the
tiny VLM; this module's :func:`greedy_verify` is the reference of the step.

Shapes: k draft tokens, V vocabulary.

Deviations from the papers: none. Ties in the arg-max go to the lowest id, as in plain greedy decoding.
"""

from __future__ import annotations

import numpy as np

from mllm_ref import _checks
from mllm_ref.oracle.registry import Technique, register


def greedy_verify(target_logits: np.ndarray, draft: np.ndarray) -> np.ndarray:
    """Tokens emitted by one greedy verification.

    Args:
        target_logits: ``float[k + 1, V]`` the target's logits after the last token and after each draft token.
        draft: ``int[k]`` the draft tokens.
    Returns:
        ``int64[n + 1]``: the accepted draft prefix, then the target's arg-max after it.
    """
    z = _checks.float_array(target_logits, "target_logits", ndim=2)
    draft = _checks.int_array(draft, "draft", ndim=1, low=0, high=z.shape[1] - 1)
    _checks.dim("target_logits", z, 0, draft.size + 1, "one row more than draft tokens")
    choice = np.argmax(z, axis=1)
    n = 0
    while n < draft.size and draft[n] == choice[n]:
        n += 1
    return np.concatenate([draft[:n].astype(np.int64), choice[n : n + 1].astype(np.int64)])


# ----------------------------------------------------------------------------------------------- registration
_SIZES = {"tiny": (1, 3), "small": (4, 42), "k8": (8, 1000)}


def _case(size: str, rng: np.random.Generator) -> dict:
    k, v = _SIZES[size]
    z = rng.standard_normal((k + 1, v)).astype(np.float32)
    choice = np.argmax(z, axis=1)
    n = int(rng.integers(0, k + 1))  # an accepted prefix of random length, then a random (usually wrong) token
    draft = np.concatenate([choice[:n], rng.integers(0, v, k - n)]).astype(np.int64)
    return {"target_logits": z, "draft": draft}


def _strategy():
    from hypothesis import strategies as st

    @st.composite
    def cases(draw):
        k, v = draw(st.integers(0, 6)), draw(st.integers(1, 6))
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        z = np.round(rng.standard_normal((k + 1, v)) * 2)  # ties on purpose
        choice = np.argmax(z, axis=1)
        n = draw(st.integers(0, k))
        draft = np.concatenate([choice[:n], rng.integers(0, v, k - n)]).astype(np.int64)
        return {"target_logits": z, "draft": draft}

    return cases()


def _rows(model):
    from mllm_ref.decoding.multimodal import load_drafter
    from mllm_ref.decoding.speculative import SpeculativeDecoding

    drafter = load_drafter(True)
    return [(f"2-layer drafter with the image, k={k}", SpeculativeDecoding(drafter, k=k).plugs()) for k in (2, 4, 6)]


register(
    Technique(
        id="decoding.speculative_greedy",
        reference=greedy_verify,
        make_case=_case,
        paper=(
            "Y. Leviathan, M. Kalman, Y. Matias, Fast Inference from Transformers via Speculative Decoding, ICML 2023 "
            "(arXiv 2211.17192)"
        ),
        test_sizes=("tiny", "small", "k8"),
        compare="exact",
        strategy=_strategy,
        chapter="book/05-speculative-decoding.md",
        model_level=True,
        notes="longest draft prefix equal to the target's arg-max, then the target's arg-max; output = plain greedy",
        extra={"rows": _rows},
    )
)
