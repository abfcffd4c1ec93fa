"""Achieved bandwidth of the fused Triton gathers vs. the torch chain they replace vs. a plain copy.

    python scripts/bench_kernels.py            # needs a CUDA GPU

Shapes: the LLM input of LLaVA-1.5-7B (576 visual tokens, D 4096), LLaVA-NeXT-7B (2,880 visual,
D 4096) and Qwen2.5-VL-7B (1,296 visual, D 3584, 3-row mrope positions), batch 1 and 16, keeping
10% of the visual tokens; and KV compaction of 32 layers (H 32, D 128) to the same kept set.
GB/s counts the bytes read and written once; the copy column moves the output's bytes with
``Tensor.copy_``.  Targets: >= 80% of copy bandwidth and >= 1.5x the torch chain.
"""

from __future__ import annotations

import argparse

import torch

from vtprune.kernels import gather as ref

SHAPES = {"llava-1.5-7b": (576, 40, 4096, 1), "llava-next-7b": (2880, 40, 4096, 1), "qwen2.5-vl-7b": (1296, 40, 3584, 3)}


def bench(fn, repeats=50):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats / 1000


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=float, default=0.1)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_kernels needs a CUDA GPU; on a CPU the kernels only run in Triton's interpreter (tests).")
        return
    from vtprune.kernels.triton_gather import compact_kv_triton, gather_cut_triton

    dtype = getattr(torch, args.dtype)
    rows = []
    for name, (visual, text, d, pos_rows) in SHAPES.items():
        for batch in (1, 16):
            length = visual + text
            kept = int(visual * args.keep)
            embeds = torch.randn(batch, length, d, device="cuda", dtype=dtype)
            mask = torch.ones(batch, length, dtype=torch.long, device="cuda")
            positions = torch.arange(length, device="cuda").expand(pos_rows, batch, length).contiguous()
            keep_idx = torch.cat([torch.arange(20), 20 + torch.randperm(visual)[:kept].sort().values,
                                  torch.arange(20 + visual, length)]).cuda()
            index = keep_idx.expand(batch, -1).contiguous()
            real = torch.ones_like(index, dtype=torch.bool)
            out_bytes = batch * index.shape[1] * (d * embeds.element_size() + 8 + 8 * pos_rows)
            moved = 2 * out_bytes
            t_kernel = bench(lambda: gather_cut_triton(embeds, index, real, mask, positions))
            t_torch = bench(lambda: ref.gather_cut(embeds, index, real, mask, positions))
            src = torch.empty(out_bytes, dtype=torch.uint8, device="cuda")
            dst = torch.empty_like(src)
            t_copy = bench(lambda: dst.copy_(src))
            rows.append((f"cut {name}", batch, moved / t_kernel / 1e9, moved / t_torch / 1e9, moved / t_copy / 1e9))
            keys = torch.randn(batch, 32, length, 128, device="cuda", dtype=dtype)
            values = torch.randn_like(keys)
            kv_bytes = 2 * 2 * batch * 32 * index.shape[1] * 128 * keys.element_size()
            t_kv = bench(lambda: [compact_kv_triton(keys, values, index) for _ in range(32)], repeats=10) / 32
            t_kv_torch = bench(lambda: [ref.compact_kv(keys, values, index) for _ in range(32)], repeats=10) / 32
            kv_src = torch.empty(kv_bytes // 2, dtype=torch.uint8, device="cuda")
            t_kv_copy = bench(lambda: kv_src.clone())
            rows.append((f"kv {name} (per layer)", batch, kv_bytes / t_kv / 1e9, kv_bytes / t_kv_torch / 1e9,
                         kv_bytes / t_kv_copy / 1e9))
    print("| what | batch | triton GB/s | torch chain GB/s | copy GB/s | triton/copy | triton/torch |")
    print("|---|---|---|---|---|---|---|")
    for what, batch, k, t, c in rows:
        print(f"| {what} | {batch} | {k:.0f} | {t:.0f} | {c:.0f} | {k / c:.0%} | {k / t:.2f}x |")


if __name__ == "__main__":
    main()
