"""Exercise 04: one cross-attention block of the BLIP-2 Q-Former. Fill in the two functions marked TODO.

Use NumPy only (importing mllm_ref is refused by the grader). Grade your work with:

    mllm-ref grade 04-qformer-cross-attention student.py
"""

import numpy as np


def multi_head_attention(q, k, v, num_heads, key_mask=None):
    """float[Q, H]: multi-head scaled dot-product attention of q [Q, H] over k, v [N, H] (no projections).

    Heads of d = H / num_heads columns; key_mask: bool [N] or None, True = the key may be attended.
    """
    # TODO: split the width into heads, softmax(q_h k_h^T / sqrt(d)) over the allowed keys, times v_h, merge heads
    raise NotImplementedError("multi_head_attention")


def cross_attention_block(query_states, image_embeds, weights, num_heads, eps=1e-12, image_mask=None):
    """float[Q, H]: LN(q + dense(MHA(q Wq + bq, img Wk + bk, img Wv + bv))) with the Hugging Face names of weights.

    query_states: [Q, H]; image_embeds: [N, E]; weights: dict name -> array (Linear weights [out, in]);
    image_mask: bool [N] or None, True = the image token may be attended.
    """
    # TODO: project (x @ W.T + b), multi_head_attention, output.dense, add query_states, output.LayerNorm
    raise NotImplementedError("cross_attention_block")
