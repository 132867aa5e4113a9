"""A word-level tokenizer for the shapes world.

The vocabulary is closed and fixed: special tokens, then every word the question templates, answers and
captions of :mod:`mllm_ref.tinyvlm.world` use. A prompt is ``<bos> words``; the model then writes the answer
words and ``<eos>``. Every question ends with the word that names the object it is about, so the model can look
that object up from the last prompt position.
"""

from __future__ import annotations

from mllm_ref.tinyvlm import world

SPECIALS = ("<pad>", "<bos>", "<eos>")
WORDS = (
    "what color is the shape object how many objects are there left or right of above below smallest size "
    "describe image and"
).split()
VOCAB: tuple[str, ...] = tuple(
    dict.fromkeys(
        SPECIALS + tuple(WORDS) + tuple(world.COLORS) + world.SHAPES + tuple(world.SIZES) + world.NUMBERS
    )
)
INDEX = {w: i for i, w in enumerate(VOCAB)}
PAD, BOS, EOS = (INDEX[s] for s in SPECIALS)
CAPTION_PROMPT = "describe the image"


def encode(text: str) -> list[int]:
    """Token ids of the space-separated words of ``text``; an unknown word is a ``ValueError``."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    ids = []
    for word in text.split():
        if word not in INDEX:
            raise ValueError(f"text has a word outside the vocabulary: {word!r}")
        ids.append(INDEX[word])
    return ids


def prompt_ids(question: str) -> list[int]:
    """``<bos> question``, the ids the model is prompted with."""
    return [BOS] + encode(question)


def decode(ids) -> str:
    """Words of ``ids``, stopping at ``<eos>`` and skipping padding."""
    words = []
    for i in ids:
        i = int(i)
        if not 0 <= i < len(VOCAB):
            raise ValueError(f"token id {i} is outside the vocabulary of {len(VOCAB)}")
        if i == EOS:
            break
        if i != PAD:
            words.append(VOCAB[i])
    return " ".join(words)
