"""Train the tiny VLM on the shapes world, on CPU, and write the shipped weights and manifest.

    python -m kernels_torch.tinyvlm.train --out mllm_ref/tinyvlm/weights

Each training image carries several packed segments (``<bos> question <sep> answer <eos>`` and the caption);
every segment attends to the image and to its own earlier tokens only, with positions restarting after the
image, so the packing changes nothing the model computes for a single question at inference — it only reuses
one image encoding for several supervised answers. The loss is the cross-entropy of the answer tokens and the
final ``<eos>``, plus an auxiliary per-patch loss on the encoder output: small linear heads (used only in
training, not shipped) predict the colour, shape and size of the object covering each patch and whether the
patch holds an object's centre, and where that centre is (column and row); and the visual tokens of an
object's patches are pulled towards the decoder's word embeddings of its colour, shape and size; and head 0 of
decoder layer 0 is taught to look objects up: a question word naming an object (its shape or colour) puts its
attention on that object's patches; and the first two dimensions of an object's visual tokens carry the column
and row of its centre. None of this changes the network; it only shapes what training finds. The
dense signal teaches the encoder what is where long before the answers alone
would. With ``--visual-dropout P`` (0.5 by default, as the shipped model was trained; 0 turns it off) each image,
with probability ``P``, loses a random share of its visual tokens inside the decoder after a random layer, as
token-dropping methods do at inference; ``--layers`` sets the decoder depth (12 by default, as shipped).
Everything is seeded: the scene stream comes from
``numpy.random.default_rng(seed)`` and the initialisation from ``torch.manual_seed(seed)``; with the same thread
count the run is reproducible.
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

from kernels_torch.tinyvlm.model import TinyVLM, param_count
from mllm_ref.tinyvlm import tokenizer as tok
from mllm_ref.tinyvlm import world
from mllm_ref.tinyvlm.config import TinyVLMConfig
from mllm_ref.tinyvlm.world import EVAL_SEED


def _named_object(scene: world.Scene, word: str) -> int:
    """Index of the object a shape or colour word names in ``scene``, or -1."""
    for i, o in enumerate(scene.objects):
        if word in (o.shape, o.color):
            return i
    return -1


def make_segments(scene: world.Scene, rng: np.random.Generator, n_questions: int):
    """Segments for one image: (ids, prompt length, named objects) for ``n_questions`` questions and the caption.

    ``named objects`` gives, for each token of the segment, the index of the object a question word names (the
    shape or colour word that identifies it), or -1.

    Question types are drawn uniformly among the types the scene has, so every type is trained about equally
    often whatever its number of templates.
    """
    by_type: dict[str, list[world.QA]] = {}
    for qa in world.all_questions(scene):
        by_type.setdefault(qa.qtype, []).append(qa)
    types = sorted(by_type)
    segs = []
    for _ in range(n_questions):
        pool = by_type[types[int(rng.integers(len(types)))]]
        qa = pool[int(rng.integers(len(pool)))]
        p = tok.prompt_ids(qa.question)
        ids = p + tok.encode(qa.answer) + [tok.EOS]
        named = [-1] + [_named_object(scene, w) for w in qa.question.split()] + [-1] * (len(ids) - len(p))
        segs.append((ids, len(p), named))
    p = tok.prompt_ids(tok.CAPTION_PROMPT)
    ids = p + tok.encode(world.caption(scene)) + [tok.EOS]
    segs.append((ids, len(p), [-1] * len(ids)))
    return segs


def make_batch(rng: np.random.Generator, batch: int, n_questions: int, n_vis: int, with_lookup: bool = True):
    """Images, packed tokens, positions, attention mask and loss targets for ``batch`` fresh scenes.

    ``n_vis`` visual tokens come first; with ``with_lookup`` they are the patches of a square grid and the
    attention-supervision targets are filled (a connector variant's query tokens have none: all False)."""
    images, rows, labels, owners = [], [], [], []
    for _ in range(batch):
        scene = world.make_scene(rng)
        images.append(world.render(scene))
        rows.append(make_segments(scene, rng, n_questions))
        labels.append(patch_labels(scene))
        if with_lookup:
            owners.append(world.patch_objects(scene, world.IMAGE_SIZE // int(np.sqrt(n_vis))).reshape(-1))
    t = max(sum(len(ids) for ids, _, _ in segs) for segs in rows)
    tokens = np.full((batch, t), tok.PAD, dtype=np.int64)
    positions = np.zeros((batch, t), dtype=np.int64)
    seg_id = np.full((batch, t), -1, dtype=np.int64)
    targets = np.full((batch, t), -100, dtype=np.int64)  # target for the logit at text position i
    # lookup[b, i, j]: text token i names the object that covers patch j (attention supervision)
    lookup = np.zeros((batch, t, n_vis), dtype=bool)
    for b, segs in enumerate(rows):
        at = 0
        for s, (ids, plen, named) in enumerate(segs):
            n = len(ids)
            tokens[b, at : at + n] = ids
            positions[b, at : at + n] = 1 + np.arange(n)
            seg_id[b, at : at + n] = s
            # the logit after token i predicts token i+1; supervise the answer tokens and <eos>
            targets[b, at + plen - 1 : at + n - 1] = ids[plen:]
            for j, obj in enumerate(named):
                if obj >= 0 and with_lookup:
                    lookup[b, at + j] = owners[b] == obj + 1
            at += n
    full = n_vis + t
    causal = np.tril(np.ones((full, full), dtype=bool))
    same = np.ones((batch, full, full), dtype=bool)
    same[:, n_vis:, n_vis:] = seg_id[:, :, None] == seg_id[:, None, :]
    mask = causal[None] & same
    img = np.stack(images).astype(np.float32) / 255.0
    return (
        torch.from_numpy(img),
        torch.from_numpy(tokens),
        torch.from_numpy(positions),
        torch.from_numpy(mask),
        torch.from_numpy(targets),
        torch.from_numpy(np.stack(labels)),
        torch.from_numpy(lookup),
    )


def patch_labels(scene: world.Scene, patch: int = 4) -> np.ndarray:
    """``int64[N, 6]`` per patch: colour, shape and size class of the object on it (0 = none), 1 if the patch
    holds an object's centre, and the column and row of that object's centre (1 + patch index, 0 = none)."""
    owner = world.patch_objects(scene, patch).reshape(-1)
    colors, shapes, sizes = list(world.COLORS), list(world.SHAPES), list(world.SIZES)
    out = np.zeros((owner.size, 6), dtype=np.int64)
    g = world.IMAGE_SIZE // patch
    for i, obj in enumerate(scene.objects):
        on = owner == i + 1
        col, row = int(obj.x // patch), int(obj.y // patch)
        out[on, 0] = colors.index(obj.color) + 1
        out[on, 1] = shapes.index(obj.shape) + 1
        out[on, 2] = sizes.index(obj.size) + 1
        out[row * g + col, 3] = 1
        out[on, 4] = col + 1
        out[on, 5] = row + 1
    return out


class AuxHeads(torch.nn.Module):
    """Per-patch classifiers on the encoder output, for training only."""

    def __init__(self, dim: int, grid: int):
        super().__init__()
        self.heads = torch.nn.ModuleList(
            torch.nn.Linear(dim, n)
            for n in (len(world.COLORS) + 1, len(world.SHAPES) + 1, len(world.SIZES) + 1, 2, grid + 1, grid + 1)
        )

    def loss(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return sum(
            F.cross_entropy(h(features).reshape(-1, h.out_features), labels[..., j].reshape(-1))
            for j, h in enumerate(self.heads)
        ) / len(self.heads)


def coordinate_loss(visual: torch.Tensor, labels: torch.Tensor, grid: int) -> torch.Tensor:
    """Make the object's centre readable along fixed directions of its visual tokens: dimensions 0 and 1 of
    each object patch's visual token should equal the column and row of its object's centre, scaled to [-1, 1].
    Comparing two objects' positions is then a subtraction the decoder can learn at once."""
    on = labels[..., 4] > 0
    target = torch.stack([labels[..., 4], labels[..., 5]], dim=-1).to(visual.dtype)
    target = (target - 0.5) / grid * 2 - 1
    err = (visual[..., :2] - target) ** 2
    return (err.sum(-1) * on).sum() / on.sum().clamp(min=1)


#: Token ids of the words naming each colour, shape and size class (index 0, "no object", has none).
_WORD_IDS = [
    torch.tensor([tok.INDEX[w] for w in names])
    for names in (list(world.COLORS), list(world.SHAPES), list(world.SIZES))
]


def lookup_loss(log_attn: torch.Tensor, lookup: torch.Tensor) -> torch.Tensor:
    """Teach decoder layer 0, head 0 to look objects up: a question word that names an object should put its
    attention on that object's patches. ``log_attn``: ``[B, T, N]`` log weights of text tokens over visual tokens;
    ``lookup``: bool ``[B, T, N]``. The loss is the negative log of the attention mass on the named object."""
    rows = lookup.any(-1)
    if not rows.any():
        return log_attn.sum() * 0.0
    mass = torch.logsumexp(log_attn.masked_fill(~lookup, float("-inf")), dim=-1)
    return -(mass[rows]).mean()


def word_alignment_loss(visual: torch.Tensor, embed: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Align each object patch's visual token with the word embeddings of its colour, shape and size.

    The logits are the visual tokens' dot products with the decoder's word embeddings; on patches that hold an
    object the three words naming it are positives (sigmoid cross-entropy against every other word). A
    question word then finds its object by plain dot-product attention.
    """
    logits = visual @ embed.T  # [B, N, V]
    target = torch.zeros_like(logits)
    on = labels[..., 0] > 0
    for j, ids in enumerate(_WORD_IDS):
        cls = labels[..., j].clamp(min=1) - 1
        target.scatter_(-1, ids[cls][..., None], on[..., None].to(target.dtype))
    per_patch = F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(-1)
    return (per_patch * on).sum() / on.sum().clamp(min=1)


def visual_dropout_mask(rng: np.random.Generator, batch: int, cfg: TinyVLMConfig, p: float):
    """Token dropping as augmentation: each image, with probability ``p``, loses a random share (uniform in
    [0.25, 0.9]) of its visual tokens for the decoder layers after one random layer (the same for the batch).

    Returns ``(keep bool[B, N] or None, drop_after)``. A token policy drops tokens this way at inference; a model
    trained only on whole images is brittler to it than large MLLMs are, which the augmentation corrects. With
    ``p = 0`` nothing is drawn, so the default training run is unchanged.
    """
    if p <= 0:
        return None, 0
    keep = np.ones((batch, cfg.n_patches), dtype=bool)
    for b in range(batch):
        if rng.random() < p:
            share = rng.uniform(0.25, 0.9)
            keep[b, rng.permutation(cfg.n_patches)[: int(share * cfg.n_patches)]] = False
    return torch.from_numpy(keep), int(rng.integers(0, cfg.layers - 1))


@torch.no_grad()
def quick_eval(model: TinyVLM, examples: list[world.Example]) -> dict[str, float]:
    """Accuracy per question type of the first answer word (all answers are one word) with the torch twin."""
    model.eval()
    hits: dict[str, list[bool]] = {}
    for i in range(0, len(examples), 64):
        chunk = examples[i : i + 64]
        prompts = [tok.prompt_ids(e.qa.question) for e in chunk]
        t = max(map(len, prompts))
        tokens = torch.full((len(chunk), t), tok.PAD, dtype=torch.long)
        last = []
        for j, p in enumerate(prompts):  # right-pad; read the logit at each prompt's own last token
            tokens[j, : len(p)] = torch.tensor(p)
            last.append(len(p) - 1)
        imgs = torch.from_numpy(np.stack([e.image for e in chunk]).astype(np.float32) / 255.0)
        logits = model(imgs, tokens)[:, -t:]  # the text positions (after however many visual tokens)
        pred = logits[torch.arange(len(chunk)), torch.tensor(last)].argmax(-1)
        for e, p in zip(chunk, pred.tolist()):
            hits.setdefault(e.qa.qtype, []).append(tok.VOCAB[p] == e.qa.answer)
    model.train()
    acc = {k: float(np.mean(v)) for k, v in hits.items()}
    acc["overall"] = float(np.mean([np.mean(v) for v in hits.values()]))
    return acc


def save_weights(model: TinyVLM, out_dir: Path, manifest: dict) -> Path:
    """Write ``tinyvlm.npz`` (float32 arrays, no pickle) and ``manifest.json`` with its sha256."""
    out_dir.mkdir(parents=True, exist_ok=True)
    arrays = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    path = out_dir / "tinyvlm.npz"
    np.savez_compressed(path, **arrays)
    manifest = dict(manifest)
    manifest["weights_file"] = path.name
    manifest["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    manifest["weights_bytes"] = path.stat().st_size
    manifest["parameters"] = int(sum(a.size for a in arrays.values()))
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def train(
    steps: int,
    batch: int,
    n_questions: int,
    lr: float,
    seed: int,
    threads: int,
    eval_every: int,
    aux_weight: float = 0.5,
    log=print,
    layers: int = 12,
    visual_dropout: float = 0.5,
) -> tuple[TinyVLM, dict]:
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    cfg = TinyVLMConfig(layers=layers)
    model = TinyVLM(cfg)
    aux = AuxHeads(cfg.vis_dim, cfg.grid)
    named = list(model.named_parameters()) + [("aux." + n, p) for n, p in aux.named_parameters()]
    decay = [p for n, p in named if p.ndim >= 2 and n != "pos"]
    no_decay = [p for n, p in named if p.ndim < 2 or n == "pos"]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98)
    )
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))
    )
    rng = np.random.default_rng(seed)
    dev_set = world.vqa_set(EVAL_SEED + 1, 40)  # a small dev set, disjoint from the held-out eval set
    log(f"parameters: {param_count(model):,}; steps {steps}, batch {batch} images x {n_questions + 1} segments")
    start = time.perf_counter()
    history = []
    for step in range(1, steps + 1):
        imgs, tokens, positions, mask, targets, labels, lookup = make_batch(rng, batch, n_questions, cfg.n_patches)
        keep, drop_after = visual_dropout_mask(rng, batch, cfg, visual_dropout)
        logits, features, visual, log_attn0 = model(
            imgs, tokens, positions, mask, return_features=True, visual_keep=keep, drop_after=drop_after
        )
        logits = logits[:, cfg.n_patches :]
        loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), targets.reshape(-1), ignore_index=-100)
        loss = loss + aux_weight * (
            aux.loss(features, labels)
            + 0.1 * word_alignment_loss(visual, model.embed.weight, labels)
            + lookup_loss(log_attn0[:, cfg.n_patches :, : cfg.n_patches], lookup)
            + coordinate_loss(visual, labels, cfg.grid)
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in named], 1.0)
        opt.step()
        sched.step()
        if step % eval_every == 0 or step == steps:
            acc = quick_eval(model, dev_set)
            elapsed = time.perf_counter() - start
            history.append({"step": step, "loss": float(loss.detach()), "dev_accuracy": acc["overall"], "seconds": elapsed})
            log(
                f"step {step:5d}/{steps}  loss {float(loss.detach()):.4f}  dev acc {acc['overall']:.3f}  "
                + " ".join(f"{k}={v:.2f}" for k, v in acc.items() if k != "overall")
                + f"  {elapsed:.0f}s"
            )
    info = {
        "config": cfg.to_dict(),
        "seed": seed,
        "steps": steps,
        "batch_images": batch,
        "questions_per_image": n_questions,
        "learning_rate": lr,
        "aux_weight": aux_weight,
        "visual_dropout": visual_dropout,
        "threads": threads,
        "train_seconds": round(time.perf_counter() - start, 1),
        "torch_version": torch.__version__,
        "history": history,
        "dev_accuracy_torch": quick_eval(model, dev_set),
    }
    return model, info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3600)
    ap.add_argument("--batch", type=int, default=16, help="images per step")
    ap.add_argument("--questions", type=int, default=12, help="question segments per image (plus the caption)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--aux-weight", type=float, default=0.5, help="weight of the per-patch auxiliary loss")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=300)
    ap.add_argument("--layers", type=int, default=12, help="decoder layers")
    ap.add_argument("--visual-dropout", type=float, default=0.5,
                    help="probability that an image's visual tokens are partly dropped inside the decoder")
    ap.add_argument("--out", type=Path, default=Path("mllm_ref/tinyvlm/weights"))
    args = ap.parse_args(argv)
    model, info = train(
        args.steps, args.batch, args.questions, args.lr, args.seed, args.threads, args.eval_every, args.aux_weight,
        log=lambda m: print(m, flush=True), layers=args.layers, visual_dropout=args.visual_dropout,
    )
    info["command"] = "python -m kernels_torch.tinyvlm.train " + " ".join(sys.argv[1:] if argv is None else argv)
    path = save_weights(model, args.out, info)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB) in {info['train_seconds']} s", flush=True)
    result = record_eval(args.out)
    print(f"held-out accuracy (NumPy forward): {result['accuracy']:.3f} {result['by_type']}", flush=True)
    return 0


def record_eval(folder: Path, n_per_type: int = 100, n_captions: int = 100) -> dict:
    """Evaluate the saved weights with the NumPy forward (as ``mllm-ref eval`` does) and record the result in the
    manifest under ``"eval"``."""
    from mllm_ref.tinyvlm.evaluate import evaluate
    from mllm_ref.tinyvlm.model import load

    result = evaluate(load(folder), n_per_type, n_captions=n_captions).to_json()
    result["command"] = f"mllm-ref eval --n {n_per_type} --captions {n_captions}"
    manifest_path = Path(folder) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["eval"] = result
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return result


if __name__ == "__main__":
    raise SystemExit(main())
