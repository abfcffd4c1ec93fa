"""Serving throughput with vtprune inside vLLM: requests/s and time to first token, unpruned vs pruned.

    DIR/bin/python scripts/bench_vllm.py                      # the toy model on this machine's CPU (~4 min)
    DIR/bin/python scripts/bench_vllm.py --keeps 1,0.25,0.1,0.05 --method divprune --n 64

Runs in the serving venv (``bash scripts/vllm_cpu_env.sh DIR``).  Every (method, keep) is served in its own
process (vLLM keeps a model's input processor per process).  For each concurrency ``c`` (``--concurrency``,
default 1 and 8) the engine is started with ``max_num_seqs = c`` and answers ``--n`` toy questions submitted
at once: requests/s = n / wall time of the batch (4 new tokens each); time to first token = the median over
the questions of a 1-token request's latency at concurrency 1.  Prints a markdown table and each row's
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


def worker(method, keep, n, concurrency):
    from vllm import SamplingParams

    from vtprune import toy
    from vtprune.serving import LLM

    samples = toy.eval_split(n=n)
    requests = [{"prompt": toy.prompt(s["question"]), "multi_modal_data": {"image": s["image"]}} for s in samples]
    llm = LLM("toy", method=method, keep=keep, enforce_eager=True, max_num_seqs=concurrency)
    llm.generate(requests[:2], SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)  # warm-up
    ttft = []
    if concurrency == 1:
        for r in requests[: min(n, 16)]:
            start = time.perf_counter()
            llm.generate([r], SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
            ttft.append(time.perf_counter() - start)
    start = time.perf_counter()
    outs = llm.generate(requests, SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False)
    wall = time.perf_counter() - start
    right = sum(o.outputs[0].text.split()[:1] == [s["answer"]] for o, s in zip(outs, samples))
    return {"method": method, "keep": keep, "concurrency": concurrency, "n": n, "requests_per_s": n / wall,
            "ttft_ms": 1000 * statistics.median(ttft) if ttft else None, "accuracy": right / n,
            "prompt_tokens": len(outs[0].prompt_token_ids)}


def run_one(method, keep, n, concurrency):
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    out = subprocess.run([sys.executable, __file__, "--worker", method, str(keep), str(n), str(concurrency)],
                         capture_output=True, text=True, env=env, timeout=900)
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
        print("RESULT " + json.dumps(worker(method, keep, n, concurrency)), flush=True)
        return None
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="divprune",
                        help="a served method: random, uniform, pool, divprune, fastervlm, vtc_cls, visionzip (default divprune)")
    parser.add_argument("--keeps", default="1,0.25,0.1,0.05")
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--n", type=int, default=32, help="questions per batch (default 32)")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    rows = []
    for keep in [float(k) for k in args.keeps.split(",")]:
        for c in [int(c) for c in args.concurrency.split(",")]:
            rows.append(run_one(args.method if keep != 1.0 else "random", keep, args.n, c))
            print(json.dumps(rows[-1]), flush=True)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
