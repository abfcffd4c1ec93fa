"""Accuracy of pruning methods on the embedded toy benchmark, next to the baselines.

    python scripts/toy_quality.py --n 400 --methods random,uniform,fastervlm,vtc_cls --keep 1.0,0.25,0.1,0.05
    python scripts/toy_quality.py --methods random,fastervlm,fastervlm:source=received --keep 0.1
    python scripts/toy_quality.py --spec exit layer=1 --spec fastv layer=1 keep=0.25 --spec dyvte weights=toy
    python scripts/toy_quality.py --spec var --spec var tau=4 --spec vhr --spec fastervlm+vhr keep=0.25
    python scripts/toy_quality.py --video --keep 1.0,0.25,0.1,0.05        # the toy video model (vtprune.toy_video)

Prints a markdown table: accuracy overall and per question type, and the number of visual
tokens per image the LLM actually saw, for every method x budget (random averaged over seeds); with ``--video`` the same on
the toy video benchmark, per clip, with the event questions' accuracy in their own column;
for in-LLM methods (``--spec``) also the exit layer(s) and the share of prefill LLM work saved,
and the prefill time and decode time per token (``--timing-batch`` prompts, 32 greedy tokens)
relative to the stock model, measured in the same run.
"""

from __future__ import annotations

import argparse
import json

import torch

import vtprune
from vtprune import toy, toy_video
from vtprune.spec import parse_spec, split_specs


IMAGE_METHODS = "random,uniform,fastervlm,vtc_cls"
VIDEO_METHODS = ("random,pool,uniform_time,uniform:scope=frame,evs,vidcom2,fastvid,flashvid,holitom,dycoke,divprune,"
                 "fastervlm")


class Bench:
    """The benchmark a run evaluates: the toy LLaVA on images, or the toy Qwen3-VL on clips."""

    def __init__(self, video: bool, n: int):
        self.video = video
        if video:
            self.model, _ = toy_video.load()
            self.samples, self.types, self.medium = toy_video.eval_split(n=n), toy_video.QUESTION_TYPES, "videos"
        else:
            self.model, self.processor = toy.load()
            self.samples, self.types, self.medium = toy.eval_split(n=n), toy.QUESTION_TYPES, "images"

    def evaluate(self, batch_size):
        if self.video:
            return toy_video.evaluate(self.model, self.samples, batch_size=batch_size, progress=False)
        return toy.evaluate(self.model, self.processor, self.samples, batch_size=batch_size, progress=False)

    def tokens(self):
        """Visual tokens per image (clip) the LLM saw in the last batch, their mean."""
        items = [x for s in vtprune.stats(self.model)["samples"] for x in s.get(self.medium, [])]
        return round(sum(x["tokens_out"] for x in items) / len(items), 1)


def run(methods, keeps, n, seeds, batch_size, video=False):
    bench = Bench(video, n)
    rows = []
    for keep in keeps:
        for method in methods:
            names, extra = parse_spec(method)
            name = "+".join(names)
            runs = []
            for seed in range(seeds if name == "random" else 1):
                options = {"keep": keep, **extra, **({"seed": seed} if name == "random" else {})}
                with vtprune.wrapped(bench.model, names, **options):
                    result = bench.evaluate(batch_size)
                    tokens = bench.tokens()
                runs.append(result)
            mean = lambda f: sum(f(r) for r in runs) / len(runs)  # noqa: E731
            rows.append({
                "method": method, "keep": keep, "tokens": tokens, "runs": len(runs),
                "overall": mean(lambda r: r["overall"]),
                **({"event": mean(lambda r: r["event"])} if video else {}),
                **{t: mean(lambda r, t=t: r["by_type"].get(t, float("nan"))) for t in bench.types},
            })
            print(json.dumps(rows[-1]), flush=True)
    return rows


def run_specs(specs, n, batch_size, timing_batch=1, decode_tokens=32):
    """Rows for explicit method specs (``[name, "opt=value", ...]``), with the stock model first."""
    import time

    model, processor = toy.load()
    samples = toy.eval_split(n=n)
    batch = processor(images=[s["image"] for s in samples[:timing_batch]],
                      text=[toy.prompt(s["question"]) for s in samples[:timing_batch]], padding=True, return_tensors="pt")

    def prefill_seconds():
        with torch.no_grad():
            model(**batch)
            times = []
            for _ in range(9):
                start = time.perf_counter()
                model(**batch)
                times.append(time.perf_counter() - start)
        return sorted(times)[4]

    def decode_seconds():
        """Seconds per generated token: (n+1 greedy tokens - 1 token) / n, medians of 5 runs each."""
        def gen(n):
            with torch.no_grad():
                model.generate(**batch, max_new_tokens=n, min_new_tokens=n, do_sample=False)

        def median_time(n):
            gen(n)
            times = []
            for _ in range(5):
                start = time.perf_counter()
                gen(n)
                times.append(time.perf_counter() - start)
            return sorted(times)[2]

        return max(median_time(decode_tokens + 1) - median_time(1), 1e-9) / decode_tokens

    stock_time = prefill_seconds()
    stock_decode = decode_seconds()
    rows = []
    for spec in [["stock"]] + specs:
        name = spec[0]
        names, options = parse_spec(f"{name}:{';'.join(spec[1:])}") if name != "stock" else ([], {})
        if name == "stock":
            result, seconds, exit_info = toy.evaluate(model, processor, samples, batch_size, progress=False), stock_time, {}
            decode = stock_decode
        else:
            with vtprune.wrapped(model, names, **options):
                result = toy.evaluate(model, processor, samples, batch_size=batch_size, progress=False)
                seconds = prefill_seconds()
                decode = decode_seconds()
                with torch.no_grad():
                    model(**batch)
                exit_info = vtprune.stats(model).get("exit", {})
        layers = exit_info.get("exit_layers")
        rows.append({
            "method": " ".join(spec), "overall": result["overall"],
            **{t: result["by_type"].get(t, float("nan")) for t in toy.QUESTION_TYPES},
            "exit_layer": (sum(x if x is not None else len(model.model.language_model.layers) for x in layers) / len(layers)
                           if layers else exit_info.get("layer")),
            "llm_flops_saved": exit_info.get("llm_flops_saved", 0.0),
            "prefill_vs_stock": seconds / stock_time,
            "decode_vs_stock": decode / stock_decode,
        })
        print(json.dumps(rows[-1]), flush=True)
    return rows


def spec_table(rows) -> str:
    head = ("| method | overall | " + " | ".join(toy.QUESTION_TYPES)
            + " | exit layer | LLM prefill work saved | prefill time vs stock | decode time/token vs stock |")
    lines = [head, "|" + "---|" * (6 + len(toy.QUESTION_TYPES))]
    for r in rows:
        layer = "-" if r["exit_layer"] is None else f"{r['exit_layer']:.2f}"
        lines.append(f"| {r['method']} | {r['overall']:.3f} | " + " | ".join(f"{r[t]:.3f}" for t in toy.QUESTION_TYPES)
                     + f" | {layer} | {r['llm_flops_saved']:.1%} | {r['prefill_vs_stock']:.2f}x"
                     f" | {r['decode_vs_stock']:.2f}x |")
    return "\n".join(lines)


def table(rows, video=False) -> str:
    types = (["event"] if video else []) + list(toy_video.QUESTION_TYPES if video else toy.QUESTION_TYPES)
    unit = "clip" if video else "image"
    head = f"| keep | visual tokens per {unit} | method | overall | " + " | ".join(types) + " |"
    lines = [head, "|" + "---|" * (4 + len(types))]
    for r in rows:
        lines.append(f"| {r['keep']} | {r['tokens']} | {r['method']}{' (%d seeds)' % r['runs'] if r['runs'] > 1 else ''}"
                     f" | {r['overall']:.3f} | " + " | ".join(f"{r[t]:.3f}" for t in types) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=None,
                        help=f"comma-separated method specs (default: {IMAGE_METHODS}; with --video: {VIDEO_METHODS})")
    parser.add_argument("--video", action="store_true", help="the toy video benchmark (vtprune.toy_video)")
    parser.add_argument("--keep", default="1.0,0.25,0.1,0.05")
    parser.add_argument("--n", type=int, default=400, help="evaluation questions (default 400)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds for random (default 3)")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--timing-batch", type=int, default=1, help="prompts per timed prefill/decode (--spec)")
    parser.add_argument("--spec", action="append", nargs="+", metavar="NAME OPT=VALUE",
                        help="evaluate this method with these options instead of the methods x keep grid; repeatable")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.spec and args.video:
        parser.error("--spec (timings of in-LLM methods) runs on the image toy; use --methods with --video")
    if args.spec:
        rows = run_specs(args.spec, args.n, args.batch_size, args.timing_batch)
        print(spec_table(rows))
    else:
        keeps = [float(k) if "." in k else int(k) for k in args.keep.split(",")]
        methods = args.methods or (VIDEO_METHODS if args.video else IMAGE_METHODS)
        rows = run(split_specs(methods), keeps, args.n, args.seeds, args.batch_size, args.video)
        print(table(rows, args.video))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
