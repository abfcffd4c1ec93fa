"""``vtprune demo``: the embedded toy LLaVA answering questions with and without a method, offline.

Every registered method runs, each along its own axis:

* pre-LLM selectors (``keep``): one run per budget (1.0 = every token); the picture shows the
  tokens each budget kept of the first image.
* in-LLM methods: ``fastv``/``dart`` one run per budget at their ``layer``; ``exit`` (no budget)
  the stock model, then every visual token leaving before each decoder layer 1 .. L-1 (or the
  ``layer`` given); ``dyvte`` the stock model, then its routers.  The visual tokens each decoder
  layer saw are printed and drawn, and the picture dims the tokens that left the LLM.
* attention methods (``vhr``, ``var``, ``zerotuning``): the stock model, then the method; token
  counts do not change, so the answers, p(truth) and the method's own ``stats`` show its effect.
* ``downsample`` acts on the processor, and the toy (LLaVA-1.5) has one fixed resolution: the
  demo says so in one line and returns 2.

Where a method's own default does nothing on the toy, the demo picks a value (``DEFAULTS``) and says so.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import textwrap
import time

import torch

from . import methods, toy
from .api import record, stats, unwrap, wrap
from .viz import SUMMARY, overlay

# method -> (options the demo adds unless given, why)
DEFAULTS = {
    "dyvte": ({"weights": "toy"}, "the routers trained for the toy model"),
    "var": ({"tau": 5.0}, ("the toy's 128-wide residual stream keeps |x_d|/RMS under ~11, so the paper's "
                           "tau=20 finds no sink")),
    "zerotuning": ({"gamma": 2.0}, "gamma=1, its default, is the stock model"),
}


def defaults(method: str, options=None) -> dict:
    """``options`` with the demo's defaults for ``method`` added (what ``run`` wraps with)."""
    return {**DEFAULTS.get(method, ({}, ""))[0], **(options or {})}


def _fmt(options: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items())


def _check(method, options, keeps):
    """(config class, options, budgets or None, notes); ``ValueError``/``TypeError`` on a bad method or option."""
    if not isinstance(method, str):
        raise TypeError(f"method must be a registered name, got {type(method).__name__}")
    cls = methods.get(method)  # ValueError listing the registered names
    options = dict(options or {})
    accepted = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise TypeError(f"option(s) {unknown} are not accepted by {method}; "
                        f"it takes: {', '.join(sorted(accepted)) or 'no options'}")
    notes = []
    added = {k: v for k, v in DEFAULTS.get(method, ({}, ""))[0].items() if k not in options}
    if added:
        notes.append(f"demo default {_fmt(added)}: {DEFAULTS[method][1]}")
        options.update(added)
    budgets = None
    if cls.stage == "attention" and "keep" in accepted:  # pdkv: a share of the cache while decoding
        notes.append(f"{method} acts while decoding; the toy answers in one token, from the prefill, so its run "
                     "answers as the stock model does (its own keep applies, not the budgets)")
    elif "keep" in accepted:
        if "keep" in options:
            budgets = [options.pop("keep")]
            notes.append(f"keep={budgets[0]} given as an option: one run at that budget")
        else:
            budgets = list(keeps)
            if not budgets:
                raise ValueError("keeps is empty: give at least one budget (1.0 = every token)")
    elif cls.stage != "input":
        notes.append(f"{method} takes no keep: the budgets are not used")
    if cls.stage != "input":
        for keep in budgets or [None]:
            cls(**options, **({} if keep is None else {"keep": keep})).validate()
    return cls, options, budgets, notes


def _runs(cls, options, budgets, n_layers):
    """``[(label, options or None for the stock model)]`` and one sentence saying what they are."""
    name = cls.name
    if budgets is not None:
        runs = [(f"keep={k}", {**options, "keep": k}) for k in budgets]
        if cls.stage == "llm":
            layer = options.get("layer", cls.layer)
            return runs, (f"{name} (in-LLM): visual tokens leave the language model before decoder layer {layer}; "
                          f"one run per budget, keep = the visual tokens that stay")
        return runs, f"{name} (pre-LLM): keeps the best `keep` of each image's visual tokens; one run per budget"
    if cls.stage == "llm":
        dynamic = cls.decision_layers is not methods.LayerMethod.decision_layers
        if dynamic:
            return [("stock", None), (name, options)], (
                f"{name} (in-LLM): the stock model, then {name} deciding after each decoder layer, per question, "
                f"when all its visual tokens leave")
        if cls.stage_layers is not methods.LayerMethod.stage_layers:  # staged (pdrop)
            stages = cls(**options).stage_layers(n_layers)
            return [("stock", None), (name, options)], (
                f"{name} (in-LLM): the stock model, then visual tokens leaving in stages, before decoder layers "
                f"{', '.join(map(str, stages))} (of {n_layers})")
        if "layer" not in options:
            layers = list(range(1, n_layers))
            return [("stock", None)] + [(f"layer={j}", {**options, "layer": j}) for j in layers], (
                f"{name} (in-LLM): the stock model, then every visual token leaving before decoder layer "
                f"{', '.join(map(str, layers))} (of {n_layers})")
        return [("stock", None), (name, options)], (
            f"{name} (in-LLM): the stock model, then every visual token leaving before decoder layer "
            f"{options['layer']}")
    return [("stock", None), (name, options)], (
        f"{name} (attention): changes how the LLM attends, not the number of tokens; the stock model, then {name} - "
        f"compare the answers, p(truth) and vtprune.stats(model)[{name!r}]")


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


REPEATS = 5  # timed prefills per run: the table shows their median and range (one CPU run is noise)


def _answer(model, tokenizer, inputs, samples):
    """Answers, p(truth) and the prefill's times in seconds (``REPEATS`` runs after a warm-up)."""
    seconds = []
    with torch.no_grad():
        model(**inputs)  # warm-up
        for _ in range(REPEATS):
            start = time.perf_counter()
            logits = model(**inputs).logits[:, -1].float()
            seconds.append(time.perf_counter() - start)
    truth = torch.tensor(tokenizer.convert_tokens_to_ids([s["answer"] for s in samples]))
    p_truth = logits.softmax(-1).gather(1, truth[:, None]).squeeze(1).tolist()
    return tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist()), p_truth, seconds


def _left_llm(model, inputs, image_token, per_layer):
    """Indices of the first image's visual tokens still in the LLM's last layer (in-LLM methods)."""
    exit_ = record(model).exit
    row = inputs["input_ids"][0]
    if exit_ is not None and exit_.drop is not None and exit_.drop.shape[1] == row.numel():
        positions = (row == image_token).nonzero().squeeze(1)
        return (~exit_.drop[0, positions.to(exit_.drop.device)]).nonzero().squeeze(1).cpu()
    return torch.arange(per_layer[0] if per_layer[-1] else 0)  # a dynamic exit: all or nothing


def _one(model, processor, samples, inputs, label, name, options, image_token, n_layers):
    """Run once (wrapped with ``options``, or stock for ``None``) and return what the table and picture show."""
    image = samples[0]["image"]
    if options is None:
        answers, p_truth, seconds = _answer(model, processor.tokenizer, inputs, samples)
        tokens = [int((row == image_token).sum()) for row in inputs["input_ids"]]
        return {"label": label, "answers": answers, "p_truth": p_truth, "seconds": seconds, "tokens": tokens[0],
                "sequence": inputs["input_ids"].shape[1], "per_layer": [[t] * n_layers for t in tokens],
                "picture": image.convert("RGB"), "caption": f"{tokens[0]} tokens (all)", "saved": 0.0, "stats": {}}
    wrap(model, name, **options)
    marks = set()
    try:
        answers, p_truth, seconds = _answer(model, processor.tokenizer, inputs, samples)
        info = stats(model)
        per_layer = [s["visual_tokens_per_layer"] for s in info["samples"]]
        tokens = info["samples"][0]["tokens_out"]
        stage = methods.get(name).stage
        if stage == "select":
            picture, caption = overlay(image, model), f"{tokens} tokens kept"
            last = record(model)
            marks = ({"summary"} if any(last.summaries[0]) else set()) | \
                    ({"merged"} if any(last.summaries[0]) or any(last.merged[0]) else set())
        elif stage == "llm":
            kept = _left_llm(model, inputs, image_token, per_layer[0])
            picture = overlay(image, kept, shape=(toy.GRID, toy.GRID))
            exit_layer = next((j for j, v in enumerate(per_layer[0]) if v < per_layer[0][0]), None)
            left = per_layer[0][-1]
            caption = (f"all {tokens} stay to the end" if exit_layer is None else
                       f"all {tokens} leave before layer {exit_layer}" if left == 0 else
                       f"{left} of {tokens} stay from layer {exit_layer}")
        else:
            picture, caption = image.convert("RGB"), f"{tokens} tokens (attention changed)"
    finally:
        unwrap(model)
    return {"label": label, "answers": answers, "p_truth": p_truth, "seconds": seconds, "tokens": tokens,
            "sequence": info["llm_sequence_out"], "per_layer": per_layer, "picture": picture, "caption": caption,
            "saved": info.get("llm_flops_saved", 0.0), "exit": info.get("exit"), "marks": marks,
            "stats": info.get(name, {}) if stage == "attention" else {}}


def _values(value, sample=None) -> str:
    """A stats value as text; ``{layer: [one per question]}`` -> ``layer 1: 5 8 11`` (or question ``sample`` only)."""
    if isinstance(value, dict):
        return "; ".join(f"layer {j}: {_per_question(v, sample)}" for j, v in value.items()) or "none"
    return str(value)


def _per_question(value, sample):
    if not isinstance(value, list):
        return str(value)
    return " ".join(map(str, value)) if sample is None else str(value[sample])


def print_answers(samples, rows, columns):
    """The per-question table: each sample's ``columns`` (``(header, key, width)``), then each run's answer,
    ``*`` where it is wrong."""
    print(" ".join(f"{h:<{w}}" for h, _, w in columns) + " " + " ".join(f"{r['label']:<11}" for r in rows))
    for i, s in enumerate(samples):
        marks = [r["answers"][i] + ("" if r["answers"][i] == s["answer"] else "*") for r in rows]
        print(" ".join(f"{s[k]:<{w}}" for _, k, w in columns) + " " + " ".join(f"{m:<11}" for m in marks))
    print("(* = wrong)\n")


def _print(samples, rows, name, stage, n_layers, options):
    n = len(samples)
    print_answers(samples, rows, [("question", "question", 34), ("truth", "answer", 8)])
    print(f"{'run':<11} {'visual tokens/image':<21} {'LLM sequence':<14} {f'prefill, batch of {n}':<24} "
          f"{'LLM work saved':<16} {'p(truth)':<10} correct")
    for r in rows:
        correct = sum(a == s["answer"] for a, s in zip(r["answers"], samples))
        print(f"{r['label']:<11} {r['tokens']:<21} {r['sequence']:<14} {_timing(r['seconds']):<24} "
              f"{r['saved']:<16.0%} {sum(r['p_truth']) / n:<10.3f} {correct}/{n}")
    print(f"(prefill: the median of {REPEATS} runs, their range in brackets; CPU timings are noisy, compare "
          "within one run)")
    if stage == "llm":
        print(f"\nvisual tokens per decoder layer (layers 0..{n_layers - 1}; "
              f"vtprune.stats(model)['samples'][i]['visual_tokens_per_layer']):")
        for r in rows:
            layers = r["per_layer"]
            same = all(c == layers[0] for c in layers)
            text = (" ".join(map(str, layers[0])) + "  (every question)" if same
                    else " | ".join(f"q{i + 1}: {' '.join(map(str, c))}" for i, c in enumerate(layers)))
            print(f"  {r['label']:<11} {text}")
            ex = r.get("exit")
            for stage_ in (ex or {}).get("stages") or ([ex] if ex and ex.get("layer") is not None else []):
                print(f"  {'':<11} {'stage' if ex.get('stages') else 'exit'} before layer {stage_['layer']}: "
                      f"visual tokens dropped per question {' '.join(map(str, stage_['visual_tokens_dropped']))}")
            if ex and "exit_layers" in ex:
                print(f"  {'':<11} first layer without visual tokens, per question: "
                      f"{' '.join('never' if j is None else str(j) for j in ex['exit_layers'])}")
    if stage == "attention":
        entry = next((r["stats"] for r in rows if r["stats"]), {})
        print(f"\n{name} stats (vtprune.stats(model)[{name!r}], last forward; lists are per question):")
        if not entry:
            print(f"  stats(model) has no entry for {name} ({_fmt(options) or 'default options'}): "
                  "its effect shows only in the answers and p(truth)")
        for key, value in entry.items():
            if key != "method":
                print(f"  {key}: {_values(value)}")


def _timing(seconds) -> str:
    """``12 ms (11-14)``: the median of the runs and their range, in whole milliseconds."""
    ms = sorted(s * 1000 for s in seconds)
    return f"{statistics.median(ms):.0f} ms ({ms[0]:.0f}-{ms[-1]:.0f})"


def _stat_lines(entry) -> list:
    """An attention method's stats for the first question, a few short lines for the picture."""
    lines = []
    for key, value in entry.items():
        if key not in ("method", "source"):
            lines += textwrap.wrap(f"{key.replace('_', ' ')}: {_values(value, 0)}", 40)
    return lines


def _sheet(out, title, notes, samples, rows, input_panel, stage, n_layers, tokens_in):
    """The PNG: a title, the question, a legend, then one picture per run with its answer (and layer counts)."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    sample, n = samples[0], len(samples)

    panels = ([{"label": "input", "picture": sample["image"].convert("RGB"), "caption": f"{tokens_in} visual tokens"}]
              if input_panel else []) + rows
    stat_lines = [_stat_lines(p.get("stats") or {}) for p in panels]
    info_w, size, gap, head = 2.7, 2.2, 0.3, 0.45
    width = info_w + len(panels) * (size + gap)
    subtitle = [line for note in notes for line in textwrap.wrap(note, int(width * 14))]
    top = 0.35 + 0.17 * len(subtitle)
    foot = 0.7 + 0.14 * max(map(len, stat_lines))
    chart = 1.6 if stage == "llm" else 0.0
    height = top + head + size + foot + chart
    fig = Figure(figsize=(width, height), dpi=100)
    fig.text(0.5, 1 - 0.08 / height, title, ha="center", va="top", fontsize=11, weight="bold")
    fig.text(0.5, 1 - 0.33 / height, "\n".join(subtitle), ha="center", va="top", fontsize=8.5, color="#333333")
    image_y = chart + foot  # inches from the bottom
    info = fig.add_axes([0.1 / width, image_y / height, (info_w - 0.2) / width, (size + head) / height])
    info.axis("off")
    question = "\n".join(textwrap.wrap(sample["question"].replace(" ?", "?"), 28))
    info.text(0, 1, f"question 1 of {n}, on this image:", va="top", fontsize=9)
    info.text(0, 0.9, f"{question}\ntruth: {sample['answer']}", va="top", fontsize=10, weight="bold")
    if stage == "attention":
        info.text(0, 0.05, "every visual token stays:\nthe method changes attention\n"
                  "(its stats for question 1\nunder its panel)", fontsize=8.5, va="bottom")
    else:
        marks = set().union(*(p.get("marks", set()) for p in panels))
        legend = [Patch(facecolor="#e8d9b8", edgecolor="white", linewidth=2, label="kept token (outlined)")]
        if "summary" in marks:
            legend.append(Patch(facecolor="#e8d9b8", edgecolor=[v / 255 for v in SUMMARY], linewidth=2,
                                label="summary token (orange)"))
        if "merged" in marks:
            legend.append(Patch(facecolor="#8b8270", edgecolor="#8b8270", label="merged into a kept or\nsummary token"))
        legend.append(Patch(facecolor="#3a362e", edgecolor="#3a362e",
                            label="left the LLM (dimmed)" if stage == "llm" else "dropped token (dimmed)"))
        info.legend(handles=legend, loc="lower left", fontsize=8.5, facecolor="#a0a0a0", framealpha=1,
                    title="visual tokens", title_fontsize=8.5)
    if stage == "llm":
        fig.text(0.1 / width, (chart - 0.2) / height, "bars: the visual tokens each\ndecoder layer saw (question 1)",
                 va="top", fontsize=8.5)
    for i, (p, lines) in enumerate(zip(panels, stat_lines)):
        x = info_w + i * (size + gap)
        ax = fig.add_axes([x / width, image_y / height, size / width, size / height])
        ax.imshow(p["picture"])
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{p['label']}\n{p['caption']}", fontsize=9)
        if "answers" not in p:
            continue
        answer, right = p["answers"][0], p["answers"][0] == sample["answer"]
        correct = sum(a == s["answer"] for a, s in zip(p["answers"], samples))
        ax.text(0.5, -0.03, f"answer: {answer} {'✓ right' if right else '✗ wrong'}\n"
                f"all questions: {correct}/{n} right\nmean p(truth): {sum(p['p_truth']) / n:.3f}",
                transform=ax.transAxes, ha="center", va="top", fontsize=9, color="#1a7f37" if right else "#c62828")
        if lines:
            fig.text((x + size / 2) / width, (image_y - 0.62) / height, "\n".join(lines), ha="center", va="top",
                     fontsize=7.5)
        if stage == "llm":
            bars = fig.add_axes([(x + 0.35) / width, 0.35 / height, (size - 0.45) / width, (chart - 0.6) / height])
            counts = p["per_layer"][0]
            bars.bar(range(n_layers), counts, color="#4a78b5")
            for j, c in enumerate(counts):
                bars.text(j, c + tokens_in * 0.03, str(c), ha="center", va="bottom", fontsize=7)
            bars.set_ylim(0, tokens_in * 1.25)
            bars.set_xticks(range(n_layers))
            bars.set_xlabel("decoder layer", fontsize=7.5, labelpad=1)
            bars.tick_params(labelsize=7)
    fig.savefig(out)


def run(keeps, method="fastervlm", n=6, out="vtprune_demo.png", seed=0, options=None) -> int:
    """Answer ``n`` toy questions with ``method`` (at each budget of ``keeps``, 1.0 = stock), print a table
    and write a PNG to ``out``.  ``options``: extra method options, e.g. ``{"layer": 1}``.  Returns the
    exit status (2: the method cannot run on the toy model); ``ValueError``/``TypeError`` for a bad
    method, option or budget."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int (questions), got {n!r}")
    cls, options, budgets, notes = _check(method, options, keeps)
    if cls.stage == "input":
        print(f"vtprune demo: {method} shrinks the image in the processor, but the toy is a LLaVA-1.5 with one "
              f"fixed resolution (every image gives {toy.NUM_IMAGE_TOKENS} visual tokens): it cannot apply here; "
              f"pool merges tokens instead (--method pool)", file=sys.stderr)
        return 2
    model, processor, kind = _load()
    n_layers = model.config.text_config.num_hidden_layers
    image_token = getattr(model.config, "image_token_id", None) or model.config.image_token_index
    runs, what = _runs(cls, options, budgets, n_layers)
    samples = toy.eval_split(n=n, seed=1000 + seed)
    inputs = processor(images=[s["image"] for s in samples], text=[toy.prompt(s["question"]) for s in samples],
                       padding=True, return_tensors="pt")
    print(f"{kind}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, "
          f"{toy.NUM_IMAGE_TOKENS} visual tokens per image, {n_layers} decoder layers; method {method!r}"
          + (f" ({_fmt(options)})" if options else ""))
    print(what)
    for note in notes:
        print(f"note: {note}")
    print()
    rows = [_one(model, processor, samples, inputs, label, method, opts, image_token, n_layers)
            for label, opts in runs]
    _print(samples, rows, method, cls.stage, n_layers, options)
    shown = dict(options)
    if cls.stage == "llm" and budgets is not None:
        shown = {"layer": cls.layer, **shown}
    title = f"vtprune demo: {kind}, method {method}" + (f" ({_fmt(shown)})" if shown else "")
    _sheet(out, title, [what] + notes, samples, rows, budgets is not None, cls.stage, n_layers, toy.NUM_IMAGE_TOKENS)
    picture = {"select": "the kept tokens of each budget (dropped tokens dimmed)",
               "llm": "the tokens that stay in the LLM (those that left dimmed) and the visual tokens per layer"}.get(
        cls.stage, "each run's answers")
    print(f"\nwrote {out}: the first image with {picture}")
    return 0
