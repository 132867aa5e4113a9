"""Token-tree verification: many candidate continuations checked by the target in one forward.

Papers: X. Miao et al., SpecInfer: Accelerating Large Language Model Serving with Tree-based Speculative Inference
and Verification, ASPLOS 2024 (arXiv 2305.09781); T. Cai et al., Medusa: Simple LLM Inference Acceleration
Framework with Multiple Decoding Heads, ICML 2024 (arXiv 2401.10774). Survey: speculative decoding.

A token tree holds ``N`` nodes in topological order: node 0 is the root (the last emitted token, which no cache
holds yet), ``parents[i] < i`` for the others, and each path from the root is one candidate continuation. The
target reads the whole tree in ONE forward:

- tree attention mask: node ``i`` attends to the cached prefix and to the nodes on its own path from the root,
  ``allowed[i, j] = j is i or an ancestor of i`` (:func:`tree_attention_mask`);
- tree position ids: ``start + depth(i)`` (:func:`tree_positions`), so every node sits where it would in its own
  sequence; siblings share a position.

So node ``i``'s logits equal those a sequential forward over its path would give. Greedy verification
(:func:`tree_verify_greedy`, the reference) keeps the longest candidate path whose every token is the target's
arg-max after its parent (ties to the path ending at the lowest node index, as Medusa picks the first best
candidate), then emits the target's arg-max after its last node. Every emitted token is the target's greedy
choice after the tokens before it, so the output equals plain greedy decoding; with distinct sibling tokens, the
path is the walk from the root that always moves to the child carrying the target's choice. The cache is then
compacted: of the ``N`` new entries, only those of the nodes on the accepted path are kept, in order
(:meth:`mllm_ref.decoding._model.Stack.keep`).

:class:`TreeSpeculative` builds the tree with a drafter as SpecInfer's expansion does: at depth ``d`` every leaf gets
its drafter's ``widths[d]`` most likely tokens as children (ties to the lower id). :mod:`mllm_ref.decoding.medusa`
builds it from Medusa heads instead.

Shapes: N tree nodes, V vocabulary.

Deviations from the papers: greedy verification only (SpecInfer also verifies stochastically with multi-step
speculative sampling; Medusa also has a "typical acceptance" rule). One drafter, not SpecInfer's several
boost-tuned small models. The drafter expands the tree level by level, re-reading the tree drafted so far in each
call (a few nodes, so simpler than caching them under a tree mask).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from mllm_ref import _checks
from mllm_ref.decoding._model import Stack, embed, finish, run_layers, stack_from_state
from mllm_ref.oracle.registry import Technique, register
from mllm_ref.tinyvlm import tokenizer
from mllm_ref.tinyvlm import model as vlm
from mllm_ref.tinyvlm.plugs import DecodingStrategy, Plugs


def _parents(parents) -> np.ndarray:
    parents = _checks.int_array(parents, "parents", ndim=1, low=-1)
    if parents.size == 0 or parents[0] != -1:
        raise ValueError("parents must start with the root (-1)")
    if parents.size > 1 and (np.any(parents[1:] < 0) or np.any(parents[1:] >= np.arange(1, parents.size))):
        raise ValueError("parents must list each node after its parent (0 <= parents[i] < i for i > 0)")
    return parents.astype(np.int64)


def tree_depths(parents) -> np.ndarray:
    """``int64[N]``: each node's depth (the root 0)."""
    parents = _parents(parents)
    depth = np.zeros(parents.size, dtype=np.int64)
    for i in range(1, parents.size):
        depth[i] = depth[parents[i]] + 1
    return depth


def tree_positions(parents, start: int) -> np.ndarray:
    """``int64[N]``: position ids ``start + depth``."""
    start = _checks.integer(start, "start", low=0)
    return start + tree_depths(parents)


def tree_attention_mask(parents) -> np.ndarray:
    """``bool[N, N]``: ``allowed[i, j]`` when node ``j`` is node ``i`` or one of its ancestors."""
    parents = _parents(parents)
    n = parents.size
    allowed = np.zeros((n, n), dtype=bool)
    for i in range(n):
        allowed[i, i] = True
        if i:
            allowed[i] |= allowed[parents[i]]
    return allowed


def tree_verify_greedy(target_logits: np.ndarray, tokens: np.ndarray, parents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Greedy verification of a token tree.

    Args:
        target_logits: ``float[N, V]``: the target's logits at each node (from the tree forward).
        tokens: ``int[N]``: each node's token (the root's is the last emitted token).
        parents: ``int[N]``: each node's parent, ``-1`` for the root.
    Returns:
        ``(emitted int64[n + 1], path int64[n + 1])``: the accepted tokens then the target's arg-max after them,
        and the accepted nodes from the root (whose cache entries are kept).
    """
    z = _checks.float_array(target_logits, "target_logits", ndim=2)
    parents = _parents(parents)
    tokens = _checks.int_array(tokens, "tokens", ndim=1, low=0, high=z.shape[1] - 1)
    _checks.dim("tokens", tokens, 0, parents.size, "one token per node")
    _checks.dim("target_logits", z, 0, parents.size, "one row per node")
    choice = np.argmax(z, axis=1)
    depth = tree_depths(parents)
    ok = np.zeros(parents.size, dtype=bool)  # node and all its ancestors are the target's greedy choices
    ok[0] = True
    for i in range(1, parents.size):
        ok[i] = ok[parents[i]] and tokens[i] == choice[parents[i]]
    end = int(np.flatnonzero(ok & (depth == depth[ok].max()))[0])  # the deepest, ties to the lowest index
    path = [end]
    while path[-1] != 0:
        path.append(int(parents[path[-1]]))
    path_arr = np.asarray(path[::-1], dtype=np.int64)
    emitted = np.concatenate([tokens[path_arr[1:]].astype(np.int64), choice[path_arr[-1:]].astype(np.int64)])
    return emitted, path_arr


def forward_tree(model: vlm.TinyVLM, stack: Stack, tokens, parents, start: int, plugs: Plugs = vlm.NONE):
    """Feed a token tree through every layer in one call (tree mask, tree positions); returns the hidden states
    ``float32[N, D]`` after the last layer and the stack with the ``N`` nodes appended."""
    parents = _parents(parents)
    tokens = np.asarray(tokens, dtype=np.int64)
    return run_layers(model, stack, embed(model, tokens), tree_positions(parents, start),
                      allowed=tree_attention_mask(parents), plugs=plugs)  # fmt: skip


def verify_and_compact(model, stack: Stack, tokens, parents, start: int, plugs: Plugs = vlm.NONE):
    """Verify a tree with the target and compact its cache to the accepted path.

    Returns ``(emitted, path, hidden of the last accepted node float32[D], compacted stack)``."""
    s0 = stack.length()
    h, grown = forward_tree(model, stack, tokens, parents, start, plugs)
    emitted, path = tree_verify_greedy(vlm.logits_from_hidden(model, h, plugs), np.asarray(tokens), parents)
    keep = np.concatenate([np.arange(s0), s0 + path])
    return emitted, path, h[path[-1]], grown.keep(keep)


def _top(logits: np.ndarray, w: int) -> list[int]:
    return [int(t) for t in np.argsort(-logits, kind="stable")[:w]]


@dataclass(frozen=True)
class TreeSpeculative(DecodingStrategy):
    """Greedy tree speculation on the tiny VLM: the drafter expands ``widths[d]`` children per leaf at depth ``d``
    (SpecInfer's expansion), the target verifies the tree in one forward, the cache keeps the accepted path."""

    drafter: object
    widths: tuple[int, ...] = (2, 2, 1, 1)

    name = "tree"

    def __post_init__(self):
        if not isinstance(self.widths, tuple) or not self.widths:
            raise TypeError("widths must be a non-empty tuple of ints")
        for w in self.widths:
            _checks.integer(w, "widths", low=1)


    def draft_tree(self, dstack: Stack, root: int, start: int) -> tuple[list[int], list[int]]:
        """Tokens and parents of the tree grown from ``root`` (at position ``start``) by the drafter."""
        tokens, parents, depth = [root], [-1], [0]
        for d, w in enumerate(self.widths):
            leaves = [i for i in range(len(tokens)) if depth[i] == d and tokens[i] != tokenizer.EOS]
            if not leaves:
                break
            h, _ = forward_tree(self.drafter.model, dstack, tokens, parents, start)
            logits = vlm.logits_from_hidden(self.drafter.model, h[leaves])
            for leaf, z in zip(leaves, logits):
                for t in _top(z, w):
                    tokens.append(t)
                    parents.append(leaf)
                    depth.append(d + 1)
        return tokens, parents

    def run(self, model, state, logits, *, prompt_ids, max_new_tokens, plugs, rng, trace) -> list[int]:
        stack = stack_from_state(state, plugs)
        pos = int(state.next_position)
        last = int(np.argmax(logits))
        if last == tokenizer.EOS:
            return []
        out = [last]
        t0 = time.perf_counter()
        dstack = self.drafter.prefill(state.info, prompt_ids)
        trace.timeline.append(("draft", t0, time.perf_counter(), 0))
        dpending: list[int] = []  # emitted tokens before `last` the drafter has not read
        while len(out) < max_new_tokens:
            t0 = time.perf_counter()
            if dpending:
                _, dstack = self.drafter.feed(dstack, dpending, pos - len(dpending))
            tokens, parents = self.draft_tree(dstack, last, pos)
            t1 = time.perf_counter()
            emitted, path, _, stack = verify_and_compact(model, stack, tokens, parents, pos, plugs)
            trace.timeline += [("draft", t0, t1, len(tokens) - 1), ("verify", t1, time.perf_counter(), len(emitted))]
            trace.target_calls += 1
            trace.drafted += len(tokens) - 1
            trace.accepted += len(path) - 1
            dpending = [last] + [int(t) for t in emitted[:-1]]
            pos += len(path)
            last = int(emitted[-1])
            out.extend(int(t) for t in emitted)
            if tokenizer.EOS in emitted:
                break
        return finish(out, max_new_tokens, trace, model.config.layers, stack)


# ----------------------------------------------------------------------------------------------- registration
def random_tree(rng: np.random.Generator, n: int) -> np.ndarray:
    """Parents of a random tree of ``n`` nodes in topological order."""
    return np.array([-1] + [int(rng.integers(0, i)) for i in range(1, n)], dtype=np.int64)


_SIZES = {"tiny": (3, 4), "small": (9, 42), "medusa": (64, 1000)}


def _case(size: str, rng: np.random.Generator) -> dict:
    n, v = _SIZES[size]
    parents = random_tree(rng, n)
    z = rng.standard_normal((n, v)).astype(np.float32)
    tokens = rng.integers(0, v, n)
    for i in range(1, n):  # make about half the nodes the target's choice, so paths get accepted
        if rng.random() < 0.5:
            tokens[i] = int(np.argmax(z[parents[i]]))
    return {"target_logits": z, "tokens": tokens.astype(np.int64), "parents": parents}


def _strategy():
    from hypothesis import strategies as st

    @st.composite
    def cases(draw):
        n, v = draw(st.integers(1, 12)), draw(st.integers(1, 5))
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        parents = random_tree(rng, n)
        z = np.round(rng.standard_normal((n, v)) * 2)
        tokens = rng.integers(0, v, n).astype(np.int64)
        return {"target_logits": z, "tokens": tokens, "parents": parents}

    return cases()


def _rows(model):
    from mllm_ref.decoding.multimodal import load_drafter

    drafter = load_drafter(True)
    return [("drafter with the image, widths 2-2-1-1 (up to 16 nodes)", TreeSpeculative(drafter, (2, 2, 1, 1)).plugs())]


register(
    Technique(
        id="decoding.tree",
        reference=tree_verify_greedy,
        make_case=_case,
        paper=(
            "X. Miao et al., SpecInfer: Accelerating Large Language Model Serving with Tree-based Speculative "
            "Inference and Verification, ASPLOS 2024 (arXiv 2305.09781); T. Cai et al., Medusa, ICML 2024 "
            "(arXiv 2401.10774)"
        ),
        test_sizes=("tiny", "small", "medusa"),
        compare="exact",
        strategy=_strategy,
        chapter="book/05-speculative-decoding.md",
        model_level=True,
        notes="longest path whose tokens are the target's arg-max after their parents (ties to the lowest end node)",
        extra={"rows": _rows},
    )
)
