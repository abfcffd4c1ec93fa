"""Memory and offload: prefill time, peak memory and KV-cache bytes, stock vs pruned, in memory
or dispatched by accelerate with half of the tower and LLM layers offloaded to disk.

    python scripts/bench_memory.py                          # LLaVA-1.5-7B widths, 2+2 layers, CPU
    python scripts/bench_memory.py --device-map offload --keeps 0.25,0.1
    python scripts/bench_memory.py --device cuda --device-map auto --llm-layers 32 --vision-layers 24

Every configuration runs in a fresh process (peak memory is per process: max RSS on CPU, CUDA
max-allocated on GPU). Random-weight models at real widths (``bench_prefill.build``) are saved
once and loaded with ``device_map``: ``none`` (in memory), ``offload`` (the second half of the
vision-tower layers and of the LLM layers on "disk", the rest on the CPU), ``auto``
(accelerate's choice). For each it prints the prefill time (median of ``--repeats``), the time
relative to the unwrapped model under the same map (at keep 1 that is the overhead of the hooks
on an offloaded model), peak memory, the KV cache the prefill stored and ``vtprune.stats``'s ``kv_bytes_saved``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def _bench_prefill():
    sys.path.insert(0, HERE)
    import bench_prefill

    return bench_prefill


def offload_map(model):
    """Second half of the tower layers and of the LLM layers on disk; every other subtree on cpu."""
    from vtprune.patches import adapter_for
    from vtprune.testing import disk_offload_map

    adapter = adapter_for(model)
    names = {id(m): n for n, m in model.named_modules()}
    lm_layers = adapter.language_model.layers
    tower_layers = next(m for n, m in model.named_modules() if n.endswith("encoder.layers") or n.endswith("blocks"))
    disk = [names[id(m)] for m in list(lm_layers)[len(lm_layers) // 2:]]
    disk += [names[id(m)] for m in list(tower_layers)[len(tower_layers) // 2:]]
    return disk_offload_map(model, disk)


def child(cfg):
    import torch

    import vtprune

    torch.set_num_threads(cfg["threads"])
    bp = _bench_prefill()
    cls = getattr(__import__("transformers"), cfg["cls"])
    kwargs = {"dtype": getattr(torch, cfg["dtype"])}
    if cfg["device_map"] == "offload":
        kwargs.update(device_map=cfg["map"], offload_folder=os.path.join(cfg["dir"], "offload"))
    elif cfg["device_map"] == "auto":
        kwargs.update(device_map="auto", offload_folder=os.path.join(cfg["dir"], "offload"))
    model = cls.from_pretrained(cfg["dir"], **kwargs).eval()
    if cfg["device_map"] == "none":
        model.to(cfg["device"])
    inputs, _ = bp.inputs_for(cfg["name"], model, cfg["device"], kwargs["dtype"])
    if cfg["method"] != "stock":
        vtprune.wrap(model, cfg["method"], keep=cfg["keep"])
    times = []
    with torch.no_grad():
        for i in range(cfg["repeats"] + 1):
            if cfg["device"].startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = model(**inputs, use_cache=True, logits_to_keep=1)
            if cfg["device"].startswith("cuda"):
                torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - start)
    cache = out.past_key_values
    kv = sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)
    peak = (torch.cuda.max_memory_allocated() if cfg["device"].startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    saved = vtprune.stats(model).get("kv_bytes_saved", 0) if vtprune.is_wrapped(model) else 0
    print("RESULT " + json.dumps({"prefill_s": statistics.median(times), "peak_bytes": peak, "kv_bytes": kv,
                                  "kv_bytes_saved": saved}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llava-1.5-7b", help="a width preset of bench_prefill.py")
    parser.add_argument("--llm-layers", type=int, default=2)
    parser.add_argument("--vision-layers", type=int, default=2)
    parser.add_argument("--device-map", default="none,offload", help="comma list of none, offload, auto")
    parser.add_argument("--method", default="fastervlm")
    parser.add_argument("--keeps", default="0.25,0.1")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(json.loads(args.child))
    import torch

    bp = _bench_prefill()
    folder = tempfile.mkdtemp(prefix="vtprune_bench_memory_")
    model = bp.build(args.model, args.llm_layers, args.vision_layers, torch.float32, "cpu")
    model.save_pretrained(folder)
    base = {"name": args.model, "dir": folder, "cls": type(model).__name__, "map": offload_map(model),
            "repeats": args.repeats, "device": args.device, "dtype": args.dtype, "threads": args.threads}
    del model
    rows = []
    # the method at keep 1 keeps every token: its time over stock's is the cost of the hooks alone
    runs = [("stock", 1.0), (args.method, 1.0)] + [(args.method, float(k)) for k in args.keeps.split(",")]
    for device_map in args.device_map.split(","):
        for method, keep in runs:
            cfg = dict(base, device_map=device_map, method=method, keep=keep)
            done = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)], capture_output=True,
                                  text=True)
            line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(done.stderr[-3000:])
            rows.append(dict(json.loads(line[7:]), device_map=device_map, method=method, keep=keep))
            print(json.dumps(rows[-1]), flush=True)
    stock = {r["device_map"]: r for r in rows if r["method"] == "stock"}
    print(f"\n{args.model}, {args.llm_layers} LLM + {args.vision_layers} tower layers, {args.device}, {args.dtype}\n")
    print("| device map | method | keep | prefill s | vs stock (same map) | peak MB | KV MB | KV saved MB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        s = stock[r["device_map"]]
        print(f"| {r['device_map']} | {r['method']} | {r['keep']} | {r['prefill_s']:.3f} | "
              f"{r['prefill_s'] / s['prefill_s']:.2f}x | {r['peak_bytes'] / 2**20:.0f} | {r['kv_bytes'] / 2**20:.1f} | "
              f"{r['kv_bytes_saved'] / 2**20:.1f} |")


if __name__ == "__main__":
    main()
