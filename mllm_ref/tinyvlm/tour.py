"""The tour: every registered model-level technique on the bundled model, against the plain baseline.

A model-level technique is registered with ``model_level=True`` and, in ``extra``, ``"plugs"``: a callable
``plugs(model) -> Plugs`` giving its default setting on the tiny VLM, and ``"setting"``: a short description of
that setting (e.g. ``"K=2, R=50%"``). A connector is a different model rather than a plug: it gives instead
``"variants"``: a callable ``variants(model) -> [(setting, variant model)]`` (the trained connector variants of
:mod:`mllm_ref.tinyvlm.variants`), one row each. A technique with several settings worth a row each (KIVI at 2 and
4 bits) gives ``"rows"``: a callable ``rows(model) -> [(setting, plugs)]``; one that runs another model with plugs
(MatFormer's fine-tuned FFNs at several widths) gives ``"model_rows"``: ``model_rows(model) -> [(setting, model,
plugs)]``.

A KV-cache technique sets ``"question_after_image": True``: its rows are evaluated with the image and ``<bos>``
prefilled and compressed first and the question read through the compressed cache
(:func:`mllm_ref.tinyvlm.evaluate.evaluate`'s ``question_after_image``), since the one-word answers otherwise
come from the prefill's logits and never touch the cache. Those rows are compared with a second baseline row, id
``"baseline-question-after-image"``: the plain model in the same mode.

Each row evaluates the held-out set and reports accuracy and cost, each cost also as a ratio to its baseline row
(id ``"baseline"``, or the one above):

- ``visual_tokens``: visual tokens entering the decoder (mean);

- ``prefill_flops``: FLOPs of the encoder, the connector and the decoder prefill, from the tokens each layer
  actually processed (:mod:`mllm_ref.system.complexity`), averaged over the held-out questions;
- ``llm_prefill_flops``: the decoder's share of it (what FastV and most token-dropping papers count);
- ``kv_bytes``: bytes held by the KV caches at the end of each request (mean over the questions);
- ``decode_tps``: decode tokens per second of wall time, over the questions and the captions (captions give most of
  the decode steps);
- ``wall``: total wall time of the evaluation;
- ``layers``: decoder layers run per decode step (mean, questions and captions);
- ``identical_output``: whether every answer and caption equals the baseline's;
- ``acceptance_rate``, ``accepted_per_call``, ``tokens_per_call``: for a speculative decoding strategy, the share of
  drafted tokens the target accepted, the accepted draft tokens per target forward in decoding, and the tokens
  emitted per target forward (accepted plus the target's own); ``None`` otherwise.

A decoding technique gives its strategies as ``"rows"`` (``Plugs(decoding=strategy)``); ``mllm-ref speculate``
(:mod:`mllm_ref.decoding._speedup`) times them on captions alone, where decoding is most of the work.
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

#: The id of the baseline row of the KV-cache techniques (question read through the cache).
AFTER_IMAGE_BASELINE = "baseline-question-after-image"

RATIO_KEYS = ("prefill_flops", "llm_prefill_flops", "kv_bytes", "decode_tps", "wall", "layers")


def model_level_techniques(only: str | None = None) -> list[registry.Technique]:
    """Registered techniques that plug into the tiny VLM (optionally of one family)."""
    return [t for t in registry.all_techniques(only) if t.model_level]


def figures(model: TinyVLM, result: EvalResult, wall: float) -> dict:
    """Accuracy and cost figures of one evaluation (the keys of a tour row before the ratios); ``wall``: its
    wall time in seconds."""
    spec = spec_from_tinyvlm(model.config)
    llm, prefill = [], []
    for tr in result.traces:
        enc = encoder_cost(spec, layer_tokens=tr.encoder_tokens, mlp_tokens=tr.encoder_mlp_tokens).flops
        if model.connector is None:
            conn = connector_cost(spec, tokens=tr.connector_tokens).flops
        else:
            from mllm_ref.tinyvlm.variants import connector_flops

            conn = connector_flops(model)
        dec = prefill_cost(spec, tr.n_visual, tr.n_prompt, layer_tokens=tr.layer_tokens).flops
        llm.append(dec)
        prefill.append(enc + conn + dec)
    every = result.traces + result.caption_traces  # decoding figures: questions and captions
    steps = sum(len(tr.decode_layers) for tr in every)
    decode_seconds = sum(tr.decode_seconds for tr in every)
    layers = [n for tr in every for n in tr.decode_layers]
    calls = sum(tr.target_calls for tr in every)
    drafted = sum(tr.drafted for tr in every)
    accepted = sum(tr.accepted for tr in every)
    return {
        "acceptance_rate": accepted / drafted if drafted else None,
        "tokens_per_call": (accepted + calls) / calls if calls else None,
        "accepted_per_call": accepted / calls if calls else None,
        "accuracy": result.accuracy,
        "by_type": result.by_type,
        "visual_tokens": float(np.mean([tr.n_visual for tr in result.traces])),
        "caption_exact_match": result.caption_exact_match,
        "prefill_flops": float(np.mean(prefill)),
        "llm_prefill_flops": float(np.mean(llm)),
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
    entries: list[tuple[str, str, Plugs, TinyVLM, bool]] = [("baseline", "plain model", NONE, model, False)]
    techs = model_level_techniques(only)
    if any(t.extra.get("question_after_image") for t in techs):
        entries.append((AFTER_IMAGE_BASELINE, "plain model, question read through the cache", NONE, model, True))
    for tech in techs:
        after = bool(tech.extra.get("question_after_image", False))
        if "variants" in tech.extra:  # a connector: each trained variant is a model of its own
            for setting, variant in tech.extra["variants"](model):
                entries.append((tech.id, setting, NONE, variant, after))
        elif "rows" in tech.extra:
            for setting, plugs in tech.extra["rows"](model):
                entries.append((tech.id, setting, plugs, model, after))
        elif "model_rows" in tech.extra:  # another model (e.g. MatFormer's fine-tuned FFNs) with its plugs
            for setting, row_model, plugs in tech.extra["model_rows"](model):
                entries.append((tech.id, setting, plugs, row_model, after))
        else:
            entries.append((tech.id, tech.extra.get("setting", "default"), tech.extra["plugs"](model), model, after))
    rows, bases = [], {}
    for tid, setting, plugs, row_model, after in entries:
        cb = (lambda done, total, _id=tid: progress(_id, done, total)) if progress else None
        t0 = time.perf_counter()
        result = evaluate(row_model, n_per_type, n_captions=n_captions, plugs=plugs, progress=cb,
                          question_after_image=after)  # fmt: skip
        fig = figures(row_model, result, time.perf_counter() - t0)
        preds = result.predictions + result.caption_predictions
        if after not in bases:
            bases[after] = (fig, preds)
        base, base_preds = bases[after]
        row = {"id": tid, "setting": setting, "question_after_image": after}
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
    head = ["technique", "setting", "accuracy", "Δacc", "captions", "vis tok", "prefill GFLOP", "×", "LLM ×", "KV KiB", "×",
            "decode tok/s", "×", "wall s", "×", "layers", "same"]  # fmt: skip
    spec = any(r.get("acceptance_rate") is not None for r in rows)
    if spec:
        head = head + ["accept", "tok/call"]
    lines = [head]
    for r in rows:
        def ratio(k):
            v = r[f"{k}_ratio"]
            return "-" if v is None else f"{v:.2f}"
        lines.append([
            r["id"], r["setting"], f"{r['accuracy']:.3f}", f"{r['accuracy_delta']:+.3f}",
            "-" if r.get("caption_exact_match") is None else f"{r['caption_exact_match']:.2f}", f"{r['visual_tokens']:.0f}",
            f"{r['prefill_flops'] / 1e9:.3f}", ratio("prefill_flops"), ratio("llm_prefill_flops"),
            f"{r['kv_bytes'] / 1024:.1f}", ratio("kv_bytes"),
            "-" if r["decode_tps"] is None else f"{r['decode_tps']:.0f}", ratio("decode_tps"),
            f"{r['wall']:.1f}", ratio("wall"),
            "-" if r["layers"] is None else f"{r['layers']:.2f}",
            "yes" if r["identical_output"] else "no",
        ] + ([] if not spec else [
            "-" if r.get("acceptance_rate") is None else f"{r['acceptance_rate']:.2f}",
            "-" if r.get("tokens_per_call") is None else f"{r['tokens_per_call']:.2f}",
        ]))  # fmt: skip
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(head))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in lines)


def ratio_policies(family: str = "tokens") -> dict[str, Callable[[float], Plugs]]:
    """For each model-level technique of ``family`` whose module defines ``make_policy(keep_ratio)``, a function
    giving its plugs at a kept-token fraction (for sliders and :func:`sweep`)."""
    import importlib

    out = {}
    for tech in model_level_techniques(family):
        module = importlib.import_module(tech.reference.__module__)
        make = getattr(module, "make_policy", None)
        if make is not None:
            out[tech.id] = (lambda keep, _make=make: _as_plugs(_make(keep)))
    return out


def _as_plugs(policy) -> Plugs:
    from mllm_ref.tinyvlm.plugs import TokenPolicy

    if isinstance(policy, Plugs):
        return policy
    if isinstance(policy, TokenPolicy):
        return Plugs(token_policy=policy)
    raise TypeError(f"make_policy must return a TokenPolicy or Plugs, got {type(policy).__name__}")


def sweep(
    model: TinyVLM,
    policies: dict[str, Callable[[float], Plugs]],
    keep_ratios,
    *,
    n_per_type: int = 10,
    progress: Callable[[str, float], None] | None = None,
) -> list[dict]:
    """Accuracy against the kept-token fraction: every method at every ratio, plus the baseline.

    Each row: ``method``, ``keep_ratio`` (asked), ``kept_fraction`` (measured: visual tokens in the decoder's last
    prefill layer over the patch count, averaged over the questions), ``accuracy``, ``by_type``,
    ``llm_prefill_flops_ratio`` and ``prefill_flops_ratio`` (to the baseline). No captions are generated.
    """
    def run(plugs):
        result = evaluate(model, n_per_type, n_captions=0, plugs=plugs)
        fig = figures(model, result, 0.0)
        last = [tr.layer_tokens[-1] - tr.n_prompt for tr in result.traces]
        return fig, float(np.mean(last)) / model.config.n_patches

    base, frac = run(NONE)
    rows = [{"method": "baseline", "keep_ratio": 1.0, "kept_fraction": frac, "accuracy": base["accuracy"],
             "by_type": base["by_type"], "llm_prefill_flops_ratio": 1.0, "prefill_flops_ratio": 1.0}]  # fmt: skip
    for name, make in policies.items():
        for keep in keep_ratios:
            if progress:
                progress(name, keep)
            fig, frac = run(make(keep))
            rows.append({
                "method": name, "keep_ratio": float(keep), "kept_fraction": frac, "accuracy": fig["accuracy"],
                "by_type": fig["by_type"],
                "llm_prefill_flops_ratio": fig["llm_prefill_flops"] / base["llm_prefill_flops"],
                "prefill_flops_ratio": fig["prefill_flops"] / base["prefill_flops"],
            })  # fmt: skip
    return rows


def kv_policies(knob: str) -> dict[str, Callable]:
    """For each model-level ``kvcache`` technique whose module defines ``make_policy``, that function, keyed by
    id, when its first argument is named ``knob`` (``"budget"``: tokens kept per KV head and layer, for
    eviction; ``"bits"``: bits per number, for quantization)."""
    import importlib
    import inspect

    out = {}
    for tech in model_level_techniques("kvcache"):
        make = getattr(importlib.import_module(tech.reference.__module__), "make_policy", None)
        if make is not None and next(iter(inspect.signature(make).parameters)) == knob:
            out[tech.id] = make
    return out


def kv_sweep(
    model: TinyVLM,
    makers: dict[str, Callable],
    knobs,
    *,
    n_per_type: int = 10,
    n_captions: int = 5,
    progress: Callable[[str, object], None] | None = None,
) -> list[dict]:
    """Accuracy and KV bytes of KV policies against a knob (bits, or tokens kept), the question read through the
    cache (``question_after_image``), plus the plain cache as the row ``method="baseline"``.

    Args:
        makers: ``{name: make_policy(knob) -> KVPolicy}``, e.g. :func:`kv_policies`.
        knobs: the values to try.

    A knob value a method's ``make_policy`` rejects with ``ValueError`` (a bit width it does not have) gives no row.
    Each row: ``method``, ``knob``, ``accuracy``, ``by_type``, ``caption_exact_match``, ``kv_bytes`` (mean over
    requests, at the end of each) and ``kv_bytes_ratio`` (to the plain cache).
    """
    def run(plugs):
        result = evaluate(model, n_per_type, n_captions=n_captions, plugs=plugs, question_after_image=True)
        return result, float(np.mean([tr.kv_bytes for tr in result.traces]))

    base, base_bytes = run(NONE)
    rows = [{"method": "baseline", "knob": None, "accuracy": base.accuracy, "by_type": base.by_type,
             "caption_exact_match": base.caption_exact_match, "kv_bytes": base_bytes, "kv_bytes_ratio": 1.0}]
    for name, make in makers.items():
        for knob in knobs:
            try:
                policy = make(knob)
            except ValueError:  # a setting the method does not have (CalibQuant is 1-bit only): no row
                continue
            if progress:
                progress(name, knob)
            result, nbytes = run(Plugs(kv_policy=policy))
            rows.append({"method": name, "knob": knob, "accuracy": result.accuracy, "by_type": result.by_type,
                         "caption_exact_match": result.caption_exact_match, "kv_bytes": nbytes,
                         "kv_bytes_ratio": nbytes / base_bytes})  # fmt: skip
    return rows
