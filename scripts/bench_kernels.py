"""Achieved bandwidth of the fused Triton gathers vs. the torch chain they replace vs. a plain copy.

    python scripts/bench_kernels.py            # needs a CUDA GPU
    TRITON_INTERPRET=1 python scripts/bench_kernels.py --smoke   # tiny shapes on a CPU: checks the script

Shapes: the LLM input of LLaVA-1.5-7B (576 visual tokens, D 4096), LLaVA-NeXT-7B (2,880 visual,
D 4096) and Qwen2.5-VL-7B (1,296 visual, D 3584, 3-row mrope positions), batch 1 and 16, keeping
10% of the visual tokens.
GB/s counts the bytes read and written once; the copy column moves the same bytes with
``Tensor.copy_``.  Targets: >= 80% of copy bandwidth and >= 1.5x the torch chain.  Every kernel's
output is first checked bitwise against the torch path.  Writes the table to ``--out`` too.
"""

from __future__ import annotations

import argparse
import time

import torch

from vtprune.kernels import gather as ref

# name: (visual tokens, text tokens, hidden size, position rows)
SHAPES = {"llava-1.5-7b": (576, 40, 4096, 1), "llava-next-7b": (2880, 40, 4096, 1), "qwen2.5-vl-7b": (1296, 40, 3584, 3)}
SMOKE_SHAPES = {"smoke": (24, 8, 64, 3)}


def bench(fn, device, repeats):
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / repeats / 1000
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b) if x is not None)


def run(shapes, batches, keep, dtype, device, repeats):
    from vtprune.kernels.triton_gather import gather_cut_triton

    rows = []
    for name, (visual, text, d, pos_rows) in shapes.items():
        for batch in batches:
            length = visual + text
            kept = max(1, int(visual * keep))
            embeds = torch.randn(batch, length, d, device=device, dtype=dtype)
            mask = torch.ones(batch, length, dtype=torch.long, device=device)
            positions = torch.arange(length, device=device).expand(pos_rows, batch, length).contiguous()
            half = text // 2
            keep_idx = torch.cat([torch.arange(half), half + torch.randperm(visual)[:kept].sort().values,
                                  torch.arange(half + visual, length)]).to(device)
            index = keep_idx.expand(batch, -1).contiguous()
            real = torch.ones_like(index, dtype=torch.bool)
            if not _same(gather_cut_triton(embeds, index, real, mask, positions),
                         ref.gather_cut(embeds, index, real, mask, positions)):
                raise AssertionError(f"gather_cut_triton differs from the torch path on {name}, batch {batch}")
            out_bytes = batch * index.shape[1] * (d * embeds.element_size() + 8 + 8 * pos_rows)
            moved = 2 * out_bytes
            t_kernel = bench(lambda: gather_cut_triton(embeds, index, real, mask, positions), device, repeats)
            t_torch = bench(lambda: ref.gather_cut(embeds, index, real, mask, positions), device, repeats)
            src = torch.empty(out_bytes, dtype=torch.uint8, device=device)
            dst = torch.empty_like(src)
            t_copy = bench(lambda: dst.copy_(src), device, repeats)
            rows.append((f"cut {name}", batch, moved / t_kernel / 1e9, moved / t_torch / 1e9, moved / t_copy / 1e9))
    return rows


def table(rows) -> str:
    lines = ["| what | batch | triton GB/s | torch chain GB/s | copy GB/s | triton/copy | triton/torch |",
             "|---|---|---|---|---|---|---|"]
    for what, batch, k, t, c in rows:
        lines.append(f"| {what} | {batch} | {k:.1f} | {t:.1f} | {c:.1f} | {k / c:.0%} | {k / t:.2f}x |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=float, default=0.1)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on the CPU (with TRITON_INTERPRET=1): checks the script, not the speed")
    parser.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    if args.smoke:
        rows = run(SMOKE_SHAPES, (1, 2), args.keep, getattr(torch, args.dtype), "cpu", 1)
    elif not torch.cuda.is_available():
        print("bench_kernels needs a CUDA GPU; on a CPU the kernels only run in Triton's interpreter "
              "(TRITON_INTERPRET=1 ... --smoke checks this script).")
        return []
    else:
        rows = run(SHAPES, (1, 16), args.keep, getattr(torch, args.dtype), "cuda", args.repeats)
    md = table(rows)
    print(md)
    if args.out:
        with open(args.out, "w") as f:
            f.write(md + "\n")
    return rows


if __name__ == "__main__":
    main()
