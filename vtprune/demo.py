"""``vtprune demo``: the embedded toy LLaVA answering questions unpruned and pruned, offline."""

from __future__ import annotations

import time

import torch

from . import toy
from .api import last_kept, stats, unwrap, wrap
from .viz import overlay


def _load():
    try:
        model, processor = toy.load()
        return model, processor, "trained toy LLaVA"
    except FileNotFoundError as err:
        print(f"note: {err}\n      running an untrained model of the same shape instead (answers are noise)")
        from transformers import LlavaForConditionalGeneration

        torch.manual_seed(0)
        model = LlavaForConditionalGeneration._from_config(toy.build_config(), attn_implementation="sdpa")
        return model.eval(), toy.build_processor(), "untrained toy-shaped LLaVA"


def _answer(model, processor, samples):
    inputs = processor(images=[s["image"] for s in samples], text=[toy.prompt(s["question"]) for s in samples],
                       padding=True, return_tensors="pt")
    with torch.no_grad():
        model(**inputs)  # warm-up
        start = time.perf_counter()
        logits = model(**inputs).logits[:, -1]
        seconds = time.perf_counter() - start
    return processor.tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist()), seconds


def run(keeps, method="fastervlm", n=6, out="vtprune_demo.png", seed=0) -> int:
    from PIL import Image, ImageDraw

    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, processor, kind = _load()
    samples = toy.eval_split(n=n, seed=1000 + seed)
    print(f"{kind}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, "
          f"{toy.NUM_IMAGE_TOKENS} visual tokens per image; method {method!r}\n")
    panels = [(samples[0]["image"].convert("RGB"), "input")]
    rows = []
    for keep in keeps:
        wrap(model, method, keep=keep)
        try:
            answers, seconds = _answer(model, processor, samples)
            kept = [k[0].numel() for k in last_kept(model)]
            info = stats(model)
            panels.append((overlay(samples[0]["image"], model), f"keep={keep}: {kept[0]} tokens"))
        finally:
            unwrap(model)
        correct = sum(a == s["answer"] for a, s in zip(answers, samples))
        rows.append((keep, kept[0], info["llm_sequence_out"], seconds, correct, answers))
    print(f"{'question':<34} {'truth':<8} " + " ".join(f"keep={r[0]:<6}" for r in rows))
    for i, s in enumerate(samples):
        print(f"{s['question']:<34} {s['answer']:<8} " + " ".join(f"{r[5][i]:<11}" for r in rows))
    print()
    print(f"{'keep':<8} {'visual tokens/image':<21} {'LLM sequence':<14} {'prefill (batch of %d)' % n:<22} correct")
    for keep, k, seq, seconds, correct, _ in rows:
        print(f"{keep!s:<8} {k:<21} {seq:<14} {seconds * 1000:>8.1f} ms{'':<11} {correct}/{n}")
    width = sum(p.width for p, _ in panels) + 8 * (len(panels) - 1)
    sheet = Image.new("RGB", (width, panels[0][0].height + 18), "white")
    draw = ImageDraw.Draw(sheet)
    x = 0
    for picture, caption in panels:
        sheet.paste(picture, (x, 18))
        draw.text((x + 2, 3), caption, fill=(0, 0, 0))
        x += picture.width + 8
    sheet.save(out)
    print(f"\nwrote {out}: the first image with the kept tokens of each budget (dropped tokens dimmed)")
    return 0
