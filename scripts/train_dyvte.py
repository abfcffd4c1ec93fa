"""Train DyVTE routers (when may the visual tokens leave the LLM?) with the base model frozen.

    python scripts/train_dyvte.py                                  # the shipped toy model, toy questions
    python scripts/train_dyvte.py --model PATH --data train.jsonl --out routers.safetensors

JSONL lines: {"image": "path.png", "question": "...", "answer": "..."}; prompts are built with
``--prompt`` (``{question}`` is replaced; it must contain the model's image placeholder).

Targets, as in the DyVTE code: for a prompt and a layer j, run the model once with every token and
once with the visual tokens gone from layer j+1 on (vtprune's exact ``exit``); the visual tokens
may leave after layer j (label 1) when the answer's greedy token is unchanged and the answer's
cross-entropy grows by less than 3%.  The router of layer j reads the text tokens' output hidden
states of layer j.  Differences from DyVTE: every router is trained on every batch (DyVTE samples
one layer per batch); the target uses the first answer token (the toy answers are one token).
Writes safetensors that ``vtprune.wrap(model, "dyvte", weights=PATH)`` loads.
"""

from __future__ import annotations

import argparse
import json
import os
import random

import torch
from tqdm.auto import tqdm

import vtprune
from vtprune.dyvte import Routers, router_input


def toy_batches(processor, batch_size, seed):
    from vtprune import toy

    rng = random.Random(seed)
    while True:
        samples = []
        while len(samples) < batch_size:
            scene = toy.make_scene(rng.randrange(2**31))
            image = toy.render(scene)
            for q in toy.make_questions(scene, rng.randrange(2**31))[:2]:
                samples.append({"image": image, "prompt": toy.prompt(q["question"]), "answer": q["answer"]})
        yield samples[:batch_size]


def jsonl_batches(path, prompt, batch_size, seed):
    from PIL import Image

    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    base = os.path.dirname(os.path.abspath(path))
    rng = random.Random(seed)
    while True:
        rng.shuffle(rows)
        for start in range(0, len(rows) - batch_size + 1, batch_size):
            yield [{"image": Image.open(os.path.join(base, r["image"])).convert("RGB"),
                    "prompt": prompt.format(question=r["question"]), "answer": r["answer"]}
                   for r in rows[start:start + batch_size]]


def first_answer_ids(tokenizer, answers):
    return torch.tensor([tokenizer(" " + a, add_special_tokens=False)["input_ids"][0] for a in answers])


def targets(model, inputs, answer_ids, layers, image_token):
    """Router inputs per layer and exit labels per layer for one batch."""
    with torch.no_grad():
        full = model(**inputs, output_hidden_states=True)
        logp = full.logits[:, -1].float().log_softmax(-1)
        ce_full = -logp.gather(1, answer_ids[:, None]).squeeze(1)
        greedy_full = logp.argmax(-1)
        visual = inputs["input_ids"] == image_token
        text = inputs["attention_mask"].bool() & ~visual
        x, y = {}, {}
        for j in layers:
            with vtprune.wrapped(model, "exit", layer=j + 1):
                out = model(**inputs).logits[:, -1].float().log_softmax(-1)
            ce = -out.gather(1, answer_ids[:, None]).squeeze(1)
            y[j] = ((out.argmax(-1) == greedy_full) & (ce < 1.03 * ce_full)).long()
            x[j] = router_input(full.hidden_states[j + 1], visual, text)
    return x, y


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="toy", help="'toy' or a local model directory")
    parser.add_argument("--data", default="toy", help="'toy' or a JSONL file of image/question/answer")
    parser.add_argument("--prompt", default="USER: <image>\n{question} ASSISTANT:")
    parser.add_argument("--out", default=None, help="router file (default: next to the toy weights)")
    parser.add_argument("--layers", default=None, help="comma-separated router layers (default 0..n-2)")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    if args.model == "toy":
        from vtprune import toy

        model, processor = toy.load()
        out = args.out or os.path.join(toy.DEFAULT_PATH, "dyvte_routers.safetensors")
    else:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        model = AutoModelForImageTextToText.from_pretrained(args.model).eval()
        processor = AutoProcessor.from_pretrained(args.model)
        out = args.out or "dyvte_routers.safetensors"
    model.requires_grad_(False)
    processor.tokenizer.padding_side = "left"
    n_layers = len(model.model.language_model.layers)
    layers = [int(j) for j in args.layers.split(",")] if args.layers else list(range(n_layers - 1))
    hidden = model.config.get_text_config().hidden_size
    routers = Routers(hidden, layers, width=args.width)
    optimizer = torch.optim.AdamW(routers.parameters(), lr=args.lr)
    batches = (toy_batches(processor, args.batch_size, args.seed) if args.data == "toy"
               else jsonl_batches(args.data, args.prompt, args.batch_size, args.seed))
    image_token = model.config.image_token_id
    rate = {j: 0.0 for j in layers}
    bar = tqdm(range(args.steps), desc="dyvte routers")
    for step in bar:
        batch = next(batches)
        inputs = processor(images=[s["image"] for s in batch], text=[s["prompt"] for s in batch],
                           padding=True, return_tensors="pt")
        answer_ids = first_answer_ids(processor.tokenizer, [s["answer"] for s in batch])
        x, y = targets(model, inputs, answer_ids, layers, image_token)
        loss = sum(torch.nn.functional.cross_entropy(routers.router(j)(x[j]), y[j]) for j in layers)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss = loss.detach()
        for j in layers:
            rate[j] = 0.9 * rate[j] + 0.1 * float(y[j].float().mean()) if step else float(y[j].float().mean())
        bar.set_postfix(loss=f"{loss.item():.3f}", **{f"exit_ok@{j}": f"{rate[j]:.2f}" for j in layers})
    routers.save(out)
    print(f"saved routers for layers {layers} to {out}")


if __name__ == "__main__":
    main()
