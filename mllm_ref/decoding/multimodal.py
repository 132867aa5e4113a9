"""Multimodal speculative decoding: a small drafter that sees the image through the target's visual tokens, or not.

Papers: MSD: L. Lin et al., Speculative Decoding Reimagined for Multimodal Large Language Models, 2025
(arXiv 2505.14260); M. Gagrani, R. Goel, W. Jeon, J. Park, M. Lee, C. Lott, On Speculative Decoding for Multimodal
Large Language Models, CVPR Workshops 2024 (arXiv 2404.08856). Survey: speculative decoding for MLLMs.

Gagrani et al. draft LLaVA-7B with a 115M-parameter language-only model and find that it drafts nearly as well
without the image as with it (2.37x). MSD processes the visual and text tokens of the drafter differently and
reports 2.29x on LLaVA-1.5-7B. Both ask one question: how much of the image does the drafter need? Here the
drafter is a 2-layer decoder of the tiny VLM's width (:mod:`kernels_torch.tinyvlm.train_decoding`, about 1/6 of
the target's decoder), and it runs in two modes:

- ``use_visual=True``: its own small prefill over the target's projected visual tokens (the connector's output,
  which the target computed anyway) followed by the prompt, positions as the target's (visual tokens at 0, text
  from 1);
- ``use_visual=False``: the prompt alone (a text-only drafter).

The draft is then verified by the target (:mod:`mllm_ref.decoding.speculative`,
:mod:`mllm_ref.decoding.speculative_greedy`), so the output never depends on the drafter, only the speed does.

:func:`drafter_inputs` is the reference: the drafter's input sequence and position ids in each mode.

Shapes: N visual tokens, P prompt tokens, D width.

Deviations from the papers: one drafter serves both modes (trained on each batch with and without the image);
MSD's drafter is trained in stages and treats visual and text tokens in separate ways, ours reads both the same
way. The drafter shares no weights with the target (its embedding and LM head are initialised from the target's).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mllm_ref import _checks
from mllm_ref.decoding._model import Stack, embed, empty_stack, feed, run_layers
from mllm_ref.oracle.registry import Technique, register
from mllm_ref.tinyvlm import model as vlm
from mllm_ref.tinyvlm.config import TinyVLMConfig
from mllm_ref.tinyvlm.plugs import PromptInfo

DECODING_WEIGHTS = vlm.WEIGHTS_DIR / "decoding"


def drafter_inputs(visual: np.ndarray, text: np.ndarray, *, use_visual: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The drafter's prefill input and position ids.

    Args:
        visual: ``float[N, D]`` the target's visual tokens (after its connector).
        text: ``float[P, D]`` the drafter's embeddings of the prompt.
        use_visual: put the visual tokens first (MSD) or leave them out (a text-only drafter).
    Returns:
        ``(x float[N + P, D] or [P, D], positions int64[...])``: visual tokens at position 0, text from 1.
    """
    visual = _checks.float_array(visual, "visual", ndim=2)
    text = _checks.float_array(text, "text", ndim=2)
    _checks.same_dtype("visual", visual, "text", text)
    _checks.dim("text", text, 1, visual.shape[1], "the width of the visual tokens")
    if not isinstance(use_visual, bool):
        raise TypeError(f"use_visual must be a bool, got {type(use_visual).__name__}")
    if not use_visual:
        return text.copy(), np.arange(1, text.shape[0] + 1, dtype=np.int64)
    return np.concatenate([visual, text], axis=0), vlm.positions_for(visual.shape[0], text.shape[0])


def load_drafter_model(path: str | Path | None = None) -> vlm.TinyVLM:
    """The trained draft decoder (``weights/decoding/draft``) as a decoder-only :class:`TinyVLM` value."""
    folder = DECODING_WEIGHTS / "draft" if path is None else Path(path)
    manifest, arrays = vlm.read_weights(folder, train="python -m kernels_torch.tinyvlm.train_decoding --kind draft")
    params = {k: a.astype(np.float32) for k, a in arrays.items()}
    return vlm.TinyVLM(TinyVLMConfig.from_dict(manifest["config"]), params, manifest)


@dataclass(frozen=True)
class Drafter:
    """A draft decoder for speculative decoding of the tiny VLM.

    ``model``: the drafter's weights (a decoder-only :class:`TinyVLM` value, :func:`load_drafter_model`);
    ``use_visual``: prefill the target's visual tokens before the prompt (module docstring).
    """

    model: vlm.TinyVLM
    use_visual: bool = True

    def prefill(self, info: PromptInfo, prompt_ids: np.ndarray) -> Stack:
        """The drafter's cache after its prefill of the visual tokens (or none) and the whole prompt."""
        if info.inputs is None:
            raise ValueError("the prefill's PromptInfo must carry the decoder inputs (the visual tokens)")
        ids = np.asarray(prompt_ids, dtype=np.int64)
        x, positions = drafter_inputs(info.inputs[: info.n_visual], embed(self.model, ids), use_visual=self.use_visual)
        _, stack = run_layers(self.model, empty_stack(self.model), x, positions)
        return stack

    def feed(self, stack: Stack, tokens, start: int) -> tuple[np.ndarray, Stack]:
        """Logits ``[T, V]`` after feeding ``tokens`` at positions ``start, ...``, and the new cache."""
        return feed(self.model, stack, tokens, start)

    @property
    def parameters(self) -> int:
        return int(sum(a.size for a in self.model.params.values()))


def load_drafter(use_visual: bool = True, path: str | Path | None = None) -> Drafter:
    """The bundled trained drafter in the given mode."""
    return Drafter(load_drafter_model(path), use_visual)


# ----------------------------------------------------------------------------------------------- registration
_SIZES = {"tiny": (3, 2, 4), "tinyvlm": (144, 4, 128), "llava": (576, 40, 4096)}


def _case(size: str, rng: np.random.Generator) -> dict:
    n, p, d = _SIZES[size]
    return {
        "visual": rng.standard_normal((n, d)).astype(np.float32),
        "text": rng.standard_normal((p, d)).astype(np.float32),
        "use_visual": bool(size != "tiny"),
    }


def _rows(model):
    from mllm_ref.decoding.speculative import SpeculativeDecoding

    rows = []
    for use_visual in (True, False):
        drafter = load_drafter(use_visual)
        what = "with the image (own prefill of the visual tokens)" if use_visual else "text only"
        rows.append((f"greedy, 2-layer drafter {what}, k=4", SpeculativeDecoding(drafter, k=4).plugs()))
    return rows


register(
    Technique(
        id="decoding.multimodal",
        reference=drafter_inputs,
        make_case=_case,
        paper=(
            "M. Gagrani, R. Goel, W. Jeon, J. Park, M. Lee, C. Lott, On Speculative Decoding for Multimodal Large "
            "Language Models, CVPR Workshops 2024 (arXiv 2404.08856); L. Lin et al., Speculative Decoding Reimagined "
            "for Multimodal Large Language Models (MSD), 2025 (arXiv 2505.14260)"
        ),
        test_sizes=("tiny", "tinyvlm"),
        compare="exact",
        chapter="book/05-speculative-decoding.md",
        model_level=True,
        notes="one 2-layer drafter (trained with and without the image) drafts with or without the target's visual tokens",
        extra={"rows": _rows},
    )
)
