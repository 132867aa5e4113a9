"""DeeR: dynamic early exit by the consistency of consecutive exits, under a compute budget.

Paper: Y. Yue, Y. Wang, B. Kang, Y. Han, S. Wang, S. Song, J. Feng, G. Huang, DeeR-VLA: Dynamic Inference of
Multimodal Large Language Models for Efficient Robot Execution, NeurIPS 2024 (arXiv 2411.02359). Survey: dynamic
inference for MLLMs.

DeeR-VLA runs a robot policy that emits a sequence of actions, one per step. It has no confidence to read off a
regression output, so it exits at the first layer whose intermediate output agrees with the previous exit's: with
``a_l`` the output predicted from layer ``l``,

    exit after layer l   when   || a_l - a_{l-1} ||  <  η

and it chooses ``η`` so that the average compute over a calibration set meets a budget (the paper solves for
per-exit thresholds under an average or peak budget). For the tiny VLM's answers and caption words, the output of
exit ``l`` is its exit head's distribution ``p_l``, and the distance is the total variation
``0.5 * sum_v |p_l(v) - p_{l-1}(v)|`` (:func:`exit_distances`). :func:`deer_threshold` (the reference) finds the
smallest ``η`` whose mean exit layer on calibration tokens stays within the budget.

:class:`DeeRExit` is the exit policy; :func:`calibrate` measures the distances on held-out calibration scenes
(disjoint from the evaluation seed) and sets ``η`` for a budget in layers per token.

Shapes: N calibration tokens, L layers, V vocabulary.

Deviations from the paper: one threshold for every exit (the paper tunes one per exit by Bayesian optimisation);
exits are the tiny VLM's trained per-layer heads (DeeR-VLA's exits are pooled features through a shared action
head); distances are between next-token distributions, not action vectors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mllm_ref import _checks
from mllm_ref.nn.softmax import softmax
from mllm_ref.oracle.registry import Technique, register
from mllm_ref.tinyvlm.plugs import ExitPolicy, Plugs


def exit_distances(logits: np.ndarray) -> np.ndarray:
    """``float64[L]``: the total-variation distance between consecutive exits' distributions (``[0]`` is 1: the
    first exit has nothing to agree with). ``logits``: ``float[L, V]`` one token's exit logits per layer."""
    z = _checks.float_array(logits, "logits", ndim=2)
    p = softmax(z.astype(np.float64), axis=-1)
    d = np.ones(p.shape[0])
    d[1:] = 0.5 * np.abs(p[1:] - p[:-1]).sum(axis=-1)
    return d


def exit_layer_for(distances: np.ndarray, threshold: float, min_layer: int = 1) -> np.ndarray:
    """``int64[N]``: the exit layer of each token (rows of ``distances`` ``float[N, L]``): the first ``l >=
    min_layer`` with ``distances[l] < threshold``, else ``L - 1``."""
    d = _checks.float_array(distances, "distances", ndim=2)
    threshold = _checks.real(threshold, "threshold")
    min_layer = _checks.integer(min_layer, "min_layer", low=0)
    ok = d < threshold
    ok[:, : min(min_layer, d.shape[1] - 1)] = False
    ok[:, -1] = True
    return np.argmax(ok, axis=1).astype(np.int64)


def deer_threshold(distances: np.ndarray, budget: float, *, min_layer: int = 1) -> float:
    """The smallest threshold ``η`` whose mean number of layers run per token, ``mean(exit layer + 1)``, is at most
    ``budget`` on the calibration tokens ``distances`` ``float[N, L]`` (rows from :func:`exit_distances`).

    A larger ``η`` exits earlier, so the smallest one that meets the budget exits as late as the budget allows.
    Candidates are 0 (never exit early) and each distance moved up by one ulp (the threshold at which that exit
    opens); if even the largest candidate exceeds the budget, it is returned."""
    d = _checks.float_array(distances, "distances", ndim=2)
    budget = _checks.real(budget, "budget", low=1.0)
    cands = np.unique(np.concatenate([[0.0], np.nextafter(d.ravel(), np.inf)]))
    lo, hi = 0, cands.size - 1
    # layers run fall as the threshold grows: bisect for the smallest threshold that meets the budget (every larger
    # one meets it too and exits earlier, at more risk)
    if (exit_layer_for(d, cands[-1], min_layer) + 1).mean() > budget:
        return float(cands[-1])
    while lo < hi:
        mid = (lo + hi) // 2
        if (exit_layer_for(d, cands[mid], min_layer) + 1).mean() <= budget:
            hi = mid
        else:
            lo = mid + 1
    return float(cands[lo])


@dataclass
class DeeRExit(ExitPolicy):
    """DeeR's consistency exit for the tiny VLM: exit after the first layer ``>= min_layer`` whose exit
    distribution is within total variation ``threshold`` of the previous layer's. ``heads``: trained exit heads."""

    heads: object
    threshold: float = 0.05
    min_layer: int = 1
    _prev: np.ndarray | None = field(default=None, repr=False)

    name = "deer"


    def should_exit(self, layer, hidden, logits_fn) -> bool:
        logits = self.heads.logits(layer, hidden)
        prev = None if layer == 0 else self._prev
        self._prev = logits
        if prev is None or layer < self.min_layer:
            return False
        return bool(exit_distances(np.stack([prev, logits]))[1] < self.threshold)

    def exit_logits(self, layer, hidden, logits_fn):
        return self.heads.logits(layer, hidden)


def calibration_distances(model, heads, n_scenes: int = 8, seed: int = 424242) -> np.ndarray:
    """``float64[N, L-1]``: exit distances of every decoded token (questions read through the cache and captions)
    of ``n_scenes`` calibration scenes drawn from ``seed`` (disjoint from the held-out evaluation seed)."""
    from mllm_ref.tinyvlm import tokenizer, world
    from mllm_ref.tinyvlm.model import decode_step, prefill

    from mllm_ref.dynamic.early_exit import HiddenRecorder

    rows = []
    rng = np.random.default_rng(seed)
    rec = HiddenRecorder()
    plugs = Plugs(exit_policy=rec)
    for _ in range(n_scenes):
        scene = world.make_scene(rng)
        image = world.render(scene)
        qas = world.all_questions(scene)
        prompts = [tokenizer.prompt_ids(qas[int(rng.integers(len(qas)))].question),
                   tokenizer.prompt_ids(tokenizer.CAPTION_PROMPT) + tokenizer.encode(world.caption(scene))]  # fmt: skip
        for ids in prompts:
            _, state = prefill(model, image, ids[:1])
            for t in ids[1:]:
                rec.hidden.clear()
                _, state = decode_step(model, state, int(t), plugs)
                rows.append(exit_distances(np.stack([heads.logits(j, h) for j, h in enumerate(rec.hidden)])))
    return np.stack(rows)


def calibrate(model, heads, budget: float, n_scenes: int = 8) -> DeeRExit:
    """A :class:`DeeRExit` whose threshold meets ``budget`` layers per token on average on calibration scenes."""
    return DeeRExit(heads, deer_threshold(calibration_distances(model, heads, n_scenes), budget))


# ----------------------------------------------------------------------------------------------- registration
_SIZES = {"tiny": (5, 4), "small": (40, 11), "tinyvlm": (300, 11)}


def _case(size: str, rng: np.random.Generator) -> dict:
    n, layers = _SIZES[size]
    # distances shrink with depth, with noise: later exits agree more
    d = np.clip(np.exp(-np.linspace(0, 4, layers))[None] * rng.uniform(0.2, 1.5, (n, layers)), 0, 1)
    d[:, 0] = 1.0
    return {"distances": d, "budget": float(layers) * 0.6, "min_layer": 1}


def _rows(model):
    from mllm_ref.decoding.self_speculative import load_exit_heads

    heads = load_exit_heads()
    return [(f"consistency, budget {b} of {model.config.layers} layers (calibrated)", calibrate(model, heads, b).plugs())
            for b in (9.0,)]  # fmt: skip


register(
    Technique(
        id="dynamic.deer",
        reference=deer_threshold,
        make_case=_case,
        paper=(
            "Y. Yue, Y. Wang, B. Kang, Y. Han, S. Wang, S. Song, J. Feng, G. Huang, DeeR-VLA: Dynamic Inference of "
            "Multimodal Large Language Models for Efficient Robot Execution, NeurIPS 2024 (arXiv 2411.02359)"
        ),
        test_sizes=("tiny", "small", "tinyvlm"),
        compare="exact",
        chapter="book/06-early-exit.md",
        model_level=True,
        notes="exit when consecutive exits' distributions agree (total variation < η); η calibrated to a budget",
        extra={"rows": _rows, "question_after_image": True},
    )
)
