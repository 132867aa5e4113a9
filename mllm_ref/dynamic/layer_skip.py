"""Layer skipping: static skipping at fixed intervals, and LayerSkip's early exit through one shared head.

Papers: M. Shukor, M. Cord, Skipping Computations in Multimodal LLMs, 2024 (arXiv 2410.09454);
M. Elhoushi et al., LayerSkip: Enabling Early Exit Inference and Self-Speculative Decoding, ACL 2024
(arXiv 2404.16710). Survey: dynamic depth / layer skipping.

**Static skipping** (Shukor & Cord): multimodal LLMs are redundant in depth, so whole blocks can be skipped for
the generated tokens at fixed intervals, with no training: from layer ``start`` on, every ``interval``-th layer is
passed over (:func:`skipped_layers`, the reference). A skipped layer leaves the token's hidden state unchanged; its
key and value for later tokens are computed from that hidden state (CALM's propagation, as for early exit).

**LayerSkip's shared exit head**: one RMSNorm and LM head read any layer, so a token can stop after layer ``E`` and
be decoded there (and the same head drafts for self-speculation, :mod:`mllm_ref.decoding.self_speculative`).
LayerSkip trains the model with layer dropout and an early-exit loss so that this works; here the model is frozen
and only the shared head is trained with LayerSkip's loss weights (:mod:`kernels_torch.tinyvlm.train_decoding`
``--kind shared-exit``).

Shapes: L layers.

Deviations from the papers: Shukor & Cord also skip only the FFN or only attention, and in the prefill; here whole
blocks of decode tokens. LayerSkip's layer-dropout training of the model is left out (the head alone is trained).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mllm_ref import _checks
from mllm_ref.oracle.registry import Technique, register
from mllm_ref.tinyvlm.plugs import ExitPolicy


def skipped_layers(layers: int, *, interval: int = 2, start: int = 2) -> np.ndarray:
    """``bool[L]``: True for each layer a decode token passes over: layers ``start, start + interval, ...``
    (``interval = 1``: every layer from ``start`` on; the last layer is never skipped)."""
    layers = _checks.integer(layers, "layers", low=1)
    interval = _checks.integer(interval, "interval", low=1)
    start = _checks.integer(start, "start", low=0)
    out = np.zeros(layers, dtype=bool)
    out[start : layers - 1 : interval] = True
    return out


@dataclass
class StaticSkip(ExitPolicy):
    """Decode tokens pass over layers ``start, start + interval, ...`` (all but the last)."""

    layers: int = 12
    interval: int = 2
    start: int = 2

    name = "layer_skip"

    def __post_init__(self):
        self._skip = skipped_layers(self.layers, interval=self.interval, start=self.start)


    def skip(self, layer, hidden) -> bool:
        return bool(self._skip[layer])


@dataclass
class SharedHeadExit(ExitPolicy):
    """LayerSkip's early exit: every decode token stops after layer ``exit_layer`` (0-based) and is decoded by the
    shared exit head ``heads`` (:func:`mllm_ref.decoding.self_speculative.load_exit_heads` with
    ``kind="shared-exit"``)."""

    heads: object
    exit_layer: int = 8

    name = "layer_skip_exit"


    def should_exit(self, layer, hidden, logits_fn) -> bool:
        return layer == self.exit_layer

    def exit_logits(self, layer, hidden, logits_fn):
        return self.heads.logits(layer, hidden)


# ----------------------------------------------------------------------------------------------- registration
def _case(size: str, rng: np.random.Generator) -> dict:
    layers = {"tiny": 4, "tinyvlm": 12, "llama": 32}[size]
    return {"layers": layers, "interval": int(rng.integers(1, 4)), "start": int(rng.integers(0, layers))}


def _rows(model):
    from mllm_ref.decoding.self_speculative import load_exit_heads

    n = model.config.layers
    shared = load_exit_heads(kind="shared-exit")
    return [
        ("skip every 2nd layer from layer 4 (decode tokens)", StaticSkip(n, 2, 4).plugs()),
        ("skip every 4th layer from layer 3 (decode tokens)", StaticSkip(n, 4, 3).plugs()),
        ("LayerSkip shared head, exit after layer 9 of 12", SharedHeadExit(shared, 8).plugs()),
        ("LayerSkip shared head, exit after layer 11 of 12", SharedHeadExit(shared, 10).plugs()),
    ]


register(
    Technique(
        id="dynamic.layer_skip",
        reference=skipped_layers,
        make_case=_case,
        paper=(
            "M. Shukor, M. Cord, Skipping Computations in Multimodal LLMs, 2024 (arXiv 2410.09454); M. Elhoushi et al., "
            "LayerSkip: Enabling Early Exit Inference and Self-Speculative Decoding, ACL 2024 (arXiv 2404.16710)"
        ),
        test_sizes=("tiny", "tinyvlm", "llama"),
        compare="exact",
        chapter="book/06-early-exit.md",
        model_level=True,
        notes="whole blocks skipped at fixed intervals for decode tokens; LayerSkip exit through one trained shared head",
        extra={"rows": _rows, "question_after_image": True},
    )
)
