"""Medusa: extra decoding heads on the target's last hidden state propose the tokens after the next one.

Paper: T. Cai, Y. Li, Z. Geng, H. Peng, J. D. Lee, D. Chen, T. Dao, Medusa: Simple LLM Inference Acceleration
Framework with Multiple Decoding Heads, ICML 2024 (arXiv 2401.10774). Survey: speculative decoding.

With ``h`` the target's last hidden state (after its final norm) at the last verified token, the LM head gives the
next token ``t_1`` and head ``j`` (0-based) a distribution over the token ``j + 2`` places ahead::

    logits_j = W_j (h + SiLU(A_j h + b_j))          (one residual block and a vocabulary projection per head)

Candidates form a tree (:mod:`mllm_ref.decoding.tree`): the root is ``t_1``; a path ``(c_0, c_1, ...)`` of
:data:`DEFAULT_TREE` puts head 0's ``c_0``-th most likely token at depth 1, head 1's ``c_1``-th at depth 2, and so
on. The target verifies the tree in one forward; the hidden state of the last accepted node feeds the heads of the
next step, so Medusa needs no drafter and no second model (Medusa-1: the target frozen, only the heads trained,
:mod:`kernels_torch.tinyvlm.train_decoding`).

:func:`medusa_heads` (the heads' logits) is the reference; :func:`candidate_tree` builds the tree and
:class:`MedusaDecoding` runs it on the tiny VLM.

Shapes: K heads, D width, V vocabulary, T positions.

Deviations from the paper: greedy verification only (no typical acceptance); the tree is a small fixed one
(:data:`DEFAULT_TREE`, 11 candidates), not the paper's 64-node tree tuned on a calibration set; 3 heads.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mllm_ref import _checks
from mllm_ref.decoding._model import finish, stack_from_state
from mllm_ref.decoding.tree import verify_and_compact
from mllm_ref.nn.activations import silu
from mllm_ref.nn.rmsnorm import rmsnorm
from mllm_ref.oracle.registry import Technique, register
from mllm_ref.tinyvlm import model as vlm
from mllm_ref.tinyvlm import tokenizer
from mllm_ref.tinyvlm.plugs import DecodingStrategy

#: Candidate paths: each tuple gives, per depth, which of that head's top tokens to take (0 the most likely).
DEFAULT_TREE: tuple[tuple[int, ...], ...] = (
    (0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (2, 0), (0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0),
)  # fmt: skip


def medusa_heads(hidden: np.ndarray, fc_weight: np.ndarray, fc_bias: np.ndarray, head_weight: np.ndarray) -> np.ndarray:
    """Logits of every Medusa head.

    Args:
        hidden: ``float[D]`` or ``float[T, D]``: the target's last hidden state after its final norm.
        fc_weight: ``float[K, D, D]`` each head's residual-block weight ``A_j`` (``[out, in]``).
        fc_bias: ``float[K, D]``.
        head_weight: ``float[K, V, D]`` each head's vocabulary projection.
    Returns:
        ``float[K, V]`` or ``float[K, T, V]``.
    """
    h = _checks.float_array(hidden, "hidden", ndim=(1, 2))
    a = _checks.float_array(fc_weight, "fc_weight", ndim=3)
    b = _checks.float_array(fc_bias, "fc_bias", ndim=2)
    w = _checks.float_array(head_weight, "head_weight", ndim=3)
    for name, arr in (("fc_weight", a), ("fc_bias", b), ("head_weight", w)):
        _checks.same_dtype("hidden", h, name, arr)
    d = h.shape[-1]
    if a.shape[1:] != (d, d):
        raise ValueError(f"fc_weight must be [K, {d}, {d}] for hidden of width {d}, got {a.shape}")
    _checks.dim("fc_bias", b, 0, a.shape[0], "one row per head (fc_weight)")
    _checks.dim("fc_bias", b, 1, d, "the width of hidden")
    _checks.dim("head_weight", w, 0, a.shape[0], "one projection per head (fc_weight)")
    _checks.dim("head_weight", w, 2, d, "the width of hidden")
    x = h[None] if h.ndim == 1 else h  # [T, D]
    out = []
    for j in range(a.shape[0]):
        r = x + silu(x @ a[j].T + b[j])
        out.append(r @ w[j].T)
    res = np.stack(out)  # [K, T, V]
    return res[:, 0] if h.ndim == 1 else res


def candidate_tree(root: int, head_logits: np.ndarray, paths=DEFAULT_TREE) -> tuple[np.ndarray, np.ndarray]:
    """Tokens and parents (:mod:`mllm_ref.decoding.tree`) of the candidate tree.

    ``root``: the target's next token; ``head_logits``: ``float[K, V]``; ``paths``: top-index tuples, each path's
    prefixes listed before it (ties in the ranking to the lower id). Returns ``(tokens int64[N], parents int64[N])``.
    """
    z = _checks.float_array(head_logits, "head_logits", ndim=2)
    root = _checks.integer(root, "root", low=0, high=z.shape[1] - 1)
    ranked = np.argsort(-z, axis=1, kind="stable")
    index = {(): 0}
    tokens, parents = [root], [-1]
    for path in paths:
        path = tuple(int(c) for c in path)
        if not path or len(path) > z.shape[0] or path[:-1] not in index:
            raise ValueError(f"paths must list each path after its prefix and be at most {z.shape[0]} deep, got {path}")
        if path[-1] >= z.shape[1]:
            raise ValueError(f"path {path} asks for more candidates than the vocabulary has")
        index[path] = len(tokens)
        tokens.append(int(ranked[len(path) - 1, path[-1]]))
        parents.append(index[path[:-1]])
    return np.asarray(tokens, dtype=np.int64), np.asarray(parents, dtype=np.int64)


@dataclass(frozen=True)
class MedusaHeads:
    """Trained Medusa heads: ``fc_weight [K, D, D]``, ``fc_bias [K, D]``, ``head_weight [K, V, D]``."""

    fc_weight: np.ndarray
    fc_bias: np.ndarray
    head_weight: np.ndarray
    manifest: dict = field(default_factory=dict)

    def __call__(self, hidden: np.ndarray) -> np.ndarray:
        return medusa_heads(hidden, self.fc_weight, self.fc_bias, self.head_weight)


def load_heads(path: str | Path | None = None) -> MedusaHeads:
    """The bundled Medusa heads (``weights/decoding/medusa``), read without pickle and checked by sha256."""
    folder = vlm.WEIGHTS_DIR / "decoding" / "medusa" if path is None else Path(path)
    manifest, npz = vlm.read_weights(folder, train="python -m kernels_torch.tinyvlm.train_decoding --kind medusa")
    k = int(manifest["heads"])
    fc_w = np.stack([npz[f"medusa.{j}.fc.weight"] for j in range(k)]).astype(np.float32)
    fc_b = np.stack([npz[f"medusa.{j}.fc.bias"] for j in range(k)]).astype(np.float32)
    head = np.stack([npz[f"medusa.{j}.lm_head.weight"] for j in range(k)]).astype(np.float32)
    return MedusaHeads(fc_w, fc_b, head, manifest)


@dataclass(frozen=True)
class MedusaDecoding(DecodingStrategy):
    """Greedy Medusa decoding of the tiny VLM: heads propose a candidate tree, the target verifies it in one
    forward, the cache keeps the accepted path."""

    heads: MedusaHeads
    paths: tuple[tuple[int, ...], ...] = DEFAULT_TREE

    name = "medusa"


    def run(self, model, state, logits, *, prompt_ids, max_new_tokens, plugs, rng, trace) -> list[int]:
        if state.hidden is None:
            raise ValueError("Medusa needs the prefill's last hidden state (State.hidden)")
        depth = max(len(p) for p in self.paths)
        if depth > self.heads.fc_weight.shape[0]:
            raise ValueError(f"the tree is {depth} deep but there are {self.heads.fc_weight.shape[0]} heads")
        stack = stack_from_state(state, plugs)
        pos = int(state.next_position)
        hidden = state.hidden
        last = int(np.argmax(logits))
        if last == tokenizer.EOS:
            return []
        out = [last]
        norm_w, eps = model["norm.weight"], model.config.rms_eps
        while len(out) < max_new_tokens:
            t0 = time.perf_counter()
            head_logits = self.heads(rmsnorm(hidden, norm_w, eps=eps))
            tokens, parents = candidate_tree(last, head_logits, self.paths)
            t1 = time.perf_counter()
            emitted, path, hidden, stack = verify_and_compact(model, stack, tokens, parents, pos, plugs)
            trace.timeline += [("draft", t0, t1, len(tokens) - 1), ("verify", t1, time.perf_counter(), len(emitted))]
            trace.target_calls += 1
            trace.drafted += len(tokens) - 1
            trace.accepted += len(path) - 1
            pos += len(path)
            last = int(emitted[-1])
            out.extend(int(t) for t in emitted)
            if tokenizer.EOS in emitted:
                break
        return finish(out, max_new_tokens, trace, model.config.layers, stack)


# ----------------------------------------------------------------------------------------------- registration
_SIZES = {"tiny": (1, 4, 2, 5), "small": (3, 8, 16, 42), "tinyvlm": (3, 1, 128, 42), "large": (4, 8, 1024, 8000)}


def _case(size: str, rng: np.random.Generator) -> dict:
    k, t, d, v = _SIZES[size]
    hidden = rng.standard_normal((t, d)) if t > 1 else rng.standard_normal(d)
    return {
        "hidden": hidden.astype(np.float32),
        "fc_weight": (rng.standard_normal((k, d, d)) / np.sqrt(d)).astype(np.float32),
        "fc_bias": (0.1 * rng.standard_normal((k, d))).astype(np.float32),
        "head_weight": (rng.standard_normal((k, v, d)) / np.sqrt(d)).astype(np.float32),
    }


def _rows(model):
    return [("3 heads, 11-candidate tree", MedusaDecoding(load_heads()).plugs())]


register(
    Technique(
        id="decoding.medusa",
        reference=medusa_heads,
        make_case=_case,
        paper=(
            "T. Cai, Y. Li, Z. Geng, H. Peng, J. D. Lee, D. Chen, T. Dao, Medusa: Simple LLM Inference Acceleration "
            "Framework with Multiple Decoding Heads, ICML 2024 (arXiv 2401.10774)"
        ),
        test_sizes=("tiny", "small", "tinyvlm"),
        bench_sizes=("large",),
        chapter="book/05-speculative-decoding.md",
        model_level=True,
        notes="Medusa-1 (target frozen), 3 heads, greedy tree verification over a fixed 11-candidate tree",
        extra={"rows": _rows},
    )
)
