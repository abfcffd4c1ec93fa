"""Train the embedded toy LLaVA (vtprune.toy) from scratch on CPU.

Recipe (see shared notes "toy-vlm-training"):
  stage 1  the CLIP tower alone: pooled [CLS] -> BCE over which (colour, shape) pairs are
           present (this makes its [CLS] attention find objects, as in a contrastive CLIP),
           plus per-patch colour / shape cross-entropy (0 = background) on the layer the
           projector reads (hidden_states[-2]).
  stage 2  tower frozen; projector + LLM trained on six questions about the same scene in
           one multi-turn sequence "<s> USER: <image> q1 ASSISTANT: a1 </s> USER: q2 ...",
           loss on every answer token and the eos after it.

Speed-up: the tower is frozen in stage 2, so its features (hidden_states[-2] without
[CLS]) are computed once for a fixed pool of scenes (--pool scenes, fp16 in RAM) and
questions are sampled fresh for every step. Stage 1 trains on the same rendered pool.
Training-time evals (and early stopping, --stop-at) use a validation split with a
different seed; the final numbers are on toy.eval_split() (seed 1234).

Example:  python scripts/train_toy_vlm.py --out vtprune/assets/toy_llava
"""

import argparse
import math
import os
import sys
import time

# OpenMP threads that sleep instead of spinning: on a shared 2-core machine a spinning
# 2-thread torch slows down ~9x as soon as another process takes a core (measured).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from vtprune import toy  # noqa: E402

VOCAB = toy.vocab()
COLOR_IDS = {c: i + 1 for i, c in enumerate(toy.COLORS)}
SHAPE_IDS = {s: i + 1 for i, s in enumerate(toy.SHAPES)}
PAIR_IDS = {(c, s): i for i, (c, s) in enumerate((c, s) for c in toy.COLORS for s in toy.SHAPES)}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=toy.DEFAULT_PATH)
    p.add_argument("--steps", type=int, default=4500, help="stage-2 steps")
    p.add_argument("--stage1-steps", type=int, default=700)
    p.add_argument("--batch", type=int, default=40)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--pool", type=int, default=16000, help="scenes whose tower features are precomputed")
    p.add_argument("--questions", type=int, default=6, help="questions per sequence")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--eval-n", type=int, default=400)
    p.add_argument("--stop-at", type=float, default=0.995, help="stop stage 2 once validation accuracy >= this")
    p.add_argument("--ckpt-dir", default="/tmp/vtprune_toy_ckpt")
    p.add_argument("--resume", action="store_true", help="continue from --ckpt-dir/last.pt")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast in stage 2 (faster on CPUs with bf16)")
    return p.parse_args()


def lr_at(step, total, warmup):
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


# ---------------------------------------------------------------------------- data

def build_pool(n, seed):
    """n scenes and their rendered images as uint8 (n, 3, H, W)."""
    rng = np.random.default_rng(seed)
    scenes = [toy.make_scene(rng) for _ in range(n)]
    images = np.empty((n, 3, toy.IMAGE_SIZE, toy.IMAGE_SIZE), np.uint8)
    for i, scene in enumerate(tqdm(scenes, desc="render pool")):
        images[i] = np.asarray(toy.render(scene)).transpose(2, 0, 1)
    return scenes, images


def to_pixels(images_u8, processor):
    """uint8 (B, 3, H, W) -> normalised float pixels, identical to the processor's output."""
    ip = processor.image_processor
    mean = torch.tensor(ip.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(ip.image_std).view(1, 3, 1, 1)
    return (torch.from_numpy(images_u8).float() / 255.0 - mean) / std


def patch_labels(scenes):
    colors = torch.zeros(len(scenes), toy.NUM_IMAGE_TOKENS, dtype=torch.long)
    shapes = torch.zeros_like(colors)
    pairs = torch.zeros(len(scenes), len(PAIR_IDS))
    for b, scene in enumerate(scenes):
        for o in scene["objects"]:
            colors[b, o["cell"]] = COLOR_IDS[o["color"]]
            shapes[b, o["cell"]] = SHAPE_IDS[o["shape"]]
            pairs[b, PAIR_IDS[(o["color"], o["shape"])]] = 1.0
    return colors, shapes, pairs


def build_sequences(scenes, rng, n_questions):
    """Multi-turn token ids (right padded) and (row, position, target) loss triples."""
    rows, targets = [], []
    for b, scene in enumerate(scenes):
        ids = [VOCAB["<s>"], VOCAB["USER:"]] + [VOCAB["<image>"]] * toy.NUM_IMAGE_TOKENS
        rows.append(add_turns(ids, toy.make_questions(scene, rng, n_questions), VOCAB, b, targets))
    # a fixed width: every new input shape costs seconds of kernel set-up on CPU
    width = max(max(len(r) for r in rows), 2 + toy.NUM_IMAGE_TOKENS + 11 * n_questions)
    ids = torch.full((len(rows), width), VOCAB["<pad>"], dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, :len(r)] = torch.tensor(r)
    t = torch.tensor(targets)
    return ids, t[:, 0], t[:, 1], t[:, 2]


# -------------------------------------------------------------------------- stage 1

def tower_forward(model, pixels):
    out = model.model.vision_tower(pixels, output_hidden_states=True)
    return out.pooler_output, out.hidden_states[model.config.vision_feature_layer][:, 1:]


def train_tower(model, images, scenes, processor, args):
    tower = model.model.vision_tower
    d = model.config.vision_config.hidden_size
    heads = torch.nn.ModuleDict({"pairs": torch.nn.Linear(d, len(PAIR_IDS)),
                                 "color": torch.nn.Linear(d, len(COLOR_IDS) + 1),
                                 "shape": torch.nn.Linear(d, len(SHAPE_IDS) + 1)})
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, args.stage1_steps, 50))
    gen = torch.Generator().manual_seed(args.seed + 1)
    tower.train()
    bar = tqdm(range(args.stage1_steps), desc="stage 1 (tower)")
    for step in bar:
        idx = torch.randint(len(scenes), (args.batch,), generator=gen)
        colors, shapes, pairs = patch_labels([scenes[i] for i in idx.tolist()])
        pooled, patches = tower_forward(model, to_pixels(images[idx.numpy()], processor))
        loss = (F.binary_cross_entropy_with_logits(heads["pairs"](pooled), pairs)
                + F.cross_entropy(heads["color"](patches).flatten(0, 1), colors.flatten())
                + F.cross_entropy(heads["shape"](patches).flatten(0, 1), shapes.flatten()))
        optimizer_step(loss, opt, sched, params, bar, step)
    tower.eval()
    print(f"stage 1 done, last loss {loss.item():.4f}", flush=True)


@torch.no_grad()
def tower_features(model, images, processor, batch=64):
    feats = torch.empty(len(images), toy.NUM_IMAGE_TOKENS, model.config.vision_config.hidden_size,
                        dtype=torch.float16)
    for s in tqdm(range(0, len(images), batch), desc="pool features"):
        feats[s:s + batch] = tower_forward(model, to_pixels(images[s:s + batch], processor))[1].half()
    return feats


# -------------------------------------------------------------------------- stage 2

def lm_loss(model, feats, ids, rows, pos, tgt):
    embeds = model.get_input_embeddings()(ids)
    image = model.model.multi_modal_projector(feats.float())
    start = 2  # "<s> USER:" precede the image tokens in every sequence
    embeds = torch.cat([embeds[:, :start], image, embeds[:, start + toy.NUM_IMAGE_TOKENS:]], dim=1)
    hidden = model.model.language_model(inputs_embeds=embeds).last_hidden_state
    logits = model.lm_head(hidden[rows, pos])
    return F.cross_entropy(logits.float(), tgt)


def show_eval(tag, res, prior):
    parts = "  ".join(f"{t} {res['by_type'][t]:.2f} (prior {prior[t]:.2f})" for t in toy.QUESTION_TYPES)
    print(f"[{tag}] overall {res['overall']:.3f} | {parts}", flush=True)


def add_turns(ids, questions, vocab, row, targets):
    """Append one turn per question to ``ids`` (``USER:`` before all but the first, the question, ``ASSISTANT:``,
    the answer, ``</s>``) and its loss triples ``(row, position, target)`` to ``targets``; returns ``ids``."""
    for k, q in enumerate(questions):
        if k:
            ids.append(vocab["USER:"])
        ids += [vocab[w] for w in q["question"].split()] + [vocab["ASSISTANT:"]]
        targets.append((row, len(ids) - 1, vocab[q["answer"]]))
        ids.append(vocab[q["answer"]])
        targets.append((row, len(ids) - 1, vocab["</s>"]))
        ids.append(vocab["</s>"])
    return ids


def optimizer_step(loss, opt, sched, params, bar, step):
    """Back-propagate ``loss``, clip the gradients of ``params`` to norm 1, step ``opt`` and ``sched``; every
    10 steps show the loss on ``bar``."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()
    if step % 10 == 0:
        bar.set_postfix(loss=f"{loss.item():.3f}")


def save_ckpt(path, model, opt, stage, step):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict() if opt else None,
                "stage": stage, "step": step}, tmp)
    os.replace(tmp, path)


def train_lm(model, feats, scenes, processor, args, start_step=0, opt_state=None):
    model.model.vision_tower.requires_grad_(False)
    params = [p for n, p in model.named_parameters() if "vision_tower" not in n]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    if opt_state:
        opt.load_state_dict(opt_state)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, args.steps, 100),
                                              last_epoch=start_step - 1 if start_step else -1)
    val = toy.eval_split(args.eval_n, seed=args.seed + 777)
    prior = toy.type_prior(val)
    ckpt = os.path.join(args.ckpt_dir, "last.pt")
    bar = tqdm(range(start_step, args.steps), desc="stage 2 (LLM)", initial=start_step, total=args.steps)
    for step in bar:
        rng = np.random.default_rng([args.seed, step])
        idx = rng.integers(len(scenes), size=args.batch)
        ids, rows, pos, tgt = build_sequences([scenes[i] for i in idx], rng, args.questions)
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss = lm_loss(model, feats[torch.from_numpy(idx)], ids, rows, pos, tgt)
        optimizer_step(loss, opt, sched, params, bar, step)
        done = step + 1
        if done % args.eval_every == 0 or done == args.steps:
            model.eval()
            res = toy.evaluate(model, processor, val, progress=False)
            show_eval(f"step {done} val", res, prior)
            save_ckpt(ckpt, model, opt, 2, done)
            if res["overall"] >= args.stop_at:
                print(f"validation accuracy {res['overall']:.3f} >= {args.stop_at}: stopping", flush=True)
                break
    model.eval()


# ------------------------------------------------------------------------ reports

class RandomVisualDrop(torch.nn.Module):
    """Emulates pruning: masks a random share of the image tokens, positions unchanged."""

    def __init__(self, model, drop=0.9, seed=0):
        super().__init__()
        self.model, self.drop, self.gen = model, drop, torch.Generator().manual_seed(seed)

    def forward(self, input_ids, attention_mask, pixel_values, **kwargs):
        mask = attention_mask.clone()
        for b in range(len(input_ids)):
            where = (input_ids[b] == self.model.config.image_token_index).nonzero().squeeze(1)
            n_drop = int(round(self.drop * len(where)))
            mask[b, where[torch.randperm(len(where), generator=self.gen)[:n_drop]]] = 0
        position_ids = torch.arange(input_ids.shape[1]).expand_as(input_ids)
        return self.model(input_ids=input_ids, attention_mask=mask, pixel_values=pixel_values,
                          position_ids=position_ids, **kwargs)


@torch.no_grad()
def cls_object_share(model, processor, n=400, seed=1234, layer=-2):
    """Share of object patches among the top-k [CLS]->patch attention of a tower layer."""
    attn = model.model.vision_tower.encoder.layers[layer].self_attn
    grabbed = {}
    hooks = [attn.q_proj.register_forward_hook(lambda m, i, o: grabbed.__setitem__("q", o)),
             attn.k_proj.register_forward_hook(lambda m, i, o: grabbed.__setitem__("k", o))]
    items = toy._split_items(n, seed)
    hits = {"k=objects": [], "k=16": []}
    try:
        for s in range(0, n, 50):
            chunk = items[s:s + 50]
            pix = processor.image_processor([toy.render(sc) for sc, _ in chunk], return_tensors="pt")
            model.model.vision_tower(pix["pixel_values"])
            q, k = grabbed["q"], grabbed["k"]
            B, N, D = q.shape
            H = attn.num_heads
            qh = q.view(B, N, H, D // H).transpose(1, 2)[:, :, :1]
            kh = k.view(B, N, H, D // H).transpose(1, 2)
            cls = ((qh @ kh.transpose(-1, -2)).squeeze(2) * attn.scale).softmax(-1).mean(1)[:, 1:]
            for b, (scene, _) in enumerate(chunk):
                cells = {o["cell"] for o in scene["objects"]}
                for name, kk in (("k=objects", len(cells)), ("k=16", 16)):
                    top = set(cls[b].topk(kk).indices.tolist())
                    hits[name].append(len(top & cells) / len(cells))
    finally:
        for h in hooks:
            h.remove()
    return {name: float(np.mean(v)) for name, v in hits.items()}


def final_report(out, n):
    model, processor = toy.load(out)
    samples = toy.eval_split(n)
    prior = toy.type_prior(samples)
    full = toy.evaluate(model, processor, samples)
    show_eval(f"final eval_split({n}) unpruned", full, prior)
    dropped = toy.evaluate(RandomVisualDrop(model, 0.9), processor, samples)
    show_eval(f"final eval_split({n}) random 90% visual tokens dropped", dropped, prior)
    share = cls_object_share(model, processor, n)
    print(f"[CLS]->patch attention (tower layer -2): share of objects in top-k: "
          + ", ".join(f"{k} {v:.3f}" for k, v in share.items()), flush=True)
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".safetensors"))
    print(f"weights: {size / 1e6:.2f} MB in {out}", flush=True)


def main():
    args = parse_args()
    t0 = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from transformers import LlavaForConditionalGeneration

    processor = toy.build_processor()
    model = LlavaForConditionalGeneration(toy.build_config())
    model.set_attn_implementation("sdpa")
    ckpt, start_step, opt_state = os.path.join(args.ckpt_dir, "last.pt"), 0, None
    state = torch.load(ckpt, weights_only=False) if args.resume and os.path.exists(ckpt) else None
    if state:
        model.load_state_dict(state["model"])
        start_step, opt_state = (state["step"], state["opt"]) if state["stage"] == 2 else (0, None)
        print(f"resumed from {ckpt}: stage {state['stage']} step {state['step']}", flush=True)

    scenes, images = build_pool(args.pool, args.seed + 100)
    if not state:
        train_tower(model, images, scenes, processor, args)
        save_ckpt(ckpt, model, None, 1, 0)
        print(f"[{time.time() - t0:.0f}s] stage 1 saved", flush=True)
    model.eval()
    feats = tower_features(model, images, processor)
    del images
    print(f"[{time.time() - t0:.0f}s] pool features ready", flush=True)
    train_lm(model, feats, scenes, processor, args, start_step, opt_state)
    print(f"[{time.time() - t0:.0f}s] stage 2 done", flush=True)

    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out)
    processor.save_pretrained(args.out)
    final_report(args.out, args.eval_n)
    print(f"total wall time {(time.time() - t0) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
