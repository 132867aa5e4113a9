"""Wall-time speedup of decoding strategies over plain greedy decoding, measured on the tiny VLM's captions.

Not a technique: the measurement behind ``mllm-ref speculate``, the chapter's speedup-against-k plot and the tour's
decoding rows. Captions are the long-output task (3 to 11 words). For each held-out caption scene, plain greedy
decoding and every strategy run back to back, ``repeats`` times each, interleaved (so a slow moment of the machine
hits all of them alike); per scene and method the fastest repeat counts. A strategy's decode time includes
everything it adds after the target's prefill (the drafter's own prefill of the image and prompt, drafting and
verification). The decode speedup is plain decode time over strategy decode time, summed over the scenes; the
end-to-end speedup adds the (shared) prefill to both.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from mllm_ref import _checks
from mllm_ref.tinyvlm import tokenizer, world
from mllm_ref.tinyvlm.evaluate import CAPTION_SEED
from mllm_ref.tinyvlm.model import TinyVLM, generate
from mllm_ref.tinyvlm.plugs import NONE, Plugs


def caption_speedup(
    model: TinyVLM,
    strategies: dict[str, Plugs],
    *,
    n_captions: int = 30,
    repeats: int = 3,
    progress: Callable[[int, int], None] | None = None,
) -> list[dict]:
    """Rows ``{name, tokens, decode_seconds, prefill_seconds, decode_speedup, end_to_end_speedup, acceptance_rate,
    tokens_per_call, accepted_per_call, identical, caption_exact_match}``; the first row is ``plain greedy``."""
    n_captions = _checks.integer(n_captions, "n_captions", low=1)
    repeats = _checks.integer(repeats, "repeats", low=1)
    if not isinstance(strategies, dict):
        raise TypeError(f"strategies must be a dict of name -> Plugs, got {type(strategies).__name__}")
    rng = np.random.default_rng(CAPTION_SEED)
    scenes = [world.make_scene(rng) for _ in range(n_captions)]
    ids = tokenizer.prompt_ids(tokenizer.CAPTION_PROMPT)
    methods = {"plain greedy": NONE, **strategies}
    acc = {name: {"tokens": 0, "decode": 0.0, "prefill": 0.0, "calls": 0, "drafted": 0, "accepted": 0,
                  "identical": True, "exact": 0} for name in methods}  # fmt: skip
    for i, scene in enumerate(scenes):
        image = world.render(scene)
        best: dict[str, tuple[float, float]] = {}
        outputs = {}
        for _ in range(repeats):
            for name, plugs in methods.items():
                g = generate(model, image, ids, plugs=plugs)
                tr = g.trace
                if name not in best or tr.decode_seconds < best[name][0]:
                    best[name] = (tr.decode_seconds, tr.prefill_seconds)
                outputs[name] = g
        plain = outputs["plain greedy"].tokens
        for name, g in outputs.items():
            a = acc[name]
            a["tokens"] += len(g.tokens)
            a["decode"] += best[name][0]
            a["prefill"] += best[name][1]
            a["calls"] += g.trace.target_calls
            a["drafted"] += g.trace.drafted
            a["accepted"] += g.trace.accepted
            a["identical"] &= g.tokens == plain
            a["exact"] += g.text == world.caption(scene)
        if progress:
            progress(i + 1, n_captions)
    base = acc["plain greedy"]
    rows = []
    for name, a in acc.items():
        rows.append({
            "name": name,
            "tokens": a["tokens"],
            "decode_seconds": a["decode"],
            "prefill_seconds": a["prefill"],
            "decode_tps": a["tokens"] / a["decode"] if a["decode"] > 0 else None,
            "decode_speedup": base["decode"] / a["decode"],
            "end_to_end_speedup": (base["decode"] + base["prefill"]) / (a["decode"] + a["prefill"]),
            "acceptance_rate": a["accepted"] / a["drafted"] if a["drafted"] else None,
            "accepted_per_call": a["accepted"] / a["calls"] if a["calls"] else None,
            "tokens_per_call": (a["accepted"] + a["calls"]) / a["calls"] if a["calls"] else None,
            "identical": a["identical"],
            "caption_exact_match": a["exact"] / n_captions,
        })  # fmt: skip
    return rows


def format_rows(rows: list[dict]) -> str:
    """A plain-text table of :func:`caption_speedup`'s rows."""
    head = ["method", "accept", "tok/call", "decode tok/s", "decode ×", "end-to-end ×", "identical"]
    lines = [head]
    for r in rows:
        lines.append([
            r["name"],
            "-" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.2f}",
            "-" if r["tokens_per_call"] is None else f"{r['tokens_per_call']:.2f}",
            f"{r['decode_tps']:.0f}", f"{r['decode_speedup']:.2f}", f"{r['end_to_end_speedup']:.2f}",
            "yes" if r["identical"] else "no",
        ])  # fmt: skip
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(head))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in lines)
