"""Cost of each selector's choice on one clip (or image), against the cost of the tokens it saves.

    python scripts/bench_selection.py                       # a 16-frame clip at Qwen2.5-VL-7B widths
    python scripts/bench_selection.py --slices 1 --side 24  # an image of 576 tokens

Times ``vtprune.choose.choose`` — the whole selection both engines run, budgets and summaries included —
on random LLM-input features of a clip of ``--slices`` temporal slices of ``--side`` x ``--side`` tokens
and width ``--dim`` (defaults: 8 slices of 14 x 14 = 1,568 tokens, 3,584 wide), each method at ``--keep``,
median of ``--repeats`` after a warm-up.  Next to it, the time of one linear layer of that width over the
tokens the method dropped (``dim x dim`` on the dropped rows): the selection pays for itself when it costs
less than a few such layers (a decoder layer holds about 12 of them).  Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from vtprune import methods
from vtprune.choose import Seen, choose
from vtprune.layout import ImageLayout

DEFAULT = "random,uniform,uniform_time,divprune,fastervlm,evs,vidcom2,fastvid,flashvid,holitom,dycoke"


def clip(slices, side, dim, seed=0):
    """A clip's layout, features (each slice the same scene, perturbed) and tower scores."""
    layout = ImageLayout.from_grids([(side, side)] * slices)
    layout.frame, layout.media = layout.grid.clone(), "video" if slices > 1 else "image"
    gen = torch.Generator().manual_seed(seed)
    scene = torch.randn(side * side, dim, generator=gen)
    features = torch.cat([scene + 0.5 * torch.randn(side * side, dim, generator=gen) for _ in range(slices)])
    return layout, features, torch.rand(layout.n, generator=gen)


def timed(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(args) -> list:
    layout, features, scores = clip(args.slices, args.side, args.dim)
    weight = torch.randn(args.dim, args.dim) / args.dim ** 0.5
    rows = []
    for name in args.methods:
        method = methods.get(name)(keep=args.keep)
        method.validate()
        seen = Seen(layout, features, cls={0: scores} if method.needs_cls else None)
        (choice,) = choose(method, [seen], torch.Generator().manual_seed(0))
        dropped = layout.n - choice.kept.numel()
        select = timed(lambda: choose(method, [seen], torch.Generator().manual_seed(0)), args.repeats)
        layer = timed(lambda: features[:max(dropped, 1)] @ weight, args.repeats) if dropped else float("nan")
        rows.append({"method": name, "tokens": layout.n, "kept": int(choice.kept.numel()), "select_ms": select * 1000,
                     "linear_saved_ms": layer * 1000, "layers_to_repay": select / layer if dropped else float("nan")})
        print(rows[-1], flush=True)
    return rows


def table(rows) -> str:
    lines = ["| method | kept / tokens | selection ms | one dim x dim layer on the dropped tokens, ms | "
             "layers of that size to repay it |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['kept']}/{r['tokens']} | {r['select_ms']:.1f} | {r['linear_saved_ms']:.1f} | "
                     f"{r['layers_to_repay']:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=DEFAULT)
    parser.add_argument("--keep", type=float, default=0.25)
    parser.add_argument("--slices", type=int, default=8)
    parser.add_argument("--side", type=int, default=14)
    parser.add_argument("--dim", type=int, default=3584)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.methods = args.methods.split(",")
    rows = run(args)
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
