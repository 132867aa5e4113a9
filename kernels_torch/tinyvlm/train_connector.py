"""Train a connector variant of the tiny VLM, the encoder and decoder frozen (BLIP-2's first-stage recipe).

    python -m kernels_torch.tinyvlm.train_connector --kind qformer --queries 16 --name qformer16

The bundled model's weights are loaded into the torch twin and frozen; only the new connector
(:mod:`kernels_torch.tinyvlm.connectors`) learns, from the answers and captions alone (the cross-entropy of the
answer tokens and ``<eos>``, on the same packed scenes as the model's own training). The result is written to
``mllm_ref/tinyvlm/weights/connectors/<name>/`` as ``connector.npz`` (float32 arrays with the names the NumPy
references read, no pickle) and ``manifest.json`` (kind, arguments, the base model's sha256, command, history,
and the held-out accuracy measured with the NumPy forward). Seeded: the scene stream comes from
``numpy.random.default_rng(seed)``, the initialisation from ``torch.manual_seed(seed)``.
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

from kernels_torch.tinyvlm.connectors import build
from kernels_torch.tinyvlm.model import TinyVLM, param_count
from kernels_torch.tinyvlm.train import make_batch, quick_eval
from mllm_ref.tinyvlm import world
from mllm_ref.tinyvlm.model import load
from mllm_ref.tinyvlm.variants import VARIANTS_DIR
from mllm_ref.tinyvlm.world import EVAL_SEED

#: Default arguments of each kind (``--queries`` overrides the query count).
DEFAULTS = {
    "qformer": {"queries": 16, "hidden": 64, "layers": 2, "heads": 4, "intermediate": 256,
                "cross_attention_frequency": 1},
    "resampler": {"queries": 32, "depth": 2, "heads": 4, "dim_head": 16},
    "ldp": {},
}  # fmt: skip
#: Default training steps of each kind: the query-based connectors were still improving after 600 steps (held-out
#: 0.905 and 0.928 for 16 and 32 queries, 0.577 for the resampler) and reach about 0.99 after 1800.
STEPS = {"qformer": 1800, "resampler": 1800, "ldp": 600}


class WithConnector(TinyVLM):
    """The torch twin with its MLP connector replaced by ``conn``."""

    def __init__(self, cfg, conn: torch.nn.Module):
        super().__init__(cfg)
        self.conn = conn

    def connector(self, features: torch.Tensor) -> torch.Tensor:
        return self.conn(features)


def train_connector(kind: str, args: dict, steps: int, batch: int, n_questions: int, lr: float, seed: int,
                    threads: int, eval_every: int, log=print):  # fmt: skip
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    base = load()
    cfg = base.config
    conn = build(kind, args, cfg.vis_dim, cfg.dim, cfg.grid)
    model = WithConnector(cfg, conn)
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in base.params.items()}, strict=False)
    if unexpected or any(not k.startswith("conn.") for k in missing):
        raise RuntimeError(f"base weights do not fit the twin: missing {missing}, unexpected {unexpected}")
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("conn."))
    params = [p for p in conn.parameters()]
    with torch.no_grad():
        n_vis = conn(torch.zeros(1, cfg.n_patches, cfg.vis_dim)).shape[1]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))
    )
    rng = np.random.default_rng(seed)
    dev_set = world.vqa_set(EVAL_SEED + 1, 40)
    log(f"{kind} {args}: {param_count(conn):,} trainable parameters, {n_vis} visual tokens; steps {steps}, "
        f"batch {batch} images x {n_questions + 1} segments")  # fmt: skip
    start = time.perf_counter()
    history = []
    for step in range(1, steps + 1):
        imgs, tokens, positions, mask, targets, _, _ = make_batch(rng, batch, n_questions, n_vis, with_lookup=False)
        logits = model(imgs, tokens, positions, mask)[:, n_vis:]
        loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), targets.reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % eval_every == 0 or step == steps:
            acc = quick_eval(model, dev_set)
            elapsed = time.perf_counter() - start
            history.append({"step": step, "loss": float(loss.detach()), "dev_accuracy": acc["overall"], "seconds": elapsed})
            log(f"step {step:5d}/{steps}  loss {float(loss.detach()):.4f}  dev acc {acc['overall']:.3f}  {elapsed:.0f}s")
    info = {
        "kind": kind,
        "args": args,
        "visual_tokens": int(n_vis),
        "base_sha256": base.manifest["sha256"],
        "seed": seed,
        "steps": steps,
        "batch_images": batch,
        "questions_per_image": n_questions,
        "learning_rate": lr,
        "threads": threads,
        "train_seconds": round(time.perf_counter() - start, 1),
        "torch_version": torch.__version__,
        "parameters": param_count(conn),
        "history": history,
    }
    return conn, info


def save_connector(conn: torch.nn.Module, out_dir: Path, info: dict) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    arrays = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in conn.state_dict().items()}
    path = out_dir / "connector.npz"
    np.savez_compressed(path, **arrays)
    manifest = dict(info, weights_file=path.name, sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
                    weights_bytes=path.stat().st_size)  # fmt: skip
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def record_eval(folder: Path, name: str, n_per_type: int = 100, n_captions: int = 50) -> dict:
    """Held-out accuracy of the saved variant with the NumPy forward, recorded in its manifest under ``"eval"``."""
    from mllm_ref.tinyvlm.evaluate import evaluate
    from mllm_ref.tinyvlm.variants import load_variant

    result = evaluate(load_variant(name, folder=folder), n_per_type, n_captions=n_captions).to_json()
    result["command"] = f"mllm-ref eval --variant {name} --n {n_per_type} --captions {n_captions}"
    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["eval"] = result
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", choices=sorted(DEFAULTS), required=True)
    ap.add_argument("--queries", type=int, default=None, help="queries / latents (qformer, resampler)")
    ap.add_argument("--name", required=True, help="variant folder name under weights/connectors")
    ap.add_argument("--steps", type=int, default=None, help=f"default per kind: {STEPS}")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--questions", type=int, default=12)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--out", type=Path, default=None, help=f"default: {VARIANTS_DIR}/NAME")
    a = ap.parse_args(argv)
    args = dict(DEFAULTS[a.kind])
    if a.queries is not None:
        if a.kind == "ldp":
            ap.error("--queries applies to qformer and resampler only")
        args["queries"] = a.queries
    steps = STEPS[a.kind] if a.steps is None else a.steps
    conn, info = train_connector(a.kind, args, steps, a.batch, a.questions, a.lr, a.seed, a.threads,
                                 a.eval_every, log=lambda m: print(m, flush=True))  # fmt: skip
    info["command"] = "python -m kernels_torch.tinyvlm.train_connector " + " ".join(sys.argv[1:] if argv is None else argv)
    out = a.out or VARIANTS_DIR / a.name
    path = save_connector(conn, out, info)
    print(f"wrote {path} ({path.stat().st_size / 1e3:.0f} kB) in {info['train_seconds']} s", flush=True)
    result = record_eval(out, a.name)
    print(f"held-out accuracy (NumPy forward): {result['accuracy']:.3f} {result['by_type']}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
