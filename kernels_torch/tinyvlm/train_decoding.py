"""Train the tiny VLM's decoding helpers, the bundled model frozen: a draft decoder, Medusa heads, exit heads.

    python -m kernels_torch.tinyvlm.train_decoding --kind draft    # a 2-layer draft decoder (speculative decoding)
    python -m kernels_torch.tinyvlm.train_decoding --kind medusa   # 3 Medusa heads (tokens t+2, t+3, t+4)
    python -m kernels_torch.tinyvlm.train_decoding --kind exits    # one exit head per intermediate layer

The bundled model's weights are loaded into the torch twin and never change. Every kind learns on the same packed
scenes as the model's own training (:func:`kernels_torch.tinyvlm.train.make_batch`) and is written to
``mllm_ref/tinyvlm/weights/decoding/<kind>/`` as ``weights.npz`` (float32 arrays with the names the NumPy references
read, no pickle) and ``manifest.json`` (arguments, the base model's sha256, the command, the loss history).

- **draft** (:mod:`mllm_ref.decoding.multimodal`): a decoder of ``--layers`` layers of the target's width (its own
  embedding, layers, final norm and LM head, initialised from the target's embedding and head), which reads the
  target's projected visual tokens. Each step trains it twice on the same batch: with the visual tokens before the
  text (MSD's drafter with its own small prefill of the image) and with no visual token (a text-only drafter, as
  Gagrani et al. compare), so one set of weights serves both modes. The loss is the cross-entropy of the answer
  and caption tokens plus the KL divergence to the target's next-token distribution at the same positions
  (distillation aligns the drafter with what the verifier will accept).
- **medusa** (:mod:`mllm_ref.decoding.medusa`): ``--heads`` heads on the target's last hidden state (after its final
  norm); head ``j`` (0-based) predicts the token ``j + 2`` places ahead. A head is Medusa's residual block
  ``h + SiLU(W h + b)`` followed by its own vocabulary projection, initialised from the target's LM head. The loss
  is the cross-entropy of the supervised tokens ``j + 2`` ahead within the same answer or caption.
- **exits** (:mod:`mllm_ref.decoding.self_speculative`, :mod:`mllm_ref.dynamic`): for each layer ``l`` but the
  last, an RMSNorm and a vocabulary projection on the hidden state after layer ``l``, initialised from the final
  norm and LM head and trained by distillation (KL to the full model's distribution at every text position), as the
  early-exit heads that LayerSkip-style self-speculation drafts with; and CALM's learned confidence, a linear score
  on the same hidden state trained (binary cross-entropy, weight 0.2) to predict whether that exit head's arg-max
  equals the full model's.
- **shared-exit** (:mod:`mllm_ref.dynamic.layer_skip`): LayerSkip's single early-exit head (one RMSNorm and vocabulary
  projection for every layer), trained on every intermediate layer with LayerSkip's early-exit loss weights (layer
  ``l`` weighs in proportion to ``0 + 1 + ... + (l + 1)``), by distillation with the model frozen. LayerSkip also
  trains the model itself with layer dropout; that part is left out (the model stays as shipped).

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

from kernels_torch.tinyvlm.model import DecoderBlock, TinyVLM
from kernels_torch.tinyvlm.train import make_batch
from mllm_ref.tinyvlm.config import TinyVLMConfig
from mllm_ref.tinyvlm.model import WEIGHTS_DIR, load

DECODING_DIR = WEIGHTS_DIR / "decoding"
STEPS = {"draft": 1500, "medusa": 800, "exits": 800, "shared-exit": 600}


def load_target() -> tuple[TinyVLM, dict]:
    """The bundled model in the torch twin, frozen, and its manifest."""
    base = load()
    model = TinyVLM(base.config)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in base.params.items()})
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return model, base.manifest


def hidden_states(model: TinyVLM, vis: torch.Tensor | None, tokens, positions, mask) -> list[torch.Tensor]:
    """Hidden states of the text positions after each decoder layer of ``model`` (``[B, T, D]`` each).

    ``vis``: ``[B, N, D]`` visual tokens placed before the text at position 0, or ``None`` (text only; ``mask`` is
    then the text block of the packed mask)."""
    x = model.embed(tokens)
    b, t = tokens.shape
    n = 0 if vis is None else vis.shape[1]
    if n:
        x = torch.cat([vis, x], dim=1)
        positions = torch.cat([torch.zeros(b, n, dtype=torch.long), positions], dim=1)
    else:
        mask = mask[:, -t:, -t:]
    out = []
    for blk in model.dec:
        x = blk(x, positions, mask)
        out.append(x[:, n:])
    return out


class Draft(nn.Module):
    """A small decoder of the target's width: embedding, ``layers`` decoder blocks, final norm, LM head."""

    def __init__(self, cfg: TinyVLMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.dec = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.rms_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    def forward(self, vis, tokens, positions, mask):
        h = hidden_states(self, vis, tokens, positions, mask)[-1]
        return self.lm_head(self.norm(h))


class MedusaHeads(nn.Module):
    """Medusa heads: ``logits_j = W_j (h + SiLU(A_j h + b_j))`` on the normed last hidden state ``h``."""

    def __init__(self, dim: int, vocab: int, heads: int):
        super().__init__()
        self.fc = nn.ModuleList(nn.Linear(dim, dim) for _ in range(heads))
        self.lm_head = nn.ModuleList(nn.Linear(dim, vocab, bias=False) for _ in range(heads))
        for fc in self.fc:
            nn.init.zeros_(fc.weight)  # start as the identity residual block, as Medusa does
            nn.init.zeros_(fc.bias)

    def forward(self, h):
        return [head(h + F.silu(fc(h))) for fc, head in zip(self.fc, self.lm_head)]


class ExitHeads(nn.Module):
    """One RMSNorm and vocabulary projection per intermediate layer, and CALM's early-exit classifier: a linear
    score on the layer's hidden state of whether the exit head already predicts what the full model predicts."""

    def __init__(self, dim: int, vocab: int, layers: int, eps: float):
        super().__init__()
        self.norm = nn.ModuleList(nn.RMSNorm(dim, eps=eps) for _ in range(layers))
        self.lm_head = nn.ModuleList(nn.Linear(dim, vocab, bias=False) for _ in range(layers))
        self.confidence = nn.ModuleList(nn.Linear(dim, 1) for _ in range(layers))


def _kl(student_logits, teacher_logits, where):
    """Mean KL(teacher || student) over the positions ``where`` (bool ``[B, T]``)."""
    t = F.log_softmax(teacher_logits[where], dim=-1)
    s = F.log_softmax(student_logits[where], dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


def record_step(history: list, step: int, steps: int, loss, metrics: dict, start: float, log) -> None:
    """Append the step's loss and metrics to ``history`` and log them with the elapsed time."""
    elapsed = time.perf_counter() - start
    history.append({"step": step, "loss": float(loss.detach()), **metrics, "seconds": round(elapsed, 1)})
    log(f"step {step:5d}/{steps}  loss {float(loss.detach()):.4f}  "
        + " ".join(f"{k} {v:.3f}" for k, v in metrics.items()) + f"  {elapsed:.0f}s")  # fmt: skip


def train(kind: str, steps: int, batch: int, n_questions: int, lr: float, seed: int, threads: int, layers: int,
          heads: int, log=print):  # fmt: skip
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    target, manifest = load_target()
    cfg = target.cfg
    if kind == "draft":
        module = Draft(TinyVLMConfig(**{**cfg.to_dict(), "layers": layers}))
        module.embed.weight.data.copy_(target.embed.weight)
        module.lm_head.weight.data.copy_(target.lm_head.weight)
        module.norm.weight.data.copy_(target.norm.weight)
    elif kind == "medusa":
        module = MedusaHeads(cfg.dim, cfg.vocab_size, heads)
        for head in module.lm_head:
            head.weight.data.copy_(target.lm_head.weight)
    elif kind == "shared-exit":
        module = ExitHeads(cfg.dim, cfg.vocab_size, 1, cfg.rms_eps)
        module.norm[0].weight.data.copy_(target.norm.weight)
        module.lm_head[0].weight.data.copy_(target.lm_head.weight)
    elif kind == "exits":
        module = ExitHeads(cfg.dim, cfg.vocab_size, cfg.layers - 1, cfg.rms_eps)
        for norm, head in zip(module.norm, module.lm_head):
            norm.weight.data.copy_(target.norm.weight)
            head.weight.data.copy_(target.lm_head.weight)
    else:
        raise ValueError(f"kind must be draft, medusa or exits, got {kind!r}")
    params = list(module.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))
    )
    rng = np.random.default_rng(seed)
    n_params = sum(p.numel() for p in params)
    log(f"{kind}: {n_params:,} trainable parameters; steps {steps}, batch {batch} images x {n_questions + 1} segments")
    start = time.perf_counter()
    history = []
    for step in range(1, steps + 1):
        imgs, tokens, positions, mask, targets, _, _ = make_batch(rng, batch, n_questions, cfg.n_patches,
                                                                  with_lookup=False)  # fmt: skip
        with torch.no_grad():
            vis = target.encode_image(imgs)
            hs = hidden_states(target, vis, tokens, positions, mask)
            final = target.lm_head(target.norm(hs[-1]))
        supervised = targets != -100
        text = tokens != 0
        metrics = {}
        if kind == "draft":
            loss = 0.0
            for mode, v in (("visual", vis), ("text", None)):
                logits = module(v, tokens, positions, mask)
                ce = F.cross_entropy(logits[supervised], targets[supervised])
                loss = loss + ce + _kl(logits, final, supervised)
                metrics[f"{mode}_top1"] = float((logits[supervised].argmax(-1) == final[supervised].argmax(-1))
                                                .float().mean())  # fmt: skip
        elif kind == "medusa":
            outs = module(target.norm(hs[-1]))
            loss = 0.0
            for j, logits in enumerate(outs):
                ahead = j + 1  # the head predicts targets[i + ahead] (the token j + 2 places after position i)
                ok = supervised[:, : -ahead].clone()
                for a in range(1, ahead + 1):
                    ok &= supervised[:, a : a + ok.shape[1]]
                lg = logits[:, : -ahead][ok]
                tg = targets[:, ahead:][ok]
                loss = loss + F.cross_entropy(lg, tg)
                metrics[f"head{j}_top1"] = float((lg.argmax(-1) == tg).float().mean())
        elif kind == "shared-exit":
            # LayerSkip's early-exit loss: one head reads every layer, deeper layers weigh more (scale ~ sum 0..l)
            scale = torch.tensor([sum(range(li + 2)) for li in range(cfg.layers - 1)], dtype=torch.float32)
            scale = scale / scale.sum()
            loss = 0.0
            for li in range(cfg.layers - 1):
                logits = module.lm_head[0](module.norm[0](hs[li]))
                loss = loss + scale[li] * _kl(logits, final, text)
                if li in (2, 5, 8):
                    metrics[f"layer{li}_top1"] = float((logits[supervised].argmax(-1) == final[supervised].argmax(-1))
                                                       .float().mean())  # fmt: skip
        else:
            loss = 0.0
            for li in range(cfg.layers - 1):
                logits = module.lm_head[li](module.norm[li](hs[li]))
                loss = loss + _kl(logits, final, text)
                # CALM's classifier: does this layer's exit already agree with the full model? (heads not moved)
                agree = (logits.argmax(-1) == final.argmax(-1)).float()
                score = module.confidence[li](hs[li]).squeeze(-1)
                loss = loss + 0.2 * F.binary_cross_entropy_with_logits(score[text], agree[text])
                if li in (2, 5, 8):
                    metrics[f"layer{li}_top1"] = float((logits[supervised].argmax(-1) == final[supervised].argmax(-1))
                                                       .float().mean())  # fmt: skip
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps:
            record_step(history, step, steps, loss, metrics, start, log)
    info = {
        "kind": kind,
        "base_sha256": manifest["sha256"],
        "seed": seed,
        "steps": steps,
        "batch_images": batch,
        "questions_per_image": n_questions,
        "learning_rate": lr,
        "threads": threads,
        "parameters": n_params,
        "train_seconds": round(time.perf_counter() - start, 1),
        "torch_version": torch.__version__,
        "history": history,
    }
    if kind == "draft":
        info["config"] = module.cfg.to_dict()
    if kind == "medusa":
        info["heads"] = heads
    return module, info


def save(module: nn.Module, out_dir: Path, info: dict, kind: str) -> Path:
    """Write ``weights.npz`` (float32, no pickle) with the NumPy names and ``manifest.json`` with its sha256."""
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in module.state_dict().items()}
    if kind == "medusa":
        state = {f"medusa.{k.split('.')[1]}.{k.split('.')[0]}.{k.split('.', 2)[2]}": v for k, v in state.items()}
    elif kind in ("exits", "shared-exit"):
        state = {f"exit.{k.split('.')[1]}.{k.split('.')[0]}.{k.split('.', 2)[2]}": v for k, v in state.items()}
    path = out_dir / "weights.npz"
    np.savez_compressed(path, **state)
    manifest = dict(info, weights_file=path.name, sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
                    weights_bytes=path.stat().st_size)  # fmt: skip
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", choices=sorted(STEPS), required=True)
    ap.add_argument("--steps", type=int, default=None, help=f"default per kind: {STEPS}")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--questions", type=int, default=4, help="question segments per image (plus the caption)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--layers", type=int, default=2, help="draft decoder layers")
    ap.add_argument("--heads", type=int, default=3, help="Medusa heads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help=f"default: {DECODING_DIR}/KIND")
    a = ap.parse_args(argv)
    steps = STEPS[a.kind] if a.steps is None else a.steps
    module, info = train(a.kind, steps, a.batch, a.questions, a.lr, a.seed, a.threads, a.layers, a.heads,
                         log=lambda m: print(m, flush=True))  # fmt: skip
    info["command"] = "python -m kernels_torch.tinyvlm.train_decoding " + " ".join(sys.argv[1:] if argv is None else argv)
    path = save(module, a.out or DECODING_DIR / a.kind, info, a.kind)
    print(f"wrote {path} ({path.stat().st_size / 1e3:.0f} kB) in {info['train_seconds']} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
