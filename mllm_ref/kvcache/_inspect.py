"""Looking inside the tiny VLM's KV cache, for the chapter and the tests (not a technique).

- :func:`prefill_kv`: the keys and values each decoder layer writes in a prefill (the plain cache);
- :func:`kept_patch_share`: after a prefill under an eviction policy, for each image patch the share of key/value
  heads of one layer that still hold it (what :meth:`~mllm_ref.tinyvlm.plugs.KVPolicy.kept_tokens` reports).
"""

from __future__ import annotations

import numpy as np

from mllm_ref import _checks
from mllm_ref.tinyvlm.model import TinyVLM, prefill
from mllm_ref.tinyvlm.plugs import KVPolicy, Plugs

__all__ = ["prefill_kv", "kept_patch_share"]


class _Recorder(KVPolicy):
    """The plain cache, also handing back what each layer stored."""

    def __init__(self):
        self.seen: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def store(self, layer, k, v, attn, info, *, positions, n_visual):
        self.seen[layer] = (k, v)
        return super().store(layer, k, v, attn, info, positions=positions, n_visual=n_visual)


def prefill_kv(model: TinyVLM, image: np.ndarray, prompt_ids) -> list[tuple[np.ndarray, np.ndarray]]:
    """``[(k, v)]`` per decoder layer, each ``float32[Hkv, T, d]`` (keys rotated), for a plain prefill."""
    rec = _Recorder()
    prefill(model, image, prompt_ids, Plugs(kv_policy=rec))
    return [rec.seen[i] for i in range(model.config.layers)]


def kept_patch_share(model: TinyVLM, image: np.ndarray, prompt_ids, policy: KVPolicy, layer: int) -> np.ndarray:
    """``float64[grid, grid]``: for each patch, the fraction of the key/value heads of ``layer`` whose cache still
    holds its visual token after a prefill of ``prompt_ids`` under ``policy``."""
    if not isinstance(policy, KVPolicy):
        raise TypeError(f"policy must be a KVPolicy, got {type(policy).__name__}")
    cfg = model.config
    layer = _checks.integer(layer, "layer", low=0, high=cfg.layers - 1)
    _, state = prefill(model, image, prompt_ids, Plugs(kv_policy=policy))
    kept = policy.kept_tokens(layer, state.caches[layer])
    share = np.zeros(cfg.n_patches)
    for head in kept:
        share[head[head < cfg.n_patches]] += 1.0 / kept.shape[0]
    return share.reshape(cfg.grid, cfg.grid)
