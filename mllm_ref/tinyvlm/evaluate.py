"""Held-out evaluation of the tiny VLM with the NumPy forward: VQA accuracy per question type and captions.

The held-out set is drawn from :data:`EVAL_SEED`, a seed the training stream never uses; the same examples are
used by ``mllm-ref eval``, the tour and the book, so their figures are comparable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from mllm_ref import _checks
from mllm_ref.tinyvlm import tokenizer, world
from mllm_ref.tinyvlm.model import Trace, TinyVLM, generate
from mllm_ref.tinyvlm.plugs import NONE, Plugs

EVAL_SEED = world.EVAL_SEED
CAPTION_SEED = world.CAPTION_SEED


@dataclass(frozen=True)
class EvalResult:
    """Accuracy figures and the per-example traces of one evaluation."""

    accuracy: float
    by_type: dict[str, float]
    caption_exact_match: float | None
    n: int
    n_captions: int
    predictions: tuple[str, ...]
    traces: tuple[Trace, ...]
    caption_predictions: tuple[str, ...] = ()
    caption_traces: tuple[Trace, ...] = ()

    @property
    def decode_layers(self) -> float | None:
        """Mean decoder layers run per decode step, over the questions and the captions (``None`` without decode
        steps)."""
        layers = [n for tr in self.traces + self.caption_traces for n in tr.decode_layers]
        return float(np.mean(layers)) if layers else None

    def to_json(self) -> dict:
        return {
            "accuracy": self.accuracy,
            "by_type": self.by_type,
            "caption_exact_match": self.caption_exact_match,
            "n": self.n,
            "n_captions": self.n_captions,
            "decode_layers": self.decode_layers,
        }


def held_out(n_per_type: int = 50) -> list[world.Example]:
    """The held-out VQA examples: ``n_per_type`` of each question type."""
    return world.vqa_set(EVAL_SEED, n_per_type)


def evaluate(
    model: TinyVLM,
    n_per_type: int = 50,
    *,
    n_captions: int = 50,
    plugs: Plugs = NONE,
    progress: Callable[[int, int], None] | None = None,
    question_after_image: bool = False,
) -> EvalResult:
    """Greedy answers on the held-out set; accuracy is the mean over question types of exact-answer matches.

    Args:
        n_per_type: held-out questions per type (6 types).
        n_captions: held-out images to caption (0 to skip captions).
        plugs: the technique under evaluation.
        progress: called as ``progress(done, total)`` after each example.
        question_after_image: prefill the image and ``<bos>`` only, then read the question through the cache
            (``generate(..., prefill_tokens=1)``). The answers are one word, so with the whole prompt prefilled the
            answer comes from the prefill's logits and a KV-cache technique never touches it; this mode judges what
            the cache kept of the image.
    """
    if not isinstance(question_after_image, bool):
        raise TypeError(f"question_after_image must be a bool, got {type(question_after_image).__name__}")
    split = 1 if question_after_image else None
    n_per_type = _checks.integer(n_per_type, "n_per_type", low=1)
    n_captions = _checks.integer(n_captions, "n_captions", low=0)
    examples = held_out(n_per_type)
    caption_scenes = []
    rng = np.random.default_rng(CAPTION_SEED)
    for _ in range(n_captions):
        caption_scenes.append(world.make_scene(rng))
    total = len(examples) + n_captions
    hits: dict[str, list[bool]] = {}
    preds, traces = [], []
    for i, ex in enumerate(examples):
        gen = generate(model, ex.image, tokenizer.prompt_ids(ex.qa.question), max_new_tokens=4, plugs=plugs,
                       prefill_tokens=split)
        hits.setdefault(ex.qa.qtype, []).append(gen.text == ex.qa.answer)
        preds.append(gen.text)
        traces.append(gen.trace)
        if progress:
            progress(i + 1, total)
    cap_hits, cap_preds, cap_traces = [], [], []
    for j, scene in enumerate(caption_scenes):
        gen = generate(model, world.render(scene), tokenizer.prompt_ids(tokenizer.CAPTION_PROMPT), plugs=plugs,
                       prefill_tokens=split)
        cap_hits.append(gen.text == world.caption(scene))
        cap_preds.append(gen.text)
        cap_traces.append(gen.trace)
        if progress:
            progress(len(examples) + j + 1, total)
    by_type = {k: float(np.mean(v)) for k, v in hits.items()}
    return EvalResult(
        accuracy=float(np.mean(list(by_type.values()))),
        by_type=by_type,
        caption_exact_match=float(np.mean(cap_hits)) if cap_hits else None,
        n=len(examples),
        n_captions=n_captions,
        predictions=tuple(preds),
        traces=tuple(traces),
        caption_predictions=tuple(cap_preds),
        caption_traces=tuple(cap_traces),
    )
