"""Serving throughput with vtprune inside vLLM: requests/s and time to first token, unpruned vs pruned.

    DIR/bin/python scripts/bench_vllm.py                      # the toy model on this machine's CPU (~4 min)
    DIR/bin/python scripts/bench_vllm.py --keeps 1,0.25,0.1,0.05 --method divprune --n 64
    DIR/bin/python scripts/bench_vllm.py --method "divprune,divprune:summary=4" --keeps 1,0.1
    DIR/bin/python scripts/bench_vllm.py --model FOLDER --dtype bfloat16   # a served model folder (real widths:
                                                                           # scripts/real_width_model.py)

Runs in the serving venv (``bash scripts/vllm_cpu_env.sh DIR``).  Every (method, keep) is served in its own
process (vLLM keeps a model's input processor per process).  For each concurrency ``c`` (``--concurrency``,
default 1 and 8) the engine is started with ``max_num_seqs = c`` and answers ``--n`` toy questions submitted
at once: requests/s = n / wall time of the batch (4 new tokens each); time to first token = the median over
the questions of a 1-token request's latency at concurrency 1, on up to 16 other questions (no image is seen
twice: vLLM's encoder cache would skip the tower for a repeated one, and more pruned outputs fit in it).  Prints a markdown table and each row's
ratio to the unpruned row measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def worker(spec, keep, n, concurrency, model="toy", dtype=None):
    from vllm import SamplingParams

    from vtprune import toy
    from vtprune.serving import LLM
    from vtprune.spec import parse_spec

    # the first-token prompts come after the batch's: distinct images, so that no image's encoder output or
    # prefix is reused between the two (a smaller pruned output fits more images in vLLM's encoder cache)
    timed = min(n, 16)
    samples = toy.eval_split(n=n + timed + 2)
    requests = [{"prompt": toy.prompt(s["question"]), "multi_modal_data": {"image": s["image"]}} for s in samples]
    requests, first, warm = requests[:n], requests[n:n + timed], requests[n + timed:]
    samples = samples[:n]
    (method,), options = parse_spec(spec)
    extra = {} if model == "toy" else {"max_model_len": 4096, "limit_mm_per_prompt": {"image": 1}}
    if dtype:
        extra["dtype"] = dtype
    llm = LLM(model, method=method, keep=keep, options=options, enforce_eager=True, max_num_seqs=concurrency,
              **extra)
    llm.generate(warm, SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)  # warm-up
    ttft = []
    if concurrency == 1:
        for r in first:
            start = time.perf_counter()
            llm.generate([r], SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
            ttft.append(time.perf_counter() - start)
    start = time.perf_counter()
    outs = llm.generate(requests, SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False)
    wall = time.perf_counter() - start
    right = sum(o.outputs[0].text.split()[:1] == [s["answer"]] for o, s in zip(outs, samples))
    return {"method": spec, "keep": keep, "concurrency": concurrency, "n": n, "requests_per_s": n / wall,
            "ttft_ms": 1000 * statistics.median(ttft) if ttft else None, "accuracy": right / n,
            "prompt_tokens": len(outs[0].prompt_token_ids)}


def run_one(method, keep, n, concurrency, model="toy", dtype=None):
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    out = subprocess.run([sys.executable, __file__, "--worker", method, str(keep), str(n), str(concurrency), model,
                          dtype or ""], capture_output=True, text=True, env=env, timeout=1800)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(f"{method} keep={keep}: the serving process failed:\n{out.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def table(rows) -> str:
    base = {r["concurrency"]: r for r in rows if r["keep"] == 1.0}
    lines = ["| method | keep | prompt tokens | concurrency | requests/s | vs keep 1 | TTFT ms | vs keep 1 | accuracy |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b = base.get(r["concurrency"])
        speed = f"{r['requests_per_s'] / b['requests_per_s']:.2f}x" if b else "-"
        ttft = f"{r['ttft_ms']:.1f}" if r["ttft_ms"] is not None else "-"
        ttft_ratio = f"{b['ttft_ms'] / r['ttft_ms']:.2f}x" if b and r["ttft_ms"] and b["ttft_ms"] else "-"
        lines.append(f"| {r['method'] if r['keep'] != 1.0 else '(none)'} | {r['keep']} | {r['prompt_tokens']} | "
                     f"{r['concurrency']} | {r['requests_per_s']:.2f} | {speed} | {ttft} | {ttft_ratio} | "
                     f"{r['accuracy']:.3f} |")
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        method, keep, n, concurrency = argv[1], float(argv[2]), int(argv[3]), int(argv[4])
        print("RESULT " + json.dumps(worker(method, keep, n, concurrency, argv[5], argv[6] or None)), flush=True)
        return None
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="divprune",
                        help="served methods, comma-separated, each with options: random, uniform, pool, divprune, "
                             "fastervlm, vtc_cls, visionzip, e.g. 'divprune:summary=4' (default divprune)")
    parser.add_argument("--model", default="toy", help="'toy' (default) or a served model folder")
    parser.add_argument("--dtype", help="vLLM's dtype (default: the toy's float32, the folder's own otherwise)")
    parser.add_argument("--keeps", default="1,0.25,0.1,0.05")
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--n", type=int, default=32, help="questions per batch (default 32)")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    rows = []
    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    for keep in [float(k) for k in args.keeps.split(",")]:
        for method in (methods if keep != 1.0 else ["random"]):
            for c in [int(c) for c in args.concurrency.split(",")]:
                rows.append(run_one(method, keep, args.n, c, args.model, args.dtype))
                print(json.dumps(rows[-1]), flush=True)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
