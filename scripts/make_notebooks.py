"""Write ``notebooks/*.ipynb`` from the cell sources below (outputs stripped).

    python scripts/make_notebooks.py          # after editing a cell here

The notebooks run offline on the shipped toy models (``VTPRUNE_NOTEBOOK_LIMIT`` questions per cell,
default 400: about 4 minutes on one CPU thread); the tests execute them with nbclient on 24. Their
executed outputs are published under ``docs/notebooks/`` by ``python scripts/render_notebooks.py``
(re-run it after a change).
"""

import os

import nbformat as nbf

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "notebooks")

SETUP = """\
import os

import matplotlib.pyplot as plt
import torch

import vtprune
from vtprune import toy

LIMIT = int(os.environ.get("VTPRUNE_NOTEBOOK_LIMIT", 400))  # questions per cell (the tests use fewer)
OUT = os.environ.get("VTPRUNE_NOTEBOOK_OUT", "vtprune_notebook_runs")
model, processor = toy.load()
samples = toy.eval_split(n=LIMIT)
print(f"toy LLaVA, {toy.NUM_IMAGE_TOKENS} visual tokens per image, {len(samples)} questions")"""

COMPARE = [
    ("md", """\
# Reduction ratios on the toy model

Accuracy and prefill time of pre-LLM pruning methods against the visual tokens the LLM
actually sees, next to the `random` and `pool` baselines, on the toy benchmark shipped with
vtprune (colour, shape, existence and counting questions about small shapes on a noisy
background). The sweep is `vtprune eval`'s: cells are cached under `OUT`, so re-running the
notebook is instant."""),
    ("code", SETUP),
    ("code", """\
from IPython.display import Markdown

from vtprune.eval import sweep

METHODS = ["random", "pool", "divprune", "fastervlm", "vtc_cls", "visionzip"]
KEEPS = [1.0, 0.25, 0.1, 0.05]
records = sweep.run(model="toy", tasks=["vtprune_toy"], methods=METHODS, keeps=KEEPS, out=OUT,
                    limit=LIMIT)
Markdown(open(os.path.join(OUT, "results.md")).read())"""),
    ("md", """\
Accuracy and prefill time per sample (a batch of 8, median of 7 repeats, bars from the fastest to
the slowest repeat) against the visual tokens the LLM sees; the stock model is the star and the
dashed level. CPU timings move by ±10% between repeats and runs: compare the methods of one run,
and read differences smaller than the bars as noise."""),
    ("code", """\
from vtprune.eval import report

fig, (acc, speed) = plt.subplots(1, 2, figsize=(12, 4.6))
report.draw(acc, records, "score")
report.draw(speed, records, "time")
plt.tight_layout()"""),
    ("md", """\
Per question type at keep 0.1: the [CLS]-attention methods keep the objects (colour and shape
stay near 1.0) but counting collapses — a kept token shows that an object is there, not how
many there are."""),
    ("code", """\
import pandas as pd

table = pd.DataFrame([{"method": r["method"], "keep": r["keep"], "tokens": r["visual_tokens_llm"],
                       **r.get("by_type", {}), "overall": r["score"]} for r in records])
table[(table.keep == 0.1) | (table.method == "stock")].round(3)"""),
    ("md", """\
## Which tokens are kept

At keep 0.1 (26 of the 256 tokens): kept tokens outlined, dropped ones dimmed, and the tokens a kept one
stands for (a `pool` window's other cells) half-dimmed (`vtprune.viz.overlay`)."""),
    ("code", """\
from matplotlib.patches import Patch

from vtprune.viz import overlay

examples = samples[:3]
shown = ["random", "pool", "fastervlm", "visionzip"]
fig, axes = plt.subplots(len(examples), len(shown) + 1, figsize=(2.6 * (len(shown) + 1), 2.7 * len(examples) + 0.6))
fig.suptitle("kept tokens at keep 0.1 (26 of 256 per image), toy LLaVA", fontsize=10)
fig.legend(handles=[Patch(facecolor="#e8d9b8", edgecolor="black", label="kept (outlined)"),
                    Patch(facecolor="#8b8270", label="merged into a kept token"),
                    Patch(facecolor="#3a362e", label="dropped (dimmed)")],
           loc="lower center", ncol=3, fontsize=8, frameon=False)
for row, sample in zip(axes, examples):
    inputs = processor(images=[sample["image"]], text=[toy.prompt(sample["question"])], return_tensors="pt")
    row[0].imshow(sample["image"])
    row[0].set_title(sample["question"], fontsize=7)
    for ax, method in zip(row[1:], shown):
        with vtprune.wrapped(model, method, keep=0.1):
            with torch.no_grad():
                answer = processor.tokenizer.convert_ids_to_tokens(int(model(**inputs).logits[0, -1].argmax()))
            ax.imshow(overlay(sample["image"], model))
        ax.set_title(f"{method}: {answer} (truth {sample['answer']})", fontsize=7)
for ax in axes.flat:
    ax.axis("off")
fig.tight_layout(rect=(0, 0.05, 1, 1))"""),
    ("md", """\
## A real model

Set `VTPRUNE_MODEL` to a local path or hub id of a supported model (LLaVA, LLaVA-NeXT, InternVL,
Qwen2/2.5/3-VL) to compare the prefill of the stock and pruned model on one image. Skipped when
unset (as in the tests: no downloads)."""),
    ("code", """\
import time

MODEL_ID = os.environ.get("VTPRUNE_MODEL")
if MODEL_ID is None:
    print("VTPRUNE_MODEL is not set: skipped")
else:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    real = AutoModelForImageTextToText.from_pretrained(MODEL_ID, dtype="auto", device_map="auto")
    real_processor = AutoProcessor.from_pretrained(MODEL_ID)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    text = real_processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = real_processor(images=[samples[0]["image"]], text=[text], return_tensors="pt").to(real.device)

    def prefill_ms():
        with torch.no_grad():
            real(**inputs)
            start = time.perf_counter()
            real(**inputs)
        return 1000 * (time.perf_counter() - start)

    print(f"stock: {prefill_ms():.1f} ms")
    for keep in (0.25, 0.1):
        with vtprune.wrapped(real, "fastervlm", keep=keep):
            ms = prefill_ms()
            print(f"fastervlm keep={keep}: {ms:.1f} ms, {vtprune.stats(real)['visual_tokens_out']} visual tokens")"""),
]

HALLUCINATION = [
    ("md", """\
# Existence questions with hard negatives: stock vs attention interventions

A POPE-like probe on the toy benchmark: "is there a {colour} {shape} ?" where the negatives
are *hard* (the colour or the shape is in the picture, on another object) or *easy* (neither
is). We compare the stock model, `vhr` (vision-aware head reinforcement), `var` (visual attention
sink redistribution) and both on top of `fastervlm` pruning.

The toy model is near-perfect on existence already, so this notebook shows the *harness*; on
the toy model the interventions do not help (docs/toy.md reports the same). VAR needs massive
activations: the toy LLM is 128 wide, so |x_d|/RMS(x) ≤ √128 ≈ 11 can never pass the paper's
tau = 20 and `var` is the stock model there; with `tau=4` (from `vtprune calibrate var`'s peak
values) almost every visual token counts as a sink, which is not what VAR is about either. On a real
model, run POPE through lmms-eval: `vtprune eval --model PATH --tasks pope --methods var,vhr
--keep 1` (after `vtprune calibrate var --model PATH`)."""),
    ("code", SETUP),
    ("code", """\
import numpy as np
import pandas as pd

items = [(scene, q) for scene, q in toy.eval_scenes(n=4 * LIMIT) if q["type"] == "exists"][:LIMIT]
probe = [dict(image=toy.render(scene), **q) for scene, q in items]


def kind(scene, q):
    if q["answer"] == "yes":
        return "positive"
    colour, shape = q["question"].split()[3:5]  # "is there a {colour} {shape} ?"
    hard = any(o["color"] == colour or o["shape"] == shape for o in scene["objects"])
    return "hard negative" if hard else "easy negative"


kinds = np.array([kind(scene, q) for scene, q in items])
print({k: int((kinds == k).sum()) for k in ("positive", "hard negative", "easy negative")})


def run(method=None, **options):
    if method is None:
        result = toy.evaluate(model, processor, probe, progress=False)
    else:
        with vtprune.wrapped(model, method, **options):
            result = toy.evaluate(model, processor, probe, progress=False)
    answers = np.array(result["predictions"])
    truth = np.array([s["answer"] for s in probe])
    rate = lambda mask: float(mask.mean()) if mask.size else float("nan")  # noqa: E731
    return {"accuracy": rate(answers == truth),
            "yes rate": rate(answers == "yes"),
            "false yes, hard negatives": rate(answers[kinds == "hard negative"] == "yes"),
            "false yes, easy negatives": rate(answers[kinds == "easy negative"] == "yes"),
            "misses on positives": rate(answers[kinds == "positive"] != "yes")}


settings = {
    "stock": run(),
    "vhr (alpha 2)": run("vhr", alpha=2.0),
    "var (tau 20)": run("var"),
    "var (tau 4)": run("var", tau=4.0),
    "fastervlm keep 0.1": run("fastervlm", keep=0.1),
    "fastervlm keep 0.1 + vhr": run(["fastervlm", "vhr"], keep=0.1, alpha=2.0),
    "fastervlm keep 0.1 + var (tau 4)": run(["fastervlm", "var"], keep=0.1, tau=4.0),
}
pd.DataFrame(settings).T.round(3)"""),
    ("code", """\
frame = pd.DataFrame(settings).T
ax = frame[["false yes, hard negatives", "false yes, easy negatives", "misses on positives"]].plot.barh(figsize=(9, 4))
ax.invert_yaxis()  # the settings top to bottom, as in the table
ax.set_xlabel("rate")
ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
ax.set_title(f"existence probe: toy model, n = {len(probe)}")
plt.tight_layout()"""),
]

VIDEO = [
    ("md", """\
# Pruning clips on the toy video model

Accuracy of the temporal methods (`evs`, `vidcom2`, `fastvid`, `flashvid`, `holitom`, `dycoke`) and of image
selectors applied to whole clips, against the visual tokens per clip the LLM actually sees, next to the
controls: `random`, `pool`, `uniform_time` (whole temporal slices, evenly spaced) and per-slice `uniform`.
The model is the shipped toy video model (`vtprune.toy_video`, a tiny Qwen3-VL: 16 frames, 8 temporal
slices of 16 tokens); its questions need time: what appears for 4 of the 16 frames (its shape, its
colour, when) next to what stays (a colour, a count). Cells are cached under `OUT`."""),
    ("code", """\
import os

import matplotlib.pyplot as plt
import torch

import vtprune
from vtprune import toy_video

LIMIT = int(os.environ.get("VTPRUNE_NOTEBOOK_LIMIT", 400))  # questions per cell (the tests use fewer)
OUT = os.path.join(os.environ.get("VTPRUNE_NOTEBOOK_OUT", "vtprune_notebook_runs"), "video")
model, _ = toy_video.load()
samples = toy_video.eval_split(n=LIMIT)
print(f"toy video model, {toy_video.NUM_VIDEO_TOKENS} visual tokens per clip, {len(samples)} questions")"""),
    ("code", """\
from IPython.display import Markdown

from vtprune.eval import sweep

METHODS = ["random", "pool", "uniform_time", "uniform:scope=frame", "evs", "vidcom2", "fastvid", "flashvid",
           "holitom", "dycoke", "divprune", "fastervlm"]
KEEPS = [1.0, 0.25, 0.1, 0.05] if LIMIT >= 100 else [1.0, 0.1]  # the tests (LIMIT 24) run one budget
records = sweep.run(model="toy-video", tasks=["vtprune_toy_video"], methods=METHODS, keeps=KEEPS, out=OUT,
                    limit=LIMIT, seeds=3)  # random: the mean of 3 seeds
Markdown(open(os.path.join(OUT, "results.md")).read())"""),
    ("md", """\
Accuracy and prefill time per clip against the visual tokens the LLM sees (the stock model is the star
and the dashed level; timing bars from the fastest to the slowest of 7 repeats)."""),
    ("code", """\
from vtprune.eval import report

fig, (acc, speed) = plt.subplots(1, 2, figsize=(12, 4.6))
report.draw(acc, records, "score")
report.draw(speed, records, "time")
plt.tight_layout()"""),
    ("md", """\
Per question type at keep 0.1 (13 of 128 tokens per clip). `event` is the mean of the three event
questions: the object that appears lives in 2 of the 128 tokens, so a method that spends its budget
on slices that repeat the previous one misses it."""),
    ("code", """\
import pandas as pd

EVENTS = list(toy_video.EVENT_TYPES)
table = pd.DataFrame([{"method": r["method"], "keep": r["keep"], "tokens": r["visual_tokens_llm"],
                       "event": sum(r["by_type"][t] for t in EVENTS) / len(EVENTS), **r["by_type"],
                       "overall": r["score"]} for r in records if r.get("by_type")])
table[(table.keep == 0.1) | (table.method == "stock")].round(3)"""),
    ("md", """\
## Which tokens are kept

The first clip at keep 0.1: one row per method, one column per temporal slice (two frames fused by the
tower); kept tokens outlined, dropped ones dimmed; the event's slices have red labels."""),
    ("code", """\
from PIL import Image

from vtprune.viz import overlay

sample = samples[1]  # an event question
shown = ["random", "uniform_time", "evs", "vidcom2", "fastvid", "flashvid"]
event = set(toy_video.event_slices(toy_video.eval_clips(LIMIT)[1][0]))
x = toy_video.inputs([sample["frames"]], [sample["question"]])
fig, axes = plt.subplots(len(shown), toy_video.SLICES, figsize=(1.3 * toy_video.SLICES, 1.45 * len(shown)))
for row, method in zip(axes, shown):
    with vtprune.wrapped(model, method, keep=0.1):
        with torch.no_grad():
            answer = model(**x).logits[0, -1].argmax().item()
        kept = {int(i) for i in vtprune.last_kept(model)[0][0]}
    words = {i: w for w, i in toy_video.vocab().items()}
    for s, ax in enumerate(row):
        per = toy_video.TOKENS_PER_SLICE
        ids = torch.tensor([i - s * per for i in range(s * per, (s + 1) * per) if i in kept], dtype=torch.long)
        frame = Image.fromarray(sample["frames"][s * toy_video.TEMPORAL].transpose(1, 2, 0))
        ax.imshow(overlay(frame, ids, shape=(toy_video.GRID, toy_video.GRID)))
        ax.set_xticks([])
        ax.set_yticks([])
        if s == 0:
            ax.set_ylabel(f"{method}\\n{words[answer]}", fontsize=8)
        if method == shown[0]:
            ax.set_title(f"slice {s + 1}", fontsize=8, color="red" if s in event else "black")
fig.suptitle(f"{sample['question']} (truth: {sample['answer']})", fontsize=9)
plt.tight_layout()"""),
]


def build(cells):
    nb = nbf.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbf.v4.new_markdown_cell(src) if kind == "md" else nbf.v4.new_code_cell(src) for kind, src in cells]
    return nb


def main():
    os.makedirs(ROOT, exist_ok=True)
    for name, cells in (("compare_ratios.ipynb", COMPARE), ("hallucination.ipynb", HALLUCINATION),
                        ("compare_video.ipynb", VIDEO)):
        path = os.path.join(ROOT, name)
        nbf.write(build(cells), path)
        print("wrote", os.path.normpath(path))


if __name__ == "__main__":
    main()
