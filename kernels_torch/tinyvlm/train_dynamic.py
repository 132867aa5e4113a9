"""Train what the tiny VLM's elastic-depth techniques need: a MatFormer FFN and Mixture-of-Depths routers.

    python -m kernels_torch.tinyvlm.train_dynamic --kind matformer   # nested FFNs, fine-tuned from the bundled model
    python -m kernels_torch.tinyvlm.train_dynamic --kind mod         # routers and causal predictors, model frozen

Written to ``mllm_ref/tinyvlm/weights/dynamic/<kind>/`` as ``weights.npz`` (no pickle) and ``manifest.json`` (the
base model's sha256, the command, the loss history).

- **matformer** (:mod:`mllm_ref.dynamic.matformer`): the decoder's feed-forward weights (gate, up, down of every
  layer) are fine-tuned so that the first ``m`` hidden units of each FFN form a working smaller FFN, for ``m`` in
  ``ffn_dim * {1/8, 1/4, 1/2, 1}`` (MatFormer's four granularities). Each step adds the loss of the full width and of
  one width drawn per layer (Mix'n'Match), each the answer/caption cross-entropy plus the KL divergence to the
  bundled model's distribution; attention, norms and embeddings stay as shipped. Saved in float16 (half the bytes;
  the NumPy side computes in float32 and the manifest records the held-out accuracy after rounding).
- **mod** (:mod:`mllm_ref.dynamic.mod`): for every other decoder layer (1, 3, ..., 11), a router ``r = w . x`` on the
  layer's input and a causal predictor (a two-layer MLP on the same input). The decoder stays frozen, so the router
  cannot learn through the block's output as in the paper; it is trained to rank tokens by how much the block
  changes them (the log of ``|f(x)| / |x|``, the block's relative update), and the predictor to tell, from the token
  alone, whether the router puts it in its sequence's top ``capacity`` (binary cross-entropy).

Seeded: the scene stream comes from ``numpy.random.default_rng(seed)``, the initialisation from
``torch.manual_seed(seed)``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kernels_torch.tinyvlm.model import TinyVLM
from kernels_torch.tinyvlm.train import make_batch
from kernels_torch.tinyvlm.train_decoding import load_target, record_step
from mllm_ref.tinyvlm.model import WEIGHTS_DIR

DYNAMIC_DIR = WEIGHTS_DIR / "dynamic"
STEPS = {"matformer": 500, "mod": 500}
MATFORMER_FRACTIONS = (0.125, 0.25, 0.5, 1.0)
MOD_LAYERS = tuple(range(1, 12, 2))


def inputs(model: TinyVLM, imgs, tokens, positions):
    vis = model.encode_image(imgs)
    b, n, _ = vis.shape
    x = torch.cat([vis, model.embed(tokens)], dim=1)
    pos = torch.cat([torch.zeros(b, n, dtype=torch.long), positions], dim=1)
    return x, pos, n


def _kl(student, teacher, where):
    t = F.log_softmax(teacher[where], dim=-1)
    s = F.log_softmax(student[where], dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


def train_matformer(model, reference, steps, batch, n_questions, lr, rng, log):
    cfg = model.cfg
    params = []
    for blk in model.dec:
        for lin in (blk.gate, blk.up, blk.down):
            lin.weight.requires_grad_(True)
            params.append(lin.weight)
    widths = [max(1, int(round(f * cfg.ffn_dim))) for f in MATFORMER_FRACTIONS]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    history, start = [], time.perf_counter()
    for step in range(1, steps + 1):
        imgs, tokens, positions, mask, targets, _, _ = make_batch(rng, batch, n_questions, cfg.n_patches,
                                                                  with_lookup=False)  # fmt: skip
        sup = targets != -100
        with torch.no_grad():
            teacher = reference(imgs, tokens, positions, mask)[:, cfg.n_patches :]
        loss, metrics = 0.0, {}
        draws = {"full": [cfg.ffn_dim] * cfg.layers, "mixed": [widths[int(rng.integers(len(widths) - 1))]
                                                             for _ in range(cfg.layers)]}  # fmt: skip
        for name, per_layer in draws.items():
            x, pos, n = inputs(model, imgs, tokens, positions)
            for blk, m in zip(model.dec, per_layer):
                x = blk.ffn_half(blk.attention_half(x, pos, mask)[0], m)
            logits = model.lm_head(model.norm(x))[:, n:]
            loss = loss + F.cross_entropy(logits[sup], targets[sup]) + _kl(logits, teacher, sup)
            metrics[f"{name}_top1"] = float((logits[sup].argmax(-1) == targets[sup]).float().mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps:
            record_step(history, step, steps, loss, metrics, start, log)
    state = {}
    for i, blk in enumerate(model.dec):
        for name in ("gate", "up", "down"):
            state[f"dec.{i}.{name}.weight"] = getattr(blk, name).weight.detach().numpy().astype(np.float16)
    return state, {"fractions": list(MATFORMER_FRACTIONS), "widths": widths, "history": history}


class Routers(nn.Module):
    def __init__(self, dim: int, layers: int, hidden: int = 32):
        super().__init__()
        self.router = nn.ModuleList(nn.Linear(dim, 1) for _ in range(layers))
        self.fc1 = nn.ModuleList(nn.Linear(dim, hidden) for _ in range(layers))
        self.fc2 = nn.ModuleList(nn.Linear(hidden, 1) for _ in range(layers))


def train_mod(model, steps, batch, n_questions, lr, rng, log, capacity: float):
    cfg = model.cfg
    mod = Routers(cfg.dim, len(MOD_LAYERS))
    opt = torch.optim.AdamW(mod.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    history, start = [], time.perf_counter()
    for step in range(1, steps + 1):
        imgs, tokens, positions, mask, targets, _, _ = make_batch(rng, batch, n_questions, cfg.n_patches,
                                                                  with_lookup=False)  # fmt: skip
        valid = torch.cat([torch.ones(batch, cfg.n_patches, dtype=torch.bool), tokens != 0], dim=1)
        loss, metrics = 0.0, {}
        with torch.no_grad():
            x, pos, n = inputs(model, imgs, tokens, positions)
            layer_in, importance = {}, {}
            for i, blk in enumerate(model.dec):
                if i in MOD_LAYERS:
                    out = blk(x, pos, mask)
                    layer_in[i] = x
                    importance[i] = torch.log((out - x).norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-6) + 1e-6)
                    x = out
                else:
                    x = blk(x, pos, mask)
        for j, i in enumerate(MOD_LAYERS):
            xi = layer_in[i].detach()
            r = mod.router[j](xi).squeeze(-1)
            loss = loss + F.mse_loss(r[valid], importance[i][valid])
            # top-capacity membership by the router's score, per sequence (padding never chosen)
            with torch.no_grad():
                scores = r.masked_fill(~valid, float("-inf"))
                kth = torch.quantile(r.detach().masked_fill(~valid, float("nan")).nan_to_num(nan=-1e9)
                                     .float(), 1 - capacity, dim=1, keepdim=True)  # fmt: skip
                chosen = (scores >= kth).float()
            pred = mod.fc2[j](F.silu(mod.fc1[j](xi))).squeeze(-1)
            loss = loss + F.binary_cross_entropy_with_logits(pred[valid], chosen[valid])
            if j in (0, 3):
                metrics[f"layer{i}_pred_acc"] = float(((pred[valid] > 0).float() == chosen[valid]).float().mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps:
            record_step(history, step, steps, loss, metrics, start, log)
    state = {}
    for j, i in enumerate(MOD_LAYERS):
        state[f"mod.{i}.router.weight"] = mod.router[j].weight.detach().numpy()[0].astype(np.float32)
        state[f"mod.{i}.router.bias"] = mod.router[j].bias.detach().numpy().astype(np.float32)
        for name in ("fc1", "fc2"):
            state[f"mod.{i}.predictor.{name}.weight"] = getattr(mod, name)[j].weight.detach().numpy().astype(np.float32)
            state[f"mod.{i}.predictor.{name}.bias"] = getattr(mod, name)[j].bias.detach().numpy().astype(np.float32)
    return state, {"layers": list(MOD_LAYERS), "capacity": capacity, "history": history}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", choices=sorted(STEPS), required=True)
    ap.add_argument("--steps", type=int, default=None, help=f"default per kind: {STEPS}")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--questions", type=int, default=4)
    ap.add_argument("--lr", type=float, default=None, help="default: 3e-4 (matformer), 3e-3 (mod)")
    ap.add_argument("--capacity", type=float, default=0.5, help="MoD: share of tokens a routed layer processes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help=f"default: {DYNAMIC_DIR}/KIND")
    a = ap.parse_args(argv)
    torch.manual_seed(a.seed)
    torch.set_num_threads(a.threads)
    rng = np.random.default_rng(a.seed)
    steps = STEPS[a.kind] if a.steps is None else a.steps
    model, manifest = load_target()

    def log(m):
        print(m, flush=True)

    t0 = time.perf_counter()
    if a.kind == "matformer":
        reference, _ = load_target()
        state, info = train_matformer(model, reference, steps, a.batch, a.questions, a.lr or 3e-4, rng, log)
    else:
        state, info = train_mod(model, steps, a.batch, a.questions, a.lr or 3e-3, rng, log, a.capacity)
    out = a.out or DYNAMIC_DIR / a.kind
    out.mkdir(parents=True, exist_ok=True)
    path = out / "weights.npz"
    np.savez_compressed(path, **state)
    info.update({
        "kind": a.kind, "base_sha256": manifest["sha256"], "seed": a.seed, "steps": steps, "batch_images": a.batch,
        "questions_per_image": a.questions, "threads": a.threads, "train_seconds": round(time.perf_counter() - t0, 1),
        "torch_version": torch.__version__, "parameters": int(sum(v.size for v in state.values())),
        "command": "python -m kernels_torch.tinyvlm.train_dynamic " + " ".join(sys.argv[1:] if argv is None else argv),
        "weights_file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "weights_bytes": path.stat().st_size,
    })  # fmt: skip
    (out / "manifest.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"wrote {path} ({path.stat().st_size / 1e3:.0f} kB) in {info['train_seconds']} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
