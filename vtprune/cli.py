"""The ``vtprune`` command: ``info``, ``demo``, ``eval``, ``calibrate``, ``toy-task``."""

from __future__ import annotations

import argparse
import platform
import sys


def _info(args) -> int:
    import torch
    import transformers

    import vtprune
    from vtprune import methods
    from vtprune.kernels import backend
    from vtprune.patches import supported

    print(f"vtprune       {vtprune.__version__}")
    print(f"python        {platform.python_version()}")
    print(f"torch         {torch.__version__} (cuda available: {torch.cuda.is_available()})")
    print(f"transformers  {transformers.__version__}")
    print(f"kernels       {backend()}")
    print("families:")
    for family, cls in supported().items():
        print(f"  {family:<12} {cls}")
    print("methods:")
    for name in methods.available():
        doc = (methods.get(name).__doc__ or "").strip().splitlines()[0]
        print(f"  {name:<12} {doc}")
    return 0


def _demo(args) -> int:
    from vtprune.demo import run

    return run(keeps=[float(k) if "." in k else int(k) for k in args.keep.split(",")], method=args.method,
               n=args.n, out=args.out, seed=args.seed)


def _relaunch(args, argv) -> int:
    """``vtprune eval --num-processes N``: the same command under torch.distributed.run, N ranks."""
    import os
    import subprocess

    rest, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == "--num-processes":
            skip = True
        elif not item.startswith("--num-processes="):
            rest.append(item)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.num_processes)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(args.num_processes), "-m", "vtprune.cli", *rest]
    print("vtprune eval: " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, env=env).returncode


def _eval(args) -> int:
    import os

    from vtprune.eval import sweep

    if args.num_processes > 1 and "WORLD_SIZE" not in os.environ:
        return _relaunch(args, args.argv)

    model_args = dict(item.split("=", 1) for item in args.model_args.split(",") if item) if args.model_args else {}
    model_args = {k: sweep.parse_value(v) for k, v in model_args.items()}
    records = sweep.run(model=args.model, tasks=[t for t in args.tasks.split(",") if t],
                        methods=[m for m in args.methods.split(",") if m], keeps=sweep.parse_keeps(args.keep),
                        out=args.out, limit=args.limit, seeds=args.seeds, batch_size=args.batch_size,
                        device=args.device, include_path=args.include_path, model_args=model_args,
                        lmms_model=args.lmms_model, use_lmms=args.lmms)
    if not records:  # a rank other than 0
        return 0
    with open(f"{args.out}/results.md") as f:
        print(f.read())
    print(f"{len(records)} cells; results, tables and plots in {args.out}/")
    return 0


def _toy_task(args) -> int:
    from vtprune.eval.toytask import write

    folder = write(args.folder, n=args.n, seed=args.seed)
    print(f"wrote the lmms-eval task 'vtprune_toy' to {folder}; use --include_path {folder}")
    return 0


def _calibrate(args) -> int:
    import json
    import os

    import torch

    from vtprune import toy, var

    if args.model == "toy":
        model, processor = toy.load()
    else:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        model = AutoModelForImageTextToText.from_pretrained(args.model, dtype="auto", device_map=args.device)
        processor = AutoProcessor.from_pretrained(args.model)
    model.eval()
    if args.images:
        from PIL import Image

        names = sorted(f for f in os.listdir(args.images) if f.lower().endswith((".png", ".jpg", ".jpeg", ".webp")))
        if not names:
            raise SystemExit(f"no .png/.jpg/.webp images in {args.images}")
        images = [Image.open(os.path.join(args.images, f)).convert("RGB") for f in names[:args.n]]
    else:  # the toy benchmark's scenes: any natural-ish image shows the massive activations
        images = [s["image"].convert("RGB") for s in toy.eval_split(n=args.n, seed=4321)]
    with torch.no_grad():
        result = var.calibrate(model, processor, images, prompt=args.prompt, top=args.top, tau=args.tau)
    out = args.out or var.cache_path(model)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: result[k] for k in ("sink_dims", "hits", "peak")}))
    if not result["hits"]:
        print(f"warning: no token reached |x_d|/RMS > {args.tau} (the largest values are under 'peak'); "
              "var will find no sinks at this tau")
    print(f"wrote {out}; vtprune.wrap(model, 'var') now uses these dimensions")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="vtprune",
        description="Visual-token pruning for Hugging Face VLMs: vtprune.wrap(model, method, keep=...).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = sub.add_parser("info", help="versions, supported model families, registered methods, kernel backend")
    info.set_defaults(func=_info)
    demo = sub.add_parser("demo", help="run the embedded toy model unpruned and pruned, offline")
    demo.add_argument("--keep", default="1.0,0.25,0.1", help="comma-separated budgets (default: 1.0,0.25,0.1)")
    demo.add_argument("--method", default="fastervlm", help="selection method (default: fastervlm)")
    demo.add_argument("--n", type=int, default=6, help="number of questions (default: 6)")
    demo.add_argument("--out", default="vtprune_demo.png", help="where to write the kept-token overlay PNG")
    demo.add_argument("--seed", type=int, default=0, help="seed of the questions")
    demo.set_defaults(func=_demo)
    ev = sub.add_parser("eval", help="sweep methods x budgets on benchmarks; tables, CSV, JSON and plots",
                        description="Run every method at every budget on the tasks (the toy benchmark natively, "
                        "anything else through lmms-eval), resuming finished cells, and write results.json, "
                        "results.csv, results.md and PNG plots to --out.")
    ev.add_argument("--model", default="toy", help="'toy' (the shipped toy LLaVA) or a model path / hub id")
    ev.add_argument("--tasks", default="vtprune_toy", help="comma-separated lmms-eval tasks (default: vtprune_toy)")
    ev.add_argument("--methods", default="random,fastervlm",
                    help="comma-separated method specs: name[+name][:opt=value;...] (default: random,fastervlm)")
    ev.add_argument("--keep", default="1,0.25,0.1,0.05", help="comma-separated budgets; 1 = stock")
    ev.add_argument("--limit", type=int, default=None, help="questions per task (default: all)")
    ev.add_argument("--seeds", type=int, default=1, help="runs averaged for seeded methods like random")
    ev.add_argument("--out", default="vtprune_eval", help="output folder (default: vtprune_eval)")
    ev.add_argument("--batch-size", type=int, default=32, help="batch size of the native toy evaluation")
    ev.add_argument("--device", default="cpu", help="device (default: cpu)")
    ev.add_argument("--include-path", action="append", help="extra lmms-eval task folder (repeatable)")
    ev.add_argument("--model-args", default="", help="extra lmms-eval model args: k=v,k=v (e.g. dtype=bfloat16)")
    ev.add_argument("--lmms-model", default=None, help="vtprune lmms-eval model id (default: from the config)")
    ev.add_argument("--lmms", action="store_true", help="run the toy task through lmms-eval too")
    ev.add_argument("--num-processes", type=int, default=1,
                    help="data-parallel ranks under torch.distributed.run (gloo on CPU, nccl on CUDA)")
    ev.set_defaults(func=_eval)
    cal = sub.add_parser("calibrate", help="find per-model constants a method needs (var: sink dimensions)")
    cal.add_argument("method", choices=["var"], help="the method to calibrate")
    cal.add_argument("--model", required=True, help="'toy' or a model path / hub id")
    cal.add_argument("--images", default=None, help="folder of images (default: toy scenes)")
    cal.add_argument("--n", type=int, default=8, help="number of images (default: 8)")
    cal.add_argument("--prompt", default="Describe the image.", help="the text next to each image")
    cal.add_argument("--top", type=int, default=2, help="number of sink dimensions (default: 2, as the paper)")
    cal.add_argument("--tau", type=float, default=20.0, help="massive-activation threshold (default: 20)")
    cal.add_argument("--device", default="cpu", help="device map for from_pretrained (default: cpu)")
    cal.add_argument("--out", default=None, help="output JSON (default: the user cache var reads)")
    cal.set_defaults(func=_calibrate)
    task = sub.add_parser("toy-task", help="write the toy benchmark as an lmms-eval task folder")
    task.add_argument("folder", help="where to write it (use as --include_path)")
    task.add_argument("--n", type=int, default=400, help="number of questions (default: 400)")
    task.add_argument("--seed", type=int, default=1234, help="seed of the split (default: 1234)")
    task.set_defaults(func=_toy_task)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
