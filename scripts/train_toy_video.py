"""Train the embedded toy video model (vtprune.toy_video, a tiny Qwen3-VL) from scratch on CPU.

The toy LLaVA's recipe (scripts/train_toy_vlm.py, shared notes "toy-vlm-training"), for clips:
  stage 1  the vision tower alone: each merged token (the merger's output, and the deepstack merger's)
           predicts the colour and the shape of the object in its 32-pixel cell (0 = background),
           on the temporal slices of rendered clips.
  stage 2  tower frozen; its features (merger + deepstack) computed once for a pool of clips (fp16 in
           RAM); the language model trained on several questions about the same clip in one multi-turn
           sequence "<s> USER: <clip> q1 ASSISTANT: a1 </s> USER: q2 ...", loss on every answer and the
           eos after it, questions sampled fresh every step.  In half of the sequences a random share
           (0-95%) of the video tokens is masked out (positions kept, as pruning leaves them): token
           dropout, so that the model reads whatever tokens a method keeps, as real VLMs tolerate
           missing tokens.  Without it the model leans on the background tokens: keeping exactly the
           object tokens (19 of 128) scored 0.68.
Validation (and --stop-at) uses clips of another seed; the final numbers are on toy_video.eval_split().

Example:  python scripts/train_toy_video.py --out vtprune/assets/toy_video
"""

import argparse
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see train_toy_vlm.py

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_toy_vlm import add_turns, lr_at, optimizer_step, save_ckpt  # noqa: E402 (shared with the image toy)

from vtprune import toy_video as tv  # noqa: E402

VOCAB = tv.vocab()
COLOR_IDS = {c: i + 1 for i, c in enumerate(tv.COLORS)}
SHAPE_IDS = {s: i + 1 for i, s in enumerate(tv.SHAPES)}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=tv.DEFAULT_PATH)
    p.add_argument("--steps", type=int, default=5000, help="stage-2 steps")
    p.add_argument("--stage1-steps", type=int, default=600)
    p.add_argument("--stage1-clips", type=int, default=1200, help="clips rendered for stage 1")
    p.add_argument("--stage1-batch", type=int, default=6, help="clips per stage-1 step (8 slices each)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--pool", type=int, default=10000, help="clips whose tower features are precomputed")
    p.add_argument("--questions", type=int, default=5, help="questions per sequence")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--eval-n", type=int, default=250)
    p.add_argument("--stop-at", type=float, default=0.995)
    p.add_argument("--ckpt-dir", default="/tmp/vtprune_toy_video_ckpt")
    p.add_argument("--resume", action="store_true", help="continue from --ckpt-dir/last.pt")
    p.add_argument("--init", default=None, help="start stage 2 from this saved model (its tower; stage 1 skipped)")
    p.add_argument("--token-dropout", type=float, default=0.5, help="share of sequences with video tokens masked")
    p.add_argument("--features-cache", default=None, help="save (or reuse) the pool's tower features here")
    return p.parse_args()


# ------------------------------------------------------------------------------ stage 1

def token_labels(clip):
    """Colour and shape ids of each merged token of each slice, ``[SLICES * 16]`` each (raster order)."""
    colors = torch.zeros(tv.SLICES, tv.TOKENS_PER_SLICE, dtype=torch.long)
    shapes = torch.zeros_like(colors)
    for s in range(tv.SLICES):
        for o in tv.objects_at(clip, s):
            colors[s, o["cell"]] = COLOR_IDS[o["color"]]
            shapes[s, o["cell"]] = SHAPE_IDS[o["shape"]]
    return colors.flatten(), shapes.flatten()


def tower(model, frames_list):
    parts = [tv.pixels(f) for f in frames_list]
    out = model.model.visual(torch.cat([p["pixel_values_videos"] for p in parts]),
                             grid_thw=torch.cat([p["video_grid_thw"] for p in parts]))
    return out.pooler_output, out.deepstack_features


def train_tower(model, args):
    rng = np.random.default_rng(args.seed + 100)
    clips = [tv.make_clip(rng) for _ in range(args.stage1_clips)]
    frames = [tv.render(c) for c in tqdm(clips, desc="render stage-1 clips")]
    labels = [token_labels(c) for c in clips]
    visual = model.model.visual
    d = model.config.vision_config.out_hidden_size
    heads = torch.nn.ModuleList([torch.nn.ModuleDict({"color": torch.nn.Linear(d, len(COLOR_IDS) + 1),
                                                      "shape": torch.nn.Linear(d, len(SHAPE_IDS) + 1)})
                                 for _ in range(1 + len(visual.deepstack_visual_indexes))])
    params = list(visual.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, args.stage1_steps, 50))
    visual.train()
    bar = tqdm(range(args.stage1_steps), desc="stage 1 (tower)")
    for step in bar:
        idx = rng.integers(len(clips), size=args.stage1_batch)
        merged, deep = tower(model, [frames[i] for i in idx])
        colors = torch.cat([labels[i][0] for i in idx])
        shapes = torch.cat([labels[i][1] for i in idx])
        loss = sum(F.cross_entropy(h["color"](x), colors) + F.cross_entropy(h["shape"](x), shapes)
                   for h, x in zip(heads, [merged] + list(deep)))
        optimizer_step(loss, opt, sched, params, bar, step)
    visual.eval()
    with torch.no_grad():  # held-out token accuracy of the merger head
        test = [tv.make_clip(rng) for _ in range(24)]
        merged, _ = tower(model, [tv.render(c) for c in test])
        colors = torch.cat([token_labels(c)[0] for c in test])
        shapes = torch.cat([token_labels(c)[1] for c in test])
        obj = colors > 0
        acc_c = (heads[0]["color"](merged).argmax(-1) == colors)[obj].float().mean().item()
        acc_s = (heads[0]["shape"](merged).argmax(-1) == shapes)[obj].float().mean().item()
    print(f"stage 1 done, loss {loss.item():.4f}; held-out object tokens: colour {acc_c:.3f}, shape {acc_s:.3f}",
          flush=True)


def pool_clips(args):
    rng = np.random.default_rng(args.seed + 200)
    return [tv.make_clip(rng) for _ in range(args.pool)]


@torch.no_grad()
def pool_features(model, args):
    clips = pool_clips(args)
    d = model.config.vision_config.out_hidden_size
    levels = 1 + len(model.model.visual.deepstack_visual_indexes)
    feats = torch.empty(args.pool, levels, tv.NUM_VIDEO_TOKENS, d, dtype=torch.float16)
    step = 16
    for s in tqdm(range(0, args.pool, step), desc="pool features"):
        chunk = clips[s:s + step]
        merged, deep = tower(model, [tv.render(c) for c in chunk])
        for k, x in enumerate([merged] + list(deep)):
            feats[s:s + len(chunk), k] = x.view(len(chunk), tv.NUM_VIDEO_TOKENS, d).half()
    return clips, feats


# ------------------------------------------------------------------------------ stage 2

def build_sequences(clips, rng, n_questions):
    """Multi-turn token ids (right padded), attention mask and (row, position, target) loss triples."""
    prefix = tv.prompt_ids("")[:-1]  # "<s> USER: <clip>"
    rows, targets = [], []
    for b, clip in enumerate(clips):
        rows.append(add_turns(list(prefix), tv.make_questions(clip, rng, n_questions), VOCAB, b, targets))
    width = max(max(len(r) for r in rows), len(prefix) + 10 * n_questions)  # a fixed width: faster on CPU
    ids = torch.full((len(rows), width), VOCAB["<pad>"], dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, :len(r)] = torch.tensor(r)
        mask[b, :len(r)] = 1
    t = torch.tensor(targets)
    return ids, mask, t[:, 0], t[:, 1], t[:, 2]


def positions(model, ids, mask):
    """Qwen3-VL's 3-D positions of right-padded rows (every row has the clip at the same place)."""
    grid = torch.tensor([[tv.SLICES, tv.FRAME // tv.PATCH, tv.FRAME // tv.PATCH]])
    full = torch.ones(1, ids.shape[1], dtype=torch.long)
    row = torch.where(ids[:1] == VOCAB["<pad>"], VOCAB["?"], ids[:1])  # one full-width row
    pos, _ = model.model.get_rope_index(row, (row == VOCAB[tv.VIDEO_PAD]).int() * 2, video_grid_thw=grid,
                                        attention_mask=full)
    return pos.expand(-1, ids.shape[0], -1)


def token_dropout(ids, mask, rng, share):
    """Mask a random share (uniform in 0..0.95) of the video tokens of ``share`` of the rows."""
    mask = mask.clone()
    video = ids == VOCAB[tv.VIDEO_PAD]
    for b in range(len(ids)):
        if rng.random() < share:
            rate = rng.uniform(0.0, 0.95)
            gone = torch.from_numpy(rng.random(ids.shape[1]) < rate) & video[b]
            mask[b, gone] = 0
    return mask


def lm_loss(model, feats, ids, mask, pos, rows, at, tgt):
    embeds = model.get_input_embeddings()(ids)
    video = ids == VOCAB[tv.VIDEO_PAD]
    feats = feats.float()
    embeds = embeds.masked_scatter(video[..., None], feats[:, 0].reshape(-1, feats.shape[-1]))
    deep = [feats[:, k].reshape(-1, feats.shape[-1]) for k in range(1, feats.shape[1])]
    hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos,
                                        visual_pos_masks=video, deepstack_visual_embeds=deep).last_hidden_state
    return F.cross_entropy(model.lm_head(hidden[rows, at]).float(), tgt)


def show_eval(tag, res, prior):
    parts = "  ".join(f"{t} {res['by_type'][t]:.2f} (prior {prior[t]:.2f})" for t in tv.QUESTION_TYPES)
    print(f"[{tag}] overall {res['overall']:.3f} event {res['event']:.3f} | {parts}", flush=True)


def train_lm(model, clips, feats, args, start_step=0, opt_state=None):
    model.model.visual.requires_grad_(False)
    params = [p for n, p in model.named_parameters() if not n.startswith("model.visual")]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    if opt_state:
        opt.load_state_dict(opt_state)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, args.steps, 100),
                                              last_epoch=start_step - 1 if start_step else -1)
    val = tv.eval_split(args.eval_n, seed=args.seed + 777)
    prior = tv.type_prior(val)
    ckpt = os.path.join(args.ckpt_dir, "last.pt")
    pos = None
    bar = tqdm(range(start_step, args.steps), desc="stage 2 (LLM)", initial=start_step, total=args.steps)
    for step in bar:
        rng = np.random.default_rng([args.seed, step])
        idx = rng.integers(len(clips), size=args.batch)
        ids, mask, rows, at, tgt = build_sequences([clips[i] for i in idx], rng, args.questions)
        if pos is None or pos.shape[-1] != ids.shape[1]:
            pos = positions(model, ids, mask)
        mask = token_dropout(ids, mask, rng, args.token_dropout)
        model.train()
        loss = lm_loss(model, feats[torch.from_numpy(idx)], ids, mask, pos[:, :len(ids)], rows, at, tgt)
        optimizer_step(loss, opt, sched, params, bar, step)
        done = step + 1
        if done % args.eval_every == 0 or done == args.steps:
            model.eval()
            res = tv.evaluate(model, val, progress=False)
            show_eval(f"step {done} val", res, prior)
            save_ckpt(ckpt, model, opt, 2, done)
            if res["overall"] >= args.stop_at:
                print(f"validation accuracy {res['overall']:.3f} >= {args.stop_at}: stopping", flush=True)
                break
    model.eval()


def main():
    args = parse_args()
    t0 = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from transformers import Qwen3VLForConditionalGeneration

    model = Qwen3VLForConditionalGeneration(tv.build_config())
    model.set_attn_implementation("sdpa")
    if args.init:
        model.load_state_dict(Qwen3VLForConditionalGeneration.from_pretrained(args.init).state_dict())
        save_ckpt(os.path.join(args.ckpt_dir, "last.pt"), model, None, 1, 0)
        args.resume = True
        print(f"stage 2 starts from {args.init} (its tower frozen; stage 1 skipped)", flush=True)
    ckpt, start_step, opt_state = os.path.join(args.ckpt_dir, "last.pt"), 0, None
    state = torch.load(ckpt, weights_only=False) if args.resume and os.path.exists(ckpt) else None
    if state:
        model.load_state_dict(state["model"])
        start_step, opt_state = (state["step"], state["opt"]) if state["stage"] == 2 else (0, None)
        print(f"resumed from {ckpt}: stage {state['stage']} step {state['step']}", flush=True)
    if not state:
        train_tower(model, args)
        save_ckpt(ckpt, model, None, 1, 0)
        print(f"[{time.time() - t0:.0f}s] stage 1 saved", flush=True)
    model.eval()
    if args.features_cache and os.path.exists(args.features_cache):
        clips, feats = pool_clips(args), torch.load(args.features_cache)
    else:
        clips, feats = pool_features(model, args)
        if args.features_cache:
            torch.save(feats, args.features_cache)
    print(f"[{time.time() - t0:.0f}s] pool features ready", flush=True)
    train_lm(model, clips, feats, args, start_step, opt_state)
    print(f"[{time.time() - t0:.0f}s] stage 2 done", flush=True)

    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out)
    tv.build_tokenizer().save_pretrained(args.out)
    model, _ = tv.load(args.out)
    samples = tv.eval_split(args.eval_n)
    show_eval(f"final eval_split({args.eval_n})", tv.evaluate(model, samples), tv.type_prior(samples))
    size = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out) if f.endswith(".safetensors"))
    print(f"weights: {size / 1e6:.2f} MB in {args.out}; total wall time {(time.time() - t0) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
