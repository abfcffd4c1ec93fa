"""What the attention interventions cost at real widths: prefill and per-token decode time of
``var`` and ``vhr`` (alone and after pruning) relative to the stock model, measured in one run.

    python scripts/bench_attention.py                       # LLaVA-1.5-7B widths, 4 LLM + 2 tower layers, CPU
    python scripts/bench_attention.py --device cuda --dtype bfloat16 --llm-layers 32 --vision-layers 24

Random weights have no massive activations, so ``var`` gets the two channels with the largest
|x_d|/RMS(x) (``vtprune.methods.var.calibrate`` on the random model) and ``--tau`` low enough that it
finds sinks and redistributes — the cost of the real path, not of a no-op; the script prints how
many (row, head) pairs it changed. Decode time per token: greedy steps with the cache after the
prefill, timed apart from it; medians of ``--repeats``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

import vtprune
from vtprune.methods.var import rms_ratio

HERE = os.path.dirname(os.path.abspath(__file__))


def _bench_prefill():
    sys.path.insert(0, HERE)
    import bench_prefill

    return bench_prefill


def sink_dims(model, inputs, top=2):
    """The ``top`` channels with the largest |x_d|/RMS(x) in the LLM's residual stream."""
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states
    peak = None
    for x in hidden[1:-1]:
        ratio = rms_ratio(x[0]).amax(0)
        peak = ratio if peak is None else torch.maximum(peak, ratio)
    values, dims = peak.topk(top)
    return dims.tolist(), float(values.min())


def timings(model, inputs, tokens, repeats, device):
    """Median prefill seconds and decode seconds per token (greedy, with the cache, as ``generate``
    runs it: the original-length mask grows by one per step), after one warm-up round."""
    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    prefills, decodes = [], []
    with torch.no_grad():
        for r in range(repeats + 1):
            sync()
            start = time.perf_counter()
            out = model(**inputs, use_cache=True, logits_to_keep=1)
            sync()
            middle = time.perf_counter()
            mask = inputs["attention_mask"]
            for _ in range(tokens):
                token = out.logits[:, -1:].argmax(-1)
                mask = torch.cat([mask, torch.ones_like(token)], 1)
                out = model(input_ids=token, attention_mask=mask, past_key_values=out.past_key_values,
                            use_cache=True)
            sync()
            if r:
                prefills.append(middle - start)
                decodes.append((time.perf_counter() - middle) / tokens)
    return statistics.median(prefills), statistics.median(decodes)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llava-1.5-7b")
    parser.add_argument("--llm-layers", type=int, default=4)
    parser.add_argument("--vision-layers", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=16, help="decode tokens timed")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tau", type=float, default=None, help="var threshold (default: 60%% of the peak)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    bp = _bench_prefill()
    model = bp.build(args.model, args.llm_layers, args.vision_layers, dtype, args.device).eval()
    inputs, n_visual = bp.inputs_for(args.model, model, args.device, dtype)
    dims, peak = sink_dims(model, inputs)
    tau = args.tau if args.tau is not None else 0.6 * peak
    var = {"sink_dims": dims, "tau": tau}
    settings = [("stock", None, {}), ("var", "var", var), ("vhr", "vhr", {}),
                ("fastervlm keep 0.25", "fastervlm", {"keep": 0.25}),
                ("fastervlm keep 0.25 + var", ["fastervlm", "var"], {"keep": 0.25, **var}),
                ("fastervlm keep 0.25 + vhr", ["fastervlm", "vhr"], {"keep": 0.25})]
    rows = []
    for label, method, options in settings:
        if method is None:
            prefill, decode = timings(model, inputs, args.tokens, args.repeats, args.device)
            extra = ""
        else:
            with vtprune.wrapped(model, method, **options):
                prefill, decode = timings(model, inputs, args.tokens, args.repeats, args.device)
                stats = vtprune.stats(model)
                extra = ""
                if "var" in stats:
                    extra = f"{sum(stats['var']['row_heads_changed_last_call'].values())} (row, head) pairs changed"
                elif "vhr" in stats:
                    extra = f"{sum(sum(v) for v in stats['vhr']['heads_per_layer'].values())} heads reinforced"
        rows.append((label, prefill, decode, extra))
        print(label, f"{prefill:.3f}s", f"{decode * 1000:.1f}ms/token", extra, flush=True)
    base_prefill, base_decode = rows[0][1], rows[0][2]
    print(f"\n{args.model}, {args.llm_layers} LLM + {args.vision_layers} tower layers, {n_visual} visual tokens, "
          f"{args.device} {args.dtype}; var sink dims {dims}, tau {tau:.2f} (peak {peak:.2f})\n")
    print("| setting | prefill s | vs stock | decode ms/token | vs stock | |")
    print("|---|---|---|---|---|---|")
    for label, prefill, decode, extra in rows:
        print(f"| {label} | {prefill:.3f} | {prefill / base_prefill:.2f}x | {decode * 1000:.1f} | "
              f"{decode / base_decode:.2f}x | {extra} |")


if __name__ == "__main__":
    main()
