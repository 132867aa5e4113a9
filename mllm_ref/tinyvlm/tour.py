"""The tour: every registered model-level technique on the bundled model, against the plain baseline.

A model-level technique is registered with ``model_level=True`` and, in ``extra``, ``"plugs"``: a callable
``plugs(model) -> Plugs`` giving its default setting on the tiny VLM, and ``"setting"``: a short description of
that setting (e.g. ``"K=2, R=50%"``). Each row of the tour evaluates the held-out set with those plugs and reports
accuracy and cost, each cost also as a ratio to the baseline row (id ``"baseline"``):

- ``prefill_flops``: FLOPs of the encoder, the connector and the decoder prefill, from the tokens each layer
  actually processed (:mod:`mllm_ref.system.complexity`), averaged over the held-out questions;
- ``kv_bytes``: bytes held by the KV caches at the end of each request (mean);
- ``decode_tps``: decode tokens per second of wall time (captions give most of the decode steps);
- ``wall``: total wall time of the evaluation;
- ``layers``: decoder layers run per decode step (mean);
- ``identical_output``: whether every answer and caption equals the baseline's.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from mllm_ref.oracle import registry
from mllm_ref.system.complexity import connector_cost, encoder_cost, prefill_cost
from mllm_ref.system.specs import spec_from_tinyvlm
from mllm_ref.tinyvlm.evaluate import EvalResult, evaluate
from mllm_ref.tinyvlm.model import TinyVLM
from mllm_ref.tinyvlm.plugs import NONE, Plugs

RATIO_KEYS = ("prefill_flops", "kv_bytes", "decode_tps", "wall", "layers")


def model_level_techniques(only: str | None = None) -> list[registry.Technique]:
    """Registered techniques that plug into the tiny VLM (optionally of one family)."""
    return [t for t in registry.all_techniques(only) if t.model_level]


def _figures(model: TinyVLM, result: EvalResult, wall: float) -> dict:
    spec = spec_from_tinyvlm(model.config)
    fixed = encoder_cost(spec).flops + connector_cost(spec).flops
    prefill = [
        fixed + prefill_cost(spec, tr.n_visual, tr.n_prompt, layer_tokens=tr.layer_tokens).flops
        for tr in result.traces
    ]
    steps = sum(len(tr.decode_layers) for tr in result.traces)
    decode_seconds = sum(tr.decode_seconds for tr in result.traces)
    layers = [n for tr in result.traces for n in tr.decode_layers]
    return {
        "accuracy": result.accuracy,
        "by_type": result.by_type,
        "caption_exact_match": result.caption_exact_match,
        "prefill_flops": float(np.mean(prefill)),
        "kv_bytes": float(np.mean([tr.kv_bytes for tr in result.traces])),
        "decode_tps": steps / decode_seconds if decode_seconds > 0 else None,
        "wall": wall,
        "layers": float(np.mean(layers)) if layers else None,
    }


def run_tour(
    model: TinyVLM,
    *,
    only: str | None = None,
    n_per_type: int = 30,
    n_captions: int = 20,
    progress: Callable[[str, int, int], None] | None = None,
) -> list[dict]:
    """Rows of the tour: the baseline first, then each model-level technique (see the module docstring)."""
    entries: list[tuple[str, str, Plugs]] = [("baseline", "plain model", NONE)]
    for tech in model_level_techniques(only):
        entries.append((tech.id, tech.extra.get("setting", "default"), tech.extra["plugs"](model)))
    rows, base, base_preds = [], None, None
    for tid, setting, plugs in entries:
        cb = (lambda done, total, _id=tid: progress(_id, done, total)) if progress else None
        t0 = time.perf_counter()
        result = evaluate(model, n_per_type, n_captions=n_captions, plugs=plugs, progress=cb)
        fig = _figures(model, result, time.perf_counter() - t0)
        preds = result.predictions
        if base is None:
            base, base_preds = fig, preds
        row = {"id": tid, "setting": setting}
        row.update(fig)
        row["accuracy_delta"] = fig["accuracy"] - base["accuracy"]
        for key in RATIO_KEYS:
            a, b = fig[key], base[key]
            row[f"{key}_ratio"] = (a / b) if (a is not None and b not in (None, 0)) else None
        row["identical_output"] = preds == base_preds
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    """A plain-text table of the tour rows."""
    head = ["technique", "setting", "accuracy", "Δacc", "prefill GFLOP", "×", "KV KiB", "×", "decode tok/s", "×", "wall s", "×", "layers", "same"]
    lines = [head]
    for r in rows:
        def ratio(k):
            v = r[f"{k}_ratio"]
            return "-" if v is None else f"{v:.2f}"
        lines.append([
            r["id"], r["setting"], f"{r['accuracy']:.3f}", f"{r['accuracy_delta']:+.3f}",
            f"{r['prefill_flops'] / 1e9:.3f}", ratio("prefill_flops"),
            f"{r['kv_bytes'] / 1024:.1f}", ratio("kv_bytes"),
            "-" if r["decode_tps"] is None else f"{r['decode_tps']:.0f}", ratio("decode_tps"),
            f"{r['wall']:.1f}", ratio("wall"),
            "-" if r["layers"] is None else f"{r['layers']:.2f}",
            "yes" if r["identical_output"] else "no",
        ])
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(head))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in lines)
