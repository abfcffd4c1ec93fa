"""``vtprune demo --video``: the embedded toy video model (``vtprune.toy_video``, a tiny Qwen3-VL) answering
questions about clips with and without a method, offline.

Runs are chosen as in ``vtprune demo`` (one per budget for methods with ``keep``; the stock model then the
method for the others).  The table gives each run's answers, the visual tokens per clip the language model
saw, and the accuracy on the event questions (an object seen in 4 of 16 frames) next to the rest.  The
picture shows the first clip: one row per run, one column per temporal slice (two frames fused by the
tower), kept tokens outlined and dropped ones dimmed.
"""

from __future__ import annotations

import sys

import torch

from . import toy_video
from .api import last_kept, stats, unwrap, wrap
from .demo import _check, _fmt, _runs, print_answers
from .errors import NotApplicable
from .viz import overlay


def _load():
    try:
        model, _ = toy_video.load()
        return model, "trained toy video model (Qwen3-VL)"
    except FileNotFoundError as err:
        print(f"note: {err}\n      running an untrained model of the same shape instead (answers are noise)")
        from transformers import Qwen3VLForConditionalGeneration

        torch.manual_seed(0)
        model = Qwen3VLForConditionalGeneration._from_config(toy_video.build_config(), attn_implementation="sdpa")
        return model.eval(), "untrained toy-video-shaped Qwen3-VL"


def _one(model, inputs, samples, label, name, options):
    words = {i: w for w, i in toy_video.vocab().items()}
    if options is not None:
        wrap(model, name, **options)
    try:
        with torch.no_grad():
            logits = model(**inputs).logits[:, -1].float()
        if options is None:
            tokens = [toy_video.NUM_VIDEO_TOKENS] * len(samples)
            kept = list(range(toy_video.NUM_VIDEO_TOKENS))
        else:
            info = stats(model)
            tokens = [s["videos"][0]["tokens_out"] for s in info["samples"]]
            kept = last_kept(model)[0][0]
    finally:
        if options is not None:
            unwrap(model)
    truth = torch.tensor([toy_video.vocab()[s["answer"]] for s in samples])
    return {"label": label, "answers": [words[i] for i in logits.argmax(-1).tolist()], "tokens": tokens,
            "kept": [int(i) for i in kept],
            "p_truth": logits.softmax(-1).gather(1, truth[:, None]).squeeze(1).tolist()}


def _print(samples, rows):
    n = len(samples)
    print_answers(samples, rows, [("question", "question", 32), ("type", "type", 12), ("truth", "answer", 8)])
    events = [i for i, s in enumerate(samples) if s["type"] in toy_video.EVENT_TYPES]
    print(f"{'run':<11} {'visual tokens/clip':<20} {'p(truth)':<10} {'correct':<9} event questions")
    for r in rows:
        right = [a == s["answer"] for a, s in zip(r["answers"], samples)]
        tokens = sum(r["tokens"]) / n
        print(f"{r['label']:<11} {tokens:<20.1f} {sum(r['p_truth']) / n:<10.3f} {f'{sum(right)}/{n}':<9} "
              f"{sum(right[i] for i in events)}/{len(events)}")


def _sheet(out, title, sample, rows):
    from matplotlib.figure import Figure
    from PIL import Image

    frames = sample["frames"]
    slices, per = toy_video.SLICES, toy_video.TOKENS_PER_SLICE
    event = set(toy_video.event_slices(sample["clip"]))
    size, label_w = 1.15, 2.3
    width, height = label_w + slices * size + 0.2, 0.9 + len(rows) * (size + 0.25) + 0.3
    fig = Figure(figsize=(width, height), dpi=100)
    fig.text(0.5, 1 - 0.1 / height, title, ha="center", va="top", fontsize=10, weight="bold")
    fig.text(0.5, 1 - 0.38 / height, f"clip 1: \"{sample['question']}\" truth: {sample['answer']}; columns: temporal "
             f"slices (2 frames each), the event in slices {min(event) + 1}-{max(event) + 1} (red labels); "
             "kept tokens outlined, dropped dimmed", ha="center", va="top", fontsize=7.5, wrap=True)
    for r, row in enumerate(rows):
        y = height - 0.9 - (r + 1) * (size + 0.25)
        answer, right = row["answers"][0], row["answers"][0] == sample["answer"]
        fig.text(0.1 / width, (y + size / 2) / height, f"{row['label']}\n{row['tokens'][0]} tokens\nanswer: {answer} "
                 f"{'✓' if right else '✗'}", va="center", fontsize=8.5, color="#1a7f37" if right else "#c62828")
        kept = set(row["kept"])
        for s in range(slices):
            image = Image.fromarray(frames[s * toy_video.TEMPORAL].transpose(1, 2, 0))
            ids = torch.tensor([i - s * per for i in range(s * per, (s + 1) * per) if i in kept], dtype=torch.long)
            ax = fig.add_axes([(label_w + s * size) / width, y / height, (size - 0.06) / width, size / height])
            ax.imshow(overlay(image, ids, shape=(toy_video.GRID, toy_video.GRID)))
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"{toy_video.timestamps()[s]:.1f} s", fontsize=7.5,
                             color="#c62828" if s in event else "black")
    fig.savefig(out)


def run(keeps, method="evs", n=10, out="vtprune_demo_video.png", seed=0, options=None) -> int:
    """Answer ``n`` toy clip questions with ``method`` at each budget of ``keeps`` (1.0 = stock), print a table
    and write a PNG to ``out``; the exit status (2: the method cannot run on clips).  ``ValueError`` /
    ``TypeError`` for a bad method, option or budget."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int (questions), got {n!r}")
    cls, options, budgets, notes = _check(method, options, keeps)
    if cls.stage == "input":
        print(f"vtprune demo --video: {method} resizes images in the processor; the toy clips have one size "
              f"(try --method uniform_time or evs)", file=sys.stderr)
        return 2
    model, kind = _load()
    n_layers = model.config.text_config.num_hidden_layers
    runs, what = _runs(cls, options, budgets, n_layers)
    samples = [dict(frames=toy_video.render(clip), clip=clip, **q)
               for clip, q in toy_video.eval_clips(n, seed=2000 + seed)]
    inputs = toy_video.inputs([s["frames"] for s in samples], [s["question"] for s in samples])
    print(f"{kind}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, "
          f"{toy_video.NUM_VIDEO_TOKENS} visual tokens per clip ({toy_video.SLICES} slices of "
          f"{toy_video.TOKENS_PER_SLICE}), {n_layers} decoder layers; method {method!r}"
          + (f" ({_fmt(options)})" if options else ""))
    print(what)
    for note in notes:
        print(f"note: {note}")
    print()
    try:
        rows = [_one(model, inputs, samples, label, method, opts) for label, opts in runs]
    except NotApplicable as err:
        print(f"vtprune demo --video: {err}", file=sys.stderr)
        return 2
    _print(samples, rows)
    title = f"vtprune demo --video: {kind}, method {method}" + (f" ({_fmt(options)})" if options else "")
    _sheet(out, title, samples[0], rows)
    print(f"\nwrote {out}: the first clip's slices with the tokens each run kept")
    return 0
