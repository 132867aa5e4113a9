"""Connector variants of the tiny VLM: the shipped encoder and decoder, frozen, with another connector.

As BLIP-2's first stage does, only the connector is trained (``python -m kernels_torch.tinyvlm.train_connector``);
the encoder and decoder are the bundled model's, checked by their sha256. Each variant is a folder
``weights/connectors/<name>/`` with ``connector.npz`` (the connector's parameters, no pickle) and
``manifest.json`` (kind, arguments, the base model's sha256, the training command, history and measured accuracy).

Kinds, each run by the NumPy reference of :mod:`mllm_ref.connectors` on the trained weights:

- ``"qformer"``: ``Q`` learned queries through a BLIP-2 Q-Former (:func:`mllm_ref.connectors.qformer.qformer`, Hugging
  Face names under ``qformer.``), then a linear projection ``proj`` to the decoder width: ``Q`` visual tokens.
- ``"resampler"``: Flamingo's Perceiver Resampler (:func:`mllm_ref.connectors.perceiver_resampler.perceiver_resampler`)
  with ``Q`` latents, then ``proj``: ``Q`` visual tokens.
- ``"ldp"``: MobileVLM V2's LDPv2 (:func:`mllm_ref.connectors.ldp.ldp_projector`): the 12 x 12 grid pooled to 6 x 6,
  36 visual tokens, each carrying a 2 x 2 window of patches.

A query token reads every patch, so no patch is carried by one query: the patch map of a query-based variant is -1
everywhere (no token *is* a patch). The ``linear`` plug does not reach a variant connector's layers.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from mllm_ref.tinyvlm.model import WEIGHTS_DIR, TinyVLM, load

VARIANTS_DIR = WEIGHTS_DIR / "connectors"
KINDS = ("qformer", "resampler", "ldp")
PREFIX = "conn."


def available() -> list[str]:
    """Names of the shipped variants (folders with a manifest), sorted."""
    if not VARIANTS_DIR.is_dir():
        return []
    return sorted(p.parent.name for p in VARIANTS_DIR.glob("*/manifest.json"))


def load_variant(name: str, base: TinyVLM | None = None, *, folder: str | Path | None = None) -> TinyVLM:
    """The tiny VLM with the connector variant ``name`` (a folder under ``weights/connectors``, or ``folder``).

    ``base``: the bundled model, if already loaded. The variant's manifest must name the base's sha256, so a
    connector is never run on a decoder it was not trained with.
    """
    path = Path(folder) if folder is not None else VARIANTS_DIR / name
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"no connector variant {name!r} (no {manifest_path}); shipped: {available()}")
    manifest = json.loads(manifest_path.read_text())
    kind = manifest.get("kind")
    if kind not in KINDS:
        raise ValueError(f"{manifest_path}: kind must be one of {KINDS}, got {kind!r}")
    base = load() if base is None else base
    if manifest.get("base_sha256") != base.manifest.get("sha256"):
        raise ValueError(f"connector variant {name!r} was trained on another base model (sha256 differs)")
    data = (path / manifest["weights_file"]).read_bytes()
    if hashlib.sha256(data).hexdigest() != manifest.get("sha256"):
        raise ValueError(f"{path / manifest['weights_file']} does not match the sha256 in {manifest_path}")
    with np.load(path / manifest["weights_file"], allow_pickle=False) as npz:
        conn = {PREFIX + k: npz[k].astype(np.float32) for k in npz.files}
    spec = {"name": name, "kind": kind, "args": dict(manifest["args"])}
    return replace(base, params={**base.params, **conn}, connector=spec, manifest={**base.manifest, "variant": manifest})


def _sub(model: TinyVLM, prefix: str) -> dict[str, np.ndarray]:
    p = PREFIX + prefix
    return {k[len(p) :]: v for k, v in model.params.items() if k.startswith(p)}


def connector_inputs(model: TinyVLM, features: np.ndarray) -> tuple[str, dict]:
    """The registered technique id and keyword arguments that run ``model``'s connector on ``features``
    (``float32[N, vis_dim]``): what :func:`connect` calls, and what the cost model counts."""
    spec = model.connector
    kind, args = spec["kind"], spec["args"]
    if kind == "qformer":
        return "connectors.qformer", dict(
            query_embeds=model[PREFIX + "query_tokens"], image_embeds=features, weights=_sub(model, "qformer."),
            num_heads=args["heads"], cross_attention_frequency=args["cross_attention_frequency"],
        )  # fmt: skip
    if kind == "resampler":
        return "connectors.perceiver_resampler", dict(x=features, weights=_sub(model, "resampler."), heads=args["heads"])
    return "connectors.ldp", dict(x=features, weights=_sub(model, "ldp."), version=2)


def connect(model: TinyVLM, features: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run ``model``'s connector variant on the encoder features ``float32[N, vis_dim]`` of a full patch grid.

    Returns ``(x float32[M, dim], size float32[M], source int64[n_patches])``: the visual tokens, the patches each
    stands for, and the patch map (-1 everywhere for query-based connectors; the pooling window for LDP).
    """
    from mllm_ref.connectors import ldp, perceiver_resampler, qformer

    cfg = model.config
    if features.shape[0] != cfg.n_patches:
        raise ValueError(f"a connector variant needs all {cfg.n_patches} encoder tokens, got {features.shape[0]} "
                         "(an encoder-side token policy cannot be combined with it)")  # fmt: skip
    tid, kw = connector_inputs(model, features)
    kind = model.connector["kind"]
    if kind == "ldp":
        x = ldp.ldp_projector(**kw)
        g, m = cfg.grid, int(round(np.sqrt(x.shape[0])))
        if g != 2 * m:  # odd grids pool overlapping windows: no patch map of one token per patch
            raise ValueError(f"the LDP variant's patch map needs an even grid pooled by 2, got {g} -> {m}")
        rows = np.arange(g) // 2  # the pooling's 2 x 2 windows
        source = (rows[:, None] * m + rows[None, :]).reshape(-1).astype(np.int64)
        size = np.bincount(source, minlength=m * m).astype(np.float32)
        return x.astype(np.float32), size, source
    if kind == "qformer":
        h = qformer.qformer(**kw)
    else:
        h = perceiver_resampler.perceiver_resampler(**kw)
    x = h @ model[PREFIX + "proj.weight"].T + model[PREFIX + "proj.bias"]
    return x.astype(np.float32), np.ones(x.shape[0], dtype=np.float32), np.full(cfg.n_patches, -1, dtype=np.int64)


def connector_flops(model: TinyVLM) -> float:
    """FLOPs of one image through ``model``'s connector variant, from the registered technique's cost model
    (plus the final projection of the query-based kinds)."""
    from mllm_ref.oracle import registry

    cfg = model.config
    tid, kw = connector_inputs(model, np.zeros((cfg.n_patches, cfg.vis_dim), dtype=np.float32))
    flops = registry.get(tid).cost(kw)["flops"]
    if model.connector["kind"] != "ldp":
        w = model[PREFIX + "proj.weight"]
        flops += 2.0 * model.connector["args"]["queries"] * w.shape[0] * w.shape[1]
    return float(flops)


def tour_variants(names: dict[str, str]):
    """For a connector's registry entry: ``variants(model) -> [(setting, variant model)]`` for the shipped
    variants among ``names`` (variant name -> setting text), in that order (see :mod:`mllm_ref.tinyvlm.tour`)."""

    def variants(model: TinyVLM):
        shipped = available()
        return [(setting, load_variant(name, model)) for name, setting in names.items() if name in shipped]

    return variants


def query_maps(model: TinyVLM, image: np.ndarray) -> np.ndarray:
    """Where each query of a Q-Former variant looks: ``float[C, Q, n_patches]``, the cross-attention weights of
    each of its ``C`` cross-attention layers over the image's patches, averaged over heads."""
    from mllm_ref.connectors.qformer import cross_attention_maps
    from mllm_ref.tinyvlm.model import encode_tokens

    if model.connector is None or model.connector["kind"] != "qformer":
        raise ValueError("query_maps needs a Q-Former variant (load_variant('qformer16'), ...)")
    base = replace(model, connector=None)
    features = encode_tokens(base, image)[1].features
    _, kw = connector_inputs(model, features)
    return cross_attention_maps(**kw).mean(axis=1)
