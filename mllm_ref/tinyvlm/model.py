"""The tiny VLM's forward pass in NumPy, written once as a plain loop over layers, with plug points.

Path of data (DESIGN.md section 1)::

    image uint8[H, W, 3] -> patchify -> patch embed + position -> ViT blocks -> LayerNorm   (encoder)
                         -> MLP connector -> visual tokens float32[N, D]                   (connector)
                         -> token_policy.after_connector
    [visual tokens, embed(prompt)] -> decoder layers (RMSNorm, GQA attention with RoPE and a KV cache,
                         SwiGLU) -> RMSNorm -> LM head -> logits                           (prefill)
    each new token -> decoder layers over the cache -> logits -> decoding plug             (decode)

Every linear layer goes through the ``linear`` plug with its parameter name, every decoder attention through the
``attention`` plug, every cache operation through the ``kv_policy``; ``token_policy`` may shorten the visual
sequence after the connector or after any prefill layer, and ``exit_policy`` may stop a decode step early.
With the default plugs (:data:`mllm_ref.tinyvlm.plugs.NONE`) this is the plain model, and it matches the torch
twin (:mod:`kernels_torch.tinyvlm.model`) to float32 rounding.

Position ids: every visual token has position id 0 and the text follows at 1, 2, ... (:func:`positions_for`). The
visual tokens' place in the image is in their content (the encoder's learned position embeddings), not in RoPE, so
the rotary phase between a text token and any visual token is the same and looking an object up by content does
not depend on where it lies; this is what the temporal section of Qwen2-VL's M-RoPE does for one image, where all
patches share one temporal id. Tokens dropped by a token policy leave the position ids of the others unchanged.

Shapes: N visual tokens, P prompt tokens, T = N + P, D decoder width, V vocabulary, H/Hkv query/key-value heads,
d head size.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from mllm_ref import _checks
from mllm_ref.nn.activations import gelu, silu
from mllm_ref.nn.attention import attention as nn_attention
from mllm_ref.nn.layernorm import layernorm
from mllm_ref.nn.linear import linear as nn_linear
from mllm_ref.nn.patch_embed import patchify
from mllm_ref.nn.rmsnorm import rmsnorm
from mllm_ref.nn.rope import rope
from mllm_ref.nn.softmax import softmax
from mllm_ref.tinyvlm import tokenizer
from mllm_ref.tinyvlm.config import TinyVLMConfig
from mllm_ref.tinyvlm.plugs import (
    NONE,
    DecoderUpdate,
    DecodingStrategy,
    EncoderView,
    KVPolicy,
    LayerView,
    Plugs,
    PromptInfo,
    TokenPolicy,
    VisualTokens,
    remap_source,
)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


@dataclass(frozen=True)
class TinyVLM:
    """Loaded weights: ``params`` maps the torch twin's parameter names to float32 arrays."""

    config: TinyVLMConfig
    params: dict[str, np.ndarray]
    manifest: dict = field(default_factory=dict)
    #: ``None``: the MLP connector (``proj1``, ``proj2``); else a connector variant's ``{"name", "kind", "args"}``,
    #: its parameters under ``conn.`` (see :mod:`mllm_ref.tinyvlm.variants`).
    connector: dict | None = None

    def __getitem__(self, name: str) -> np.ndarray:
        return self.params[name]


def read_weights(
    folder: str | Path, *, train: str, default_file: str = "weights.npz", verify: bool = True
) -> tuple[dict, dict[str, np.ndarray]]:
    """``(manifest, arrays)`` of a weights folder: ``manifest.json`` and the npz it names, read with
    ``allow_pickle=False``; with ``verify`` the file's sha256 must match the manifest. ``train``: the command that
    makes the folder, named when it is missing. The arrays keep their stored dtypes."""
    folder = Path(folder)
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"no manifest.json in {folder}; train it with {train}")
    manifest = json.loads(manifest_path.read_text())
    weights_path = folder / manifest.get("weights_file", default_file)
    data = weights_path.read_bytes()
    if verify and hashlib.sha256(data).hexdigest() != manifest.get("sha256"):
        raise ValueError(f"{weights_path} does not match the sha256 in {manifest_path}")
    with np.load(weights_path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    return manifest, arrays


def load(path: str | Path | None = None, *, verify: bool = True) -> TinyVLM:
    """Load the tiny VLM from a folder with ``tinyvlm.npz`` and ``manifest.json`` (default: the shipped one).

    The weights are read with ``allow_pickle=False``; with ``verify`` the file's sha256 must match the manifest.
    """
    folder = WEIGHTS_DIR if path is None else Path(path)
    manifest, arrays = read_weights(folder, train="python -m kernels_torch.tinyvlm.train", default_file="tinyvlm.npz",
                                    verify=verify)  # fmt: skip
    params = {k: a.astype(np.float32) for k, a in arrays.items()}
    cfg = TinyVLMConfig.from_dict(manifest["config"])
    model = TinyVLM(cfg, params, manifest)
    _check_params(model)
    return model


def _check_params(model: TinyVLM) -> None:
    cfg = model.config
    expected = {
        "patch.weight": (cfg.vis_dim, cfg.patch_size**2 * cfg.channels),
        "pos": (cfg.n_patches, cfg.vis_dim),
        "embed.weight": (cfg.vocab_size, cfg.dim),
        "lm_head.weight": (cfg.vocab_size, cfg.dim),
        f"dec.{cfg.layers - 1}.q.weight": (cfg.heads * cfg.head_dim, cfg.dim),
        f"vis.{cfg.vis_layers - 1}.fc1.weight": (cfg.vis_mlp, cfg.vis_dim),
    }
    for name, shape in expected.items():
        if name not in model.params:
            raise ValueError(f"weights lack parameter {name!r}")
        if model.params[name].shape != shape:
            raise ValueError(f"parameter {name} has shape {model.params[name].shape}, expected {shape}")


def _apply_update(update, x, n_visual, cfg, old_positions, protected):
    if not isinstance(update, DecoderUpdate):
        raise TypeError(f"TokenPolicy.in_decoder must return indices, a DecoderUpdate or None, got {type(update).__name__}")
    n_text = x.shape[0] - n_visual
    h = np.asarray(update.hidden)
    nv = int(update.n_visual)
    if h.ndim != 2 or h.shape[1] != x.shape[1] or h.shape[0] != nv + n_text or update.positions.shape != (h.shape[0],):
        raise ValueError(f"DecoderUpdate must hold {nv} visual tokens then the {n_text} text tokens of width {x.shape[1]}")
    if not np.array_equal(h[nv:], x[n_visual:]):
        raise ValueError("DecoderUpdate must not alter the text tokens")
    if update.source.shape != (cfg.n_patches,) or update.source.max() >= nv or update.source.min() < -1:
        raise ValueError(f"DecoderUpdate.source must map the {cfg.n_patches} patches to its {nv} visual tokens or -1")
    positions = np.asarray(update.positions, dtype=np.int64)
    if not np.array_equal(positions[nv:], old_positions[n_visual:]):
        raise ValueError("DecoderUpdate must not change the text tokens' positions")
    if protected is not None and np.any(protected):
        kept = 0 if update.protected is None else int(np.count_nonzero(update.protected))
        if update.protected is None or update.protected.shape != (nv,) or kept != np.count_nonzero(protected):
            raise ValueError("DecoderUpdate must carry every protected visual token on (protected: bool[n_visual])")
    return h.astype(np.float32), positions, nv, update.source, update.protected


@dataclass
class Trace:
    """What one request did, for cost accounting (filled in by :func:`prefill` and :func:`decode_step`).

    Attributes:
        n_patches: visual tokens out of the encoder.
        n_visual: visual tokens entering the decoder (after the connector's token policy).
        n_prompt: text tokens of the prompt.
        encoder_tokens: tokens each encoder block took in (a token policy may merge inside the encoder).
        encoder_mlp_tokens: tokens each encoder block's MLP processed (after a merge inside the block).
        connector_tokens: tokens the connector processed.
        layer_tokens: tokens each decoder layer processed in the prefill.
        source: ``int[G]`` after the prefill, for each patch the visual token carrying it (``-1``: dropped).
        decode_context: for each decode step, the cached tokens attended over (layer 0).
        decode_layers: for each decode step, the decoder layers run.
        kv_bytes: bytes held by all caches after the last step.
        prefill_seconds, decode_seconds: wall time.
        target_calls, drafted, accepted: for a speculative decoding strategy, the target model's forward calls in
            decoding, the tokens its drafter proposed and the proposals the target accepted.
        timeline: ``(kind, start, end, tokens)`` for each decode step (``"decode"``) or, for a speculative
            strategy, each drafting (``"draft"``, tokens drafted) and verification (``"verify"``, tokens emitted);
            times from ``time.perf_counter``.
    """

    n_patches: int = 0
    n_visual: int = 0
    n_prompt: int = 0
    encoder_tokens: list[int] = field(default_factory=list)
    encoder_mlp_tokens: list[int] = field(default_factory=list)
    connector_tokens: int = 0
    layer_tokens: list[int] = field(default_factory=list)
    source: np.ndarray | None = None
    decode_context: list[int] = field(default_factory=list)
    decode_layers: list[int] = field(default_factory=list)
    kv_bytes: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    target_calls: int = 0
    drafted: int = 0
    accepted: int = 0
    timeline: list[tuple[str, float, float, int]] = field(default_factory=list)


@dataclass(frozen=True)
class State:
    """The decoding state after a prefill or a decode step.

    Attributes:
        caches: one opaque cache value per decoder layer, as the KV policy returned it.
        next_position: position id of the next token.
        info: what policies may know of the request.
        hidden: ``float32[D]``, the last layer's output at the last token fed (before the final norm; Medusa's
            heads read it).
    """

    caches: tuple[Any, ...]
    next_position: int
    info: PromptInfo
    hidden: np.ndarray | None = None


def positions_for(n_visual: int, n_text: int) -> np.ndarray:
    """Position ids ``int64[n_visual + n_text]``: 0 for every visual token, then 1, 2, ... for the text."""
    return np.concatenate([np.zeros(n_visual, dtype=np.int64), np.arange(1, n_text + 1, dtype=np.int64)])


def _lin(plugs: Plugs, model: TinyVLM, x: np.ndarray, name: str) -> np.ndarray:
    w = model.params[name + ".weight"]
    b = model.params.get(name + ".bias")
    if plugs.linear is None:
        return nn_linear(x, w, b)
    return plugs.linear(x, w, b, name)


def _as_image(image) -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image must be a NumPy array, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must have shape [H, W, 3], got {image.shape}")
    if image.dtype == np.uint8:
        return image.astype(np.float32) / np.float32(255.0)
    image = _checks.float_array(image, "image", ndim=3)
    if image.min() < 0 or image.max() > 1:
        raise ValueError("image must be uint8, or float with values in [0, 1]")
    return image.astype(np.float32)


def encode_image(model: TinyVLM, image: np.ndarray, plugs: Plugs = NONE) -> np.ndarray:
    """Vision encoder and connector: ``image`` ``uint8[H, W, 3]`` -> visual tokens ``float32[N, D]``.

    The token policy's encoder hook runs (so ``N`` may be below the patch count); use :func:`encode_tokens` for
    the sizes and patch map as well.
    """
    return encode_tokens(model, image, plugs)[0].x


def _proportional_attention(q, k, v, size):
    """Bidirectional attention with ToMe's proportional attention: ``softmax(q k^T / sqrt(d) + log size) v``.

    ``q, k, v``: ``[H, N, d]``; ``size``: ``[N]`` patches per token. A token that stands for ``s`` patches gets
    the weight ``s`` identical keys would get (Bolya et al. 2023, section 3). With all sizes 1 this is plain
    attention, and the plain kernel is used.
    """
    if np.all(size == 1):
        return nn_attention(q[None], k[None], v[None])[0], None
    scale = np.float32(1.0 / np.sqrt(q.shape[-1]))
    scores = (q @ k.transpose(0, 2, 1)) * scale + np.log(size.astype(np.float32))[None, None, :]
    w = softmax(scores, axis=-1)
    return (w @ v).astype(np.float32), w


def encode_tokens(
    model: TinyVLM, image: np.ndarray, plugs: Plugs = NONE, prompt_ids=None, *, want_attention: bool = False
) -> tuple[VisualTokens, EncoderView, list[int]]:
    """Encoder and connector with the token policy's encoder hook.

    Returns:
        ``(tokens, view, encoder_tokens)``: the connector's outputs (``x`` is ``float32[N, D]``) with sizes and
        patch map; the last encoder block's keys (and attention weights with ``want_attention``) and the encoder
        features; for each encoder block, the tokens its attention and its MLP processed.
    """
    cfg = model.config
    img = _as_image(image)
    if img.shape[:2] != (cfg.image_size, cfg.image_size):
        raise ValueError(f"image must be {cfg.image_size}x{cfg.image_size}, got {img.shape[:2]}")
    ids = np.zeros(0, dtype=np.int64) if prompt_ids is None else np.asarray(prompt_ids)
    x = _lin(plugs, model, patchify(img - np.float32(0.5), cfg.patch_size), "patch") + model["pos"]
    tokens = VisualTokens.from_patches(x, (cfg.grid, cfg.grid))
    hd = cfg.vis_head_dim
    policy = plugs.token_policy
    counts = []
    k = weights = None
    for i in range(cfg.vis_layers):
        p = f"vis.{i}."
        x = tokens.x
        h = layernorm(x, model[p + "ln1.weight"], model[p + "ln1.bias"], eps=cfg.ln_eps)
        q, k, v = (_lin(plugs, model, h, p + n).reshape(-1, cfg.vis_heads, hd).transpose(1, 0, 2) for n in "qkv")
        last = i == cfg.vis_layers - 1
        if last and want_attention and np.all(tokens.size == 1):
            a, weights = nn_attention(q[None], k[None], v[None], return_weights=True)
            a, weights = a[0], weights[0]
        else:
            a, weights = _proportional_attention(q, k, v, tokens.size)
        x = x + _lin(plugs, model, a.transpose(1, 0, 2).reshape(-1, cfg.vis_dim), p + "o")
        tokens = policy.in_encoder(i, replace(tokens, x=x), k, ids)
        _check_tokens(tokens, "in_encoder", (cfg.grid, cfg.grid))
        counts.append((x.shape[0], tokens.n))
        if tokens.n != x.shape[0] and last and want_attention:
            raise ValueError("a token policy cannot both merge in the last encoder block and ask for its attention")
        if tokens.n != x.shape[0]:
            k = weights = None  # computed on the tokens before the merge: no longer this block's view
        x = tokens.x
        h = layernorm(x, model[p + "ln2.weight"], model[p + "ln2.bias"], eps=cfg.ln_eps)
        x = x + _lin(plugs, model, gelu(_lin(plugs, model, h, p + "fc1")), p + "fc2")
        tokens = replace(tokens, x=x)
    feats = layernorm(tokens.x, model["vis_norm.weight"], model["vis_norm.bias"], eps=cfg.ln_eps)
    view = EncoderView(keys=k, attn=weights, features=feats)
    tokens = policy.after_encoder(replace(tokens, x=feats), ids, view)
    _check_tokens(tokens, "after_encoder", (cfg.grid, cfg.grid))
    if tokens.x.shape[1] != cfg.vis_dim:
        raise ValueError(f"TokenPolicy.after_encoder must return {cfg.vis_dim}-wide features, got {tokens.x.shape}")
    if model.connector is not None:
        from mllm_ref.tinyvlm.variants import connect

        out, size, source = connect(model, tokens.x)
        return VisualTokens(out, size, source, tokens.grid, None), view, counts
    out = _lin(plugs, model, gelu(_lin(plugs, model, tokens.x, "proj1")), "proj2")
    return replace(tokens, x=out), view, counts


def _check_tokens(tokens, hook: str, grid) -> None:
    if not isinstance(tokens, VisualTokens):
        raise TypeError(f"TokenPolicy.{hook} must return VisualTokens, got {type(tokens).__name__}")
    n = tokens.x.shape[0]
    if n == 0:
        raise ValueError(f"TokenPolicy.{hook} must keep at least one visual token")
    if tokens.size.shape != (n,) or tokens.source.shape != (grid[0] * grid[1],):
        raise ValueError(f"TokenPolicy.{hook} returned sizes {tokens.size.shape} / source {tokens.source.shape} "
                         f"for {n} tokens on a {grid} grid")  # fmt: skip
    if tokens.source.size and (tokens.source.min() < -1 or tokens.source.max() >= n):
        raise ValueError(f"TokenPolicy.{hook} returned a patch map pointing outside its {n} tokens")
    if tokens.protected is not None and (tokens.protected.dtype != np.bool_ or tokens.protected.shape != (n,)):
        raise ValueError(f"TokenPolicy.{hook} returned protected flags that are not bool[{n}]")


def _attend(plugs: Plugs, q, k, v, *, causal: bool, want_weights: bool):
    fn = nn_attention if plugs.attention is None else plugs.attention
    return fn(q[None], k[None], v[None], causal=causal, return_weights=want_weights)


def _decoder_layer(model, plugs, i, x, positions, caches_in, *, causal, want_weights):
    """One decoder layer over ``x[T, D]``; returns the new hidden state, the layer's new k/v and weights.

    ``caches_in``: ``(k_past, v_past)`` ``[Hkv, S, d]`` to prepend, ``None`` in the prefill, or a callable
    ``attend(q, k, v, want_weights)`` giving ``(out[H, T, dv], weights or None)`` over the past and the new tokens
    (a KV policy's fused attention, :meth:`~mllm_ref.tinyvlm.plugs.KVPolicy.attend`).
    """
    cfg = model.config
    p = f"dec.{i}."
    hd = cfg.head_dim
    h = rmsnorm(x, model[p + "norm1.weight"], eps=cfg.rms_eps)
    q = _lin(plugs, model, h, p + "q").reshape(-1, cfg.heads, hd).transpose(1, 0, 2)
    k = _lin(plugs, model, h, p + "k").reshape(-1, cfg.kv_heads, hd).transpose(1, 0, 2)
    v = _lin(plugs, model, h, p + "v").reshape(-1, cfg.kv_heads, hd).transpose(1, 0, 2)
    q = rope(q, positions, theta=cfg.rope_theta)
    k = rope(k, positions, theta=cfg.rope_theta)
    if callable(caches_in):
        a, weights = caches_in(q, k, v, want_weights)
    else:
        if caches_in is None:
            k_all, v_all = k, v
        else:
            k_all = np.concatenate([caches_in[0], k], axis=1)
            v_all = np.concatenate([caches_in[1], v], axis=1)
        out = _attend(plugs, q, k_all, v_all, causal=causal, want_weights=want_weights)
        a, weights = (out[0][0], out[1][0]) if want_weights else (out[0], None)
    attn_out = _lin(plugs, model, a.transpose(1, 0, 2).reshape(-1, cfg.heads * hd), p + "o")
    # a parallel block (the exit policy's choice) feeds its FFN the layer's input, not the attention's output
    x_ffn = x if plugs.exit_policy.parallel(i) else x + attn_out
    h = rmsnorm(x_ffn, model[p + "norm2.weight"], eps=cfg.rms_eps)
    ffn = _lin(plugs, model, silu(_lin(plugs, model, h, p + "gate")) * _lin(plugs, model, h, p + "up"), p + "down")
    return x + attn_out + ffn, k, v, weights


def logits_from_hidden(model: TinyVLM, hidden: np.ndarray, plugs: Plugs = NONE) -> np.ndarray:
    """Final RMSNorm and LM head: ``hidden[..., D]`` -> ``logits[..., V]``."""
    h = rmsnorm(hidden, model["norm.weight"], eps=model.config.rms_eps)
    return _lin(plugs, model, h, "lm_head")


def _prompt_array(prompt_ids) -> np.ndarray:
    ids = _checks.int_array(prompt_ids, "prompt_ids", ndim=1, low=0, high=len(tokenizer.VOCAB) - 1)
    if ids.size == 0:
        raise ValueError("prompt_ids must not be empty")
    return ids.astype(np.int64)


def prefill(
    model: TinyVLM, image: np.ndarray, prompt_ids, plugs: Plugs = NONE, trace: Trace | None = None
) -> tuple[np.ndarray, State]:
    """Encode the image, run the prompt through the decoder and fill the caches.

    Returns:
        ``(logits[V], state)``: the logits after the last prompt token and the decoding state.
    """
    t0 = time.perf_counter()
    cfg = model.config
    ids = _prompt_array(prompt_ids)
    policy = plugs.token_policy
    tokens, view, enc_counts = encode_tokens(model, image, plugs, ids, want_attention=policy.needs_encoder_attention())
    connector_rows = tokens.n
    tokens = policy.after_connector(tokens, ids, view)
    _check_tokens(tokens, "after_connector", (cfg.grid, cfg.grid))
    n_vis = tokens.n
    x = np.concatenate([tokens.x.astype(np.float32), model["embed.weight"][ids]], axis=0)
    info = PromptInfo(n_vis, (cfg.grid, cfg.grid), tokens.first_patch(), ids, x)
    positions = positions_for(n_vis, ids.size)
    source = tokens.source
    protected = tokens.protected
    cur_vis = n_vis
    caches = []
    layer_tokens = []
    for i in range(cfg.layers):
        want = policy.needs_attention(i) or plugs.kv_policy.needs_attention(i)
        routed = _route(plugs, i, x, positions)
        if routed is None:
            layer_tokens.append(x.shape[0])
            x, k, v, weights = _decoder_layer(model, plugs, i, x, positions, None, causal=True, want_weights=want)
            caches.append(plugs.kv_policy.store(i, k, v, weights, info, positions=positions, n_visual=cur_vis))
        else:  # Mixture-of-Depths: only the routed tokens run this layer and are cached in it
            if type(policy).in_decoder is not TokenPolicy.in_decoder:
                raise ValueError("an exit policy that routes prefill tokens cannot be combined with a token policy "
                                 "that acts inside the decoder")  # fmt: skip
            layer_tokens.append(int(routed.size))
            out, k, v, weights = _decoder_layer(model, plugs, i, x[routed], positions[routed], None, causal=True,
                                                want_weights=want)  # fmt: skip
            x = x.copy()
            x[routed] = out
            caches.append(plugs.kv_policy.store(i, k, v, weights, info, positions=positions[routed],
                                                n_visual=int(np.count_nonzero(routed < cur_vis))))  # fmt: skip
        if i == cfg.layers - 1:
            break  # nothing runs after the last layer but the LM head on the last token
        out = policy.in_decoder(i, LayerView(x, weights, k, positions, cur_vis, source, info, protected))
        if out is None:
            continue
        if isinstance(out, DecoderUpdate):
            x, positions, cur_vis, source, protected = _apply_update(out, x, cur_vis, cfg, positions, protected)
            continue
        if not isinstance(out, (np.ndarray, list, tuple)):
            raise TypeError(f"TokenPolicy.in_decoder must return None, kept indices or a DecoderUpdate, "
                            f"got {type(out).__name__}")  # fmt: skip
        keep = _checks.int_array(out, "kept indices", ndim=1, low=0, high=x.shape[0] - 1)
        if np.any(np.diff(keep) <= 0) or not np.array_equal(keep[keep >= cur_vis], np.arange(cur_vis, x.shape[0])):
            raise ValueError("a token policy must keep sorted unique indices including every text token")
        vis_keep = keep[keep < cur_vis]
        if protected is not None:
            if np.count_nonzero(protected[vis_keep]) != np.count_nonzero(protected):
                raise ValueError("a token policy dropped a visual token that an earlier hook protected")
            protected = protected[vis_keep]
        source = remap_source(source, vis_keep, cur_vis)
        x, positions, cur_vis = x[keep], positions[keep], int(vis_keep.size)
    logits = logits_from_hidden(model, x[-1], plugs)
    state = State(tuple(caches), int(ids.size + 1), info, x[-1])
    if trace is not None:
        trace.n_patches, trace.n_visual, trace.n_prompt = cfg.n_patches, n_vis, int(ids.size)
        trace.layer_tokens = layer_tokens
        trace.encoder_tokens = [a for a, _ in enc_counts]
        trace.encoder_mlp_tokens = [b for _, b in enc_counts]
        trace.connector_tokens = connector_rows
        trace.source = source
        trace.kv_bytes = sum(plugs.kv_policy.nbytes(c) for c in caches)
        trace.prefill_seconds += time.perf_counter() - t0
    return logits, state


def _route(plugs: Plugs, layer: int, x: np.ndarray, positions: np.ndarray) -> np.ndarray | None:
    idx = plugs.exit_policy.route(layer, x, positions)
    if idx is None:
        return None
    idx = _checks.int_array(idx, "ExitPolicy.route indices", ndim=1, low=0, high=x.shape[0] - 1)
    if idx.size == 0 or np.any(np.diff(idx) <= 0):
        raise ValueError("ExitPolicy.route must return sorted, unique, non-empty token indices")
    return None if idx.size == x.shape[0] else idx.astype(np.int64)


def decode_step(
    model: TinyVLM, state: State, token: int, plugs: Plugs = NONE, trace: Trace | None = None
) -> tuple[np.ndarray, State]:
    """Feed one token and return ``(logits[V], new state)``.

    When the exit policy stops the step after layer ``l`` (or skips a layer), the hidden state the token has is
    passed on as the input of the layers it does not run, whose keys and values for this token are computed from
    it (CALM's state propagation), so later tokens still find a full cache; a policy with ``fill_skipped = False``
    (Mixture-of-Depths) leaves no entry there instead. The logits of an exited token come from the policy's
    :meth:`~mllm_ref.tinyvlm.plugs.ExitPolicy.exit_logits`.
    """
    t0 = time.perf_counter()
    cfg = model.config
    token = _checks.integer(token, "token", low=0, high=cfg.vocab_size - 1)
    x = model["embed.weight"][token][None]
    positions = np.array([state.next_position])
    caches = list(state.caches)
    exited_at = None
    ran = 0
    context = 0
    kv = plugs.kv_policy
    ep = plugs.exit_policy
    pos = int(state.next_position)

    def logits_fn(h):
        return logits_from_hidden(model, h, plugs)

    for i in range(cfg.layers):
        if i == 0:
            context = kv.length(i, caches[i])
        if exited_at is None and not ep.skip(i, x[0]):
            want = kv.needs_attention(i)
            past = _past(plugs, i, caches[i])
            x, k, v, weights = _decoder_layer(model, plugs, i, x, positions, past, causal=True, want_weights=want)
            caches[i] = kv.extend(i, caches[i], k, v, weights, position=pos)
            ran += 1
            if i < cfg.layers - 1 and ep.should_exit(i, x[0], logits_fn):
                exited_at = i
        elif ep.fill_skipped:  # propagate the hidden state the token has into this layer's cache
            h = rmsnorm(x, model[f"dec.{i}.norm1.weight"], eps=cfg.rms_eps)
            k = _lin(plugs, model, h, f"dec.{i}.k").reshape(-1, cfg.kv_heads, cfg.head_dim).transpose(1, 0, 2)
            v = _lin(plugs, model, h, f"dec.{i}.v").reshape(-1, cfg.kv_heads, cfg.head_dim).transpose(1, 0, 2)
            caches[i] = kv.extend(i, caches[i], rope(k, positions, theta=cfg.rope_theta), v, None, position=pos)
    logits = logits_fn(x[0]) if exited_at is None else np.asarray(ep.exit_logits(exited_at, x[0], logits_fn))
    new_state = replace(state, caches=tuple(caches), next_position=state.next_position + 1, hidden=x[0])
    if trace is not None:
        trace.decode_context.append(context)
        trace.decode_layers.append(ran)
        trace.kv_bytes = sum(plugs.kv_policy.nbytes(c) for c in caches)
        t1 = time.perf_counter()
        trace.decode_seconds += t1 - t0
        trace.timeline.append(("decode", t0, t1, 1))
    return logits, new_state


def _past(plugs: Plugs, layer: int, cache):
    """What :func:`_decoder_layer` prepends at a decode step: the keys and values the KV policy reads or, for a
    policy with its own :meth:`KVPolicy.attend`, a callable that tries it first."""
    kv = plugs.kv_policy
    if type(kv).attend is KVPolicy.attend:
        return kv.read(layer, cache)
    return _FusedOrRead(plugs, layer, cache)


class _FusedOrRead:
    """A callable for :func:`_decoder_layer` that asks the policy's :meth:`KVPolicy.attend` first and falls back
    to :meth:`KVPolicy.read` plus the ``attention`` plug when it returns ``None``."""

    def __init__(self, plugs: Plugs, layer: int, cache):
        self.plugs, self.layer, self.cache = plugs, layer, cache

    def __call__(self, q, k, v, want_weights):
        kv = self.plugs.kv_policy
        out = kv.attend(self.layer, self.cache, q, k, v, want_weights=want_weights)
        if out is not None:
            a, w = out
            expected = (q.shape[0], q.shape[1], v.shape[2])
            if np.shape(a) != expected or (want_weights and w is None):
                raise ValueError(f"KVPolicy.attend must return out[H, 1, dv] = {list(expected)} and the weights when "
                                 f"asked, got {np.shape(a)}")  # fmt: skip
            return np.asarray(a, dtype=np.float32), w
        k_past, v_past = kv.read(self.layer, self.cache)
        k_all = np.concatenate([k_past, k], axis=1)
        v_all = np.concatenate([v_past, v], axis=1)
        out = _attend(self.plugs, q, k_all, v_all, causal=True, want_weights=want_weights)
        return (out[0][0], out[1][0]) if want_weights else (out[0], None)


@dataclass(frozen=True)
class Generation:
    """The result of :func:`generate`: new token ids (without ``<eos>``), their text, and the trace."""

    tokens: tuple[int, ...]
    text: str
    trace: Trace


def generate(
    model: TinyVLM,
    image: np.ndarray,
    prompt_ids,
    *,
    max_new_tokens: int = 24,
    plugs: Plugs = NONE,
    rng: np.random.Generator | None = None,
    prefill_tokens: int | None = None,
) -> Generation:
    """Prefill, then decode with the ``decoding`` plug until ``<eos>`` or ``max_new_tokens``.

    ``prefill_tokens``: ``None`` prefills the whole prompt (the usual request). An int ``n`` prefills the image and
    the first ``n`` prompt tokens only, and reads the rest of the prompt one token at a time through the cache
    (:func:`decode_step`), as when an image was cached before its question arrived (a second turn, a prefix-cache
    hit). Without a KV policy the two give the same tokens (up to float32 rounding); with one, the question is
    read through the cache the policy kept after the prefill, which is where query-agnostic KV compression is
    judged. The prompt steps count as decode steps in the trace.
    """
    max_new_tokens = _checks.integer(max_new_tokens, "max_new_tokens", low=1)
    if rng is not None:
        _checks.generator(rng)
    ids = _prompt_array(prompt_ids)
    trace = Trace()
    if prefill_tokens is None:
        logits, state = prefill(model, image, ids, plugs, trace)
    else:
        n = _checks.integer(prefill_tokens, "prefill_tokens", low=1, high=ids.size)
        logits, state = prefill(model, image, ids[:n], plugs, trace)
        for token in ids[n:]:
            logits, state = decode_step(model, state, int(token), plugs, trace)
    if isinstance(plugs.decoding, DecodingStrategy):
        t0 = time.perf_counter()
        out = plugs.decoding.run(model, state, logits, prompt_ids=ids, max_new_tokens=max_new_tokens, plugs=plugs,
                                 rng=rng, trace=trace)  # fmt: skip
        trace.decode_seconds += time.perf_counter() - t0
        return Generation(tuple(out), tokenizer.decode(out), trace)
    out: list[int] = []
    for step in range(max_new_tokens):
        token = plugs.decoding(logits, rng)
        if token == tokenizer.EOS:
            break
        out.append(token)
        if step + 1 < max_new_tokens:
            logits, state = decode_step(model, state, token, plugs, trace)
    return Generation(tuple(out), tokenizer.decode(out), trace)


def answer(model: TinyVLM, image: np.ndarray, question: str, plugs: Plugs = NONE, max_new_tokens: int = 24) -> str:
    """The model's greedy answer to ``question`` about ``image``."""
    return generate(model, image, tokenizer.prompt_ids(question), max_new_tokens=max_new_tokens, plugs=plugs).text


def forward_logits(model: TinyVLM, image: np.ndarray, token_ids, plugs: Plugs = NONE) -> np.ndarray:
    """Logits ``float32[N + T, V]`` for every position of ``[visual tokens, token_ids]``, with no cache.

    This is the full re-forward that cached decoding must equal, and what the torch twin is compared with.
    """
    cfg = model.config
    ids = _prompt_array(token_ids)
    visual = encode_image(model, image, plugs)
    x = np.concatenate([visual, model["embed.weight"][ids]], axis=0)
    positions = positions_for(visual.shape[0], ids.size)
    for i in range(cfg.layers):
        x, _, _, _ = _decoder_layer(model, plugs, i, x, positions, None, causal=True, want_weights=False)
    return logits_from_hidden(model, x, plugs)


def attention_maps(model: TinyVLM, image: np.ndarray, prompt_ids) -> np.ndarray:
    """Prefill attention of the last prompt token over the visual tokens, per layer and head.

    Returns:
        ``float32[layers, H, grid, grid]``: the weights the last prompt token gives each image patch.
    """
    cfg = model.config
    ids = _prompt_array(prompt_ids)
    visual = encode_image(model, image)
    x = np.concatenate([visual, model["embed.weight"][ids]], axis=0)
    positions = positions_for(visual.shape[0], ids.size)
    maps = []
    for i in range(cfg.layers):
        x, _, _, w = _decoder_layer(model, NONE, i, x, positions, None, causal=True, want_weights=True)
        maps.append(w[:, -1, : cfg.n_patches].reshape(cfg.heads, cfg.grid, cfg.grid))
    return np.stack(maps)
