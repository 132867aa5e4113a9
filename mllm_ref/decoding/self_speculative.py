"""Self-speculative decoding (LayerSkip): the model's first E layers draft, its remaining layers verify.

Papers: M. Elhoushi et al., LayerSkip: Enabling Early Exit Inference and Self-Speculative Decoding, ACL 2024
(arXiv 2404.16710); J. Zhang et al., Draft & Verify: Lossless Large Language Model Acceleration via Self-Speculative
Decoding, ACL 2024 (arXiv 2309.08168). Survey: speculative decoding / early exit.

There is no second model. A draft token is read off after layer ``E`` through an early-exit head (an RMSNorm and a
vocabulary projection, :func:`early_exit_logits`, the reference)::

    draft:   for j = 1..k:  h = layers[0:E](x_{j-1});  x_j = argmax head_E(h)
    verify:  layers[E:L] over [last, x_1, ..., x_k] in one call, starting from the layer-E hidden states the
             draft already computed; greedy verification (:func:`mllm_ref.decoding.speculative_greedy.greedy_verify`)

The keys and values the draft wrote into the first ``E`` layers' caches are exactly those the full model would
write (same inputs, same layers), so verification reuses them and only runs the last ``L - E`` layers: LayerSkip's
cache reuse. After a rejection every layer's cache is cut back to the accepted prefix.

LayerSkip trains the model itself (layer dropout and an early-exit loss) so that one shared LM head reads every
layer. The tiny VLM stays as shipped here; instead each intermediate layer has its own small exit head trained by
distillation with the model frozen (:mod:`kernels_torch.tinyvlm.train_decoding` ``--kind exits``, which
:mod:`mllm_ref.dynamic` also reads).

Shapes: D width, V vocabulary, T positions.

Deviations from the paper: trained per-layer exit heads on a frozen model instead of LayerSkip's training recipe
and shared head; greedy verification only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mllm_ref import _checks
from mllm_ref.decoding._model import embed, finish, run_layers, stack_from_state
from mllm_ref.decoding.speculative_greedy import greedy_verify
from mllm_ref.nn.rmsnorm import rmsnorm
from mllm_ref.oracle.registry import Technique, register
from mllm_ref.tinyvlm import model as vlm
from mllm_ref.tinyvlm import tokenizer
from mllm_ref.tinyvlm.plugs import DecodingStrategy


def early_exit_logits(hidden: np.ndarray, norm_weight: np.ndarray, head_weight: np.ndarray, *, eps: float = 1e-6) -> np.ndarray:
    """An exit head: ``head_weight @ rmsnorm(hidden, norm_weight)``.

    Args:
        hidden: ``float[D]`` or ``float[T, D]``: a decoder layer's output.
        norm_weight: ``float[D]``.
        head_weight: ``float[V, D]``.
    Returns:
        ``float[V]`` or ``float[T, V]``.
    """
    h = _checks.float_array(hidden, "hidden", ndim=(1, 2))
    g = _checks.float_array(norm_weight, "norm_weight", ndim=1)
    w = _checks.float_array(head_weight, "head_weight", ndim=2)
    _checks.same_dtype("hidden", h, "norm_weight", g)
    _checks.same_dtype("hidden", h, "head_weight", w)
    _checks.dim("norm_weight", g, 0, h.shape[-1], "the width of hidden")
    _checks.dim("head_weight", w, 1, h.shape[-1], "the width of hidden")
    eps = _checks.real(eps, "eps", low=0.0, low_open=True)
    return rmsnorm(h, g, eps=eps) @ w.T


@dataclass(frozen=True)
class ExitHeads:
    """Trained exit heads: ``norm[l] float32[D]`` and ``head[l] float32[V, D]`` read the output of layer ``l``
    (0-based) for ``l < L - 1``; a single head (``shared``) reads every layer."""

    norm: tuple[np.ndarray, ...]
    head: tuple[np.ndarray, ...]
    eps: float = 1e-6
    manifest: dict = field(default_factory=dict)
    #: CALM's early-exit classifier per layer: ``(weight float32[D], bias float)``, or empty
    classifier: tuple[tuple[np.ndarray, float], ...] = ()

    @property
    def shared(self) -> bool:
        """One head for every layer (LayerSkip's shared exit)."""
        return len(self.norm) == 1

    def logits(self, layer: int, hidden: np.ndarray) -> np.ndarray:
        layer = _checks.integer(layer, "layer", low=0, high=None if self.shared else len(self.norm) - 1)
        i = 0 if self.shared else layer
        return early_exit_logits(hidden, self.norm[i], self.head[i], eps=self.eps)

    def confidence(self, layer: int, hidden: np.ndarray) -> float:
        """CALM's learned confidence logit (``> 0``: the exit head likely agrees with the full model)."""
        if not self.classifier:
            raise ValueError("these exit heads have no trained classifier")
        layer = _checks.integer(layer, "layer", low=0, high=len(self.classifier) - 1)
        w, b = self.classifier[layer]
        return float(np.asarray(hidden, dtype=np.float64) @ w + b)


def load_exit_heads(path: str | Path | None = None, kind: str = "exits") -> ExitHeads:
    """The bundled exit heads (``weights/decoding/exits``, or LayerSkip's single shared head with
    ``kind="shared-exit"``), read without pickle and checked by sha256."""
    folder = vlm.WEIGHTS_DIR / "decoding" / kind if path is None else Path(path)
    manifest, npz = vlm.read_weights(folder, train=f"python -m kernels_torch.tinyvlm.train_decoding --kind {kind}")
    n = len([f for f in npz if f.endswith(".norm.weight")])
    norm = tuple(npz[f"exit.{i}.norm.weight"].astype(np.float32) for i in range(n))
    head = tuple(npz[f"exit.{i}.lm_head.weight"].astype(np.float32) for i in range(n))
    classifier = ()
    if "exit.0.confidence.weight" in npz:
        classifier = tuple((npz[f"exit.{i}.confidence.weight"][0].astype(np.float64),
                            float(npz[f"exit.{i}.confidence.bias"][0])) for i in range(n))  # fmt: skip
    return ExitHeads(norm, head, 1e-6, manifest, classifier)


@dataclass(frozen=True)
class SelfSpeculative(DecodingStrategy):
    """LayerSkip-style self-speculative greedy decoding of the tiny VLM: draft with the first ``exit_layers``
    layers and the exit head after them, verify with the rest (module docstring)."""

    heads: ExitHeads
    exit_layers: int = 4
    k: int = 4

    name = "self_speculative"

    def __post_init__(self):
        _checks.integer(self.exit_layers, "exit_layers", low=1, high=None if self.heads.shared else len(self.heads.norm))
        _checks.integer(self.k, "k", low=1)


    def run(self, model, state, logits, *, prompt_ids, max_new_tokens, plugs, rng, trace) -> list[int]:
        e, layers = self.exit_layers, model.config.layers
        shallow, deep = range(0, e), range(e, layers)
        stack = stack_from_state(state, plugs)
        pos = int(state.next_position)
        last = int(np.argmax(logits))
        if last == tokenizer.EOS:
            return []
        out = [last]
        while len(out) < max_new_tokens:
            kk = min(self.k, max_new_tokens - len(out))
            t0 = time.perf_counter()
            s0 = stack.length()
            token, hs, drafted = last, [], []
            for j in range(kk + 1):  # k draft steps, then the last draft token's shallow pass for the verifier
                h, stack = run_layers(model, stack, embed(model, [token]), np.array([pos + j]), shallow, plugs=plugs)
                hs.append(h[0])
                if j == kk or (drafted and drafted[-1] == tokenizer.EOS):
                    break
                token = int(np.argmax(self.heads.logits(e - 1, h[0])))
                drafted.append(token)
            t1 = time.perf_counter()
            x = np.stack(hs)
            h, stack = run_layers(model, stack, x, pos + np.arange(len(hs)), deep, plugs=plugs)
            emitted = greedy_verify(vlm.logits_from_hidden(model, h, plugs), np.asarray(drafted, dtype=np.int64))
            n = len(emitted) - 1
            trace.target_calls += 1
            trace.drafted += len(drafted)
            trace.accepted += n
            stack = stack.truncate(s0 + n + 1)
            trace.timeline += [("draft", t0, t1, len(drafted)), ("verify", t1, time.perf_counter(), n + 1)]
            pos += n + 1
            last = int(emitted[-1])
            out.extend(int(t) for t in emitted)
            if tokenizer.EOS in emitted:
                break
        return finish(out, max_new_tokens, trace, layers, stack)


# ----------------------------------------------------------------------------------------------- registration
_SIZES = {"tiny": (1, 4, 5), "small": (6, 128, 42), "large": (8, 2048, 16000)}


def _case(size: str, rng: np.random.Generator) -> dict:
    t, d, v = _SIZES[size]
    hidden = rng.standard_normal((t, d)) if t > 1 else rng.standard_normal(d)
    return {
        "hidden": hidden.astype(np.float32),
        "norm_weight": (1 + 0.1 * rng.standard_normal(d)).astype(np.float32),
        "head_weight": (rng.standard_normal((v, d)) / np.sqrt(d)).astype(np.float32),
    }


def _rows(model):
    heads = load_exit_heads()
    return [(f"draft with layers 1-{e} + exit head, k={k}", SelfSpeculative(heads, e, k).plugs())
            for e, k in ((4, 4), (6, 4))]  # fmt: skip


register(
    Technique(
        id="decoding.self_speculative",
        reference=early_exit_logits,
        make_case=_case,
        paper=(
            "M. Elhoushi et al., LayerSkip: Enabling Early Exit Inference and Self-Speculative Decoding, ACL 2024 "
            "(arXiv 2404.16710)"
        ),
        test_sizes=("tiny", "small"),
        bench_sizes=("large",),
        chapter="book/05-speculative-decoding.md",
        model_level=True,
        notes="trained per-layer exit heads on the frozen model (not LayerSkip's training recipe); draft KV reused",
        extra={"rows": _rows},
    )
)
