"""The tiny vision-language model: the embedded default on which every technique is demonstrated and measured.

- :mod:`~mllm_ref.tinyvlm.world`: the synthetic shapes world (scenes, questions, captions);
- :mod:`~mllm_ref.tinyvlm.tokenizer`: the word-level tokenizer;
- :mod:`~mllm_ref.tinyvlm.config`: the model's sizes;
"""
