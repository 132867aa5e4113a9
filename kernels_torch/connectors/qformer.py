"""torch fast path of :mod:`mllm_ref.connectors.qformer` (same function and signature, NumPy in and out).

Plain torch ops, not transformers: ``F.linear``, ``F.layer_norm``, exact ``F.gelu``, and attention as one batched
matmul over heads with a boolean ``[L, L]`` mask (the stage-1 mask of :func:`mllm_ref.connectors.qformer.stage1_mask`)
or the image key mask filled with ``-inf`` before the softmax; every row has an allowed key (the validation
guarantees it), so no row is all ``-inf``. Runs in the input dtype (float32 or float64) on the CPU.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from kernels_torch.nn._convert import as_tensor
from mllm_ref.connectors.qformer import _QUERY_FFN, _TEXT_FFN, _validate, stage1_mask

__all__ = ["qformer"]


def _mha(x, kv, w, prefix, nh, allowed):
    """Multi-head attention of the rows of ``x [Tq, H]`` over ``kv [Tk, *]``; ``allowed``: bool ``[Tq, Tk]`` or None."""
    q = F.linear(x, w[prefix + "query.weight"], w[prefix + "query.bias"])
    k = F.linear(kv, w[prefix + "key.weight"], w[prefix + "key.bias"])
    v = F.linear(kv, w[prefix + "value.weight"], w[prefix + "value.bias"])
    tq, h = q.shape
    d = h // nh
    q = q.view(tq, nh, d).transpose(0, 1)
    k = k.view(-1, nh, d).transpose(0, 1)
    v = v.view(-1, nh, d).transpose(0, 1)
    scores = (q @ k.transpose(-1, -2)) * (d**-0.5)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v).transpose(0, 1).reshape(tq, h)


def qformer(
    query_embeds, image_embeds, weights, *, num_heads, cross_attention_frequency=2, eps=1e-12, image_mask=None,
    text_embeds=None, attention_kind="itm",
):  # fmt: skip
    """BLIP-2 Q-Former forward (see :func:`mllm_ref.connectors.qformer.qformer` for the contract)."""
    c = _validate(
        query_embeds, image_embeds, weights, num_heads, cross_attention_frequency, eps, image_mask, text_embeds,
        attention_kind,
    )  # fmt: skip
    w = {k: as_tensor(v) for k, v in c.weights.items()}
    nh, eps, q_len = c.num_heads, c.eps, c.query.shape[0]
    h = c.query.shape[1]

    def ln(x, prefix):
        return F.layer_norm(x, (h,), w[prefix + ".weight"], w[prefix + ".bias"], eps)

    def ffn(x, p, up, down):
        y = F.gelu(F.linear(x, w[f"{p}{up}.dense.weight"], w[f"{p}{up}.dense.bias"]))
        y = F.linear(y, w[f"{p}{down}.dense.weight"], w[f"{p}{down}.dense.bias"])
        return ln(y + x, f"{p}{down}.LayerNorm")

    with torch.no_grad():
        x = as_tensor(c.query)
        if c.text is not None:
            x = torch.cat([x, as_tensor(c.text)], dim=0)
        n_text = x.shape[0] - q_len
        self_allowed = None
        if n_text and c.kind != "itm":
            self_allowed = torch.from_numpy(stage1_mask(q_len, n_text, c.kind))
        img = as_tensor(c.image)
        img_allowed = None if c.image_mask is None else torch.from_numpy(np.array(c.image_mask, dtype=bool))[None]
        x = ln(x, "layernorm")
        for i in range(c.n_layers):
            p = f"encoder.layer.{i}."
            a = _mha(x, x, w, p + "attention.attention.", nh, self_allowed)
            a = ln(F.linear(a, w[p + "attention.output.dense.weight"], w[p + "attention.output.dense.bias"]) + x,
                   p + "attention.output.LayerNorm")  # fmt: skip
            q = a[:q_len]
            if i % c.freq == 0:
                cc = _mha(q, img, w, p + "crossattention.attention.", nh, img_allowed)
                dense = p + "crossattention.output.dense"
                cc = F.linear(cc, w[dense + ".weight"], w[dense + ".bias"])
                q = ln(cc + q, p + "crossattention.output.LayerNorm")
            yq = ffn(q, p, *_QUERY_FFN)
            x = yq if n_text == 0 else torch.cat([yq, ffn(a[q_len:], p, *_TEXT_FFN)], dim=0)
        return x.numpy().copy()
