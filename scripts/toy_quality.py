"""Accuracy of pruning methods on the embedded toy benchmark, next to the baselines.

    python scripts/toy_quality.py --n 400 --methods random,uniform,fastervlm,vtc_cls --keep 1.0,0.25,0.1,0.05

Prints a markdown table: accuracy overall and per question type, and the number of visual
tokens per image the LLM actually saw, for every method x budget (random averaged over seeds).
"""

from __future__ import annotations

import argparse
import json

import torch

import vtprune
from vtprune import toy


def run(methods, keeps, n, seeds, batch_size):
    model, processor = toy.load()
    samples = toy.eval_split(n=n)
    rows = []
    for keep in keeps:
        for method in methods:
            runs = []
            for seed in range(seeds if method == "random" else 1):
                options = {"keep": keep, **({"seed": seed} if method == "random" else {})}
                with vtprune.wrapped(model, method, **options):
                    result = toy.evaluate(model, processor, samples, batch_size=batch_size, progress=False)
                    tokens = vtprune.stats(model)["samples"][0]["tokens_out"]
                runs.append(result)
            mean = lambda f: sum(f(r) for r in runs) / len(runs)  # noqa: E731
            rows.append({
                "method": method, "keep": keep, "tokens": tokens, "runs": len(runs),
                "overall": mean(lambda r: r["overall"]),
                **{t: mean(lambda r, t=t: r["by_type"].get(t, float("nan"))) for t in toy.QUESTION_TYPES},
            })
            print(json.dumps(rows[-1]), flush=True)
    return rows


def table(rows) -> str:
    head = "| keep | visual tokens | method | overall | " + " | ".join(toy.QUESTION_TYPES) + " |"
    lines = [head, "|" + "---|" * (4 + len(toy.QUESTION_TYPES))]
    for r in rows:
        lines.append(f"| {r['keep']} | {r['tokens']} | {r['method']}{' (%d seeds)' % r['runs'] if r['runs'] > 1 else ''}"
                     f" | {r['overall']:.3f} | " + " | ".join(f"{r[t]:.3f}" for t in toy.QUESTION_TYPES) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="random,uniform,fastervlm,vtc_cls")
    parser.add_argument("--keep", default="1.0,0.25,0.1,0.05")
    parser.add_argument("--n", type=int, default=400, help="evaluation questions (default 400)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds for random (default 3)")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keeps = [float(k) if "." in k else int(k) for k in args.keep.split(",")]
    rows = run(args.methods.split(","), keeps, args.n, args.seeds, args.batch_size)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
