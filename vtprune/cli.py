"""The ``vtprune`` command: ``info``, ``demo``, ``eval``, ``calibrate``, ``toy-task``, ``serve``.

Errors are one line, ``vtprune: error: ...``: exit status 2 for anything wrong with the command
(checked before a model loads: methods and options with a "did you mean", budgets, the device,
the model path or id, missing extras), 1 for a failure while running.  ``--debug`` (or
``VTPRUNE_DEBUG=1``) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import textwrap


class UsageError(Exception):
    """Something wrong with the command itself: one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _info_method(name) -> int:
    from vtprune.spec import describe

    d = describe(name)
    print(f"{d['name']}: {d['summary']}")
    print(f"stage:   {d['stage_words']}")
    print(f"paper:   {d['paper'] or '(a control: no paper)'}")
    print("options:")
    for o in d["options"]:
        print(f"  {o['name']:<17} default {o['default']!r:<8} {o['range']}")
    details = d["details"].split("\n\n", 1)
    if len(details) > 1:
        print()
        print(details[1].strip())
    return 0


def _info(args) -> int:
    if args.method:
        return _info_method(args.method)
    import torch
    import transformers

    import vtprune
    from vtprune import methods
    from vtprune.kernels import backend
    from vtprune.patches import supported
    from vtprune.spec import headline

    print(f"vtprune       {vtprune.__version__}")
    print(f"python        {platform.python_version()}")
    print(f"torch         {torch.__version__} (cuda available: {torch.cuda.is_available()})")
    print(f"transformers  {transformers.__version__}")
    print(f"kernels       {backend()}")
    print("families:")
    families = supported()
    width = max(map(len, families))
    for family, cls in families.items():
        print(f"  {family:<{width}} {cls}")
    print("methods (vtprune info --method NAME for options and the paper):")
    width = max(map(len, methods.available()))
    for name in methods.available():
        lines = textwrap.wrap(headline(name), 100 - width - 3) or [""]
        print(f"  {name:<{width}} {lines[0]}")
        for line in lines[1:]:
            print(" " * (width + 3) + line)
    return 0


def _demo(args) -> int:
    if args.video:
        from vtprune.demo_video import run
    else:
        from vtprune.demo import run

    return run(keeps=args.keeps, method=args.names[0], n=args.n, out=args.out, seed=args.seed,
               options=args.options or None)


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

    model_args = {k: sweep.parse_value(v) for k, v in args.model_arg_pairs.items()}
    records = sweep.run(model=args.model, tasks=args.task_list, methods=args.specs, keeps=args.keeps,
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

    folder = write(args.folder, n=args.n, seed=args.seed, video=args.video)
    task = "vtprune_toy_video" if args.video else "vtprune_toy"
    print(f"wrote the lmms-eval task '{task}' to {folder}; use --include_path {folder}")
    return 0


def _calibrate(args) -> int:
    import json
    import os

    import torch

    from vtprune import toy
    from vtprune.methods import var

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



# ------------------------------------------------------------------------------ checks (no model loaded)

def _positive(args, *names):
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def _check_spec(spec: str, keeps=None, defaults=None):
    """Parse a method spec and check it as ``wrap`` will (every budget): ``(names, options)``.
    ``defaults(name, options)`` adds what the caller will add (the demo's defaults)."""
    from vtprune.spec import check, options_of, parse_spec

    try:
        names, options = parse_spec(spec)
        takes_keep = "keep" not in options and any("keep" in options_of(n) and f"{n}.keep" not in options
                                                   for n in names)
        budgets = [k for k in keeps if k != 1.0] if keeps and takes_keep else [None]
        full = defaults(names[0], options) if defaults is not None and len(names) == 1 else options
        check(names, full, budgets or [None])
    except (ValueError, TypeError) as err:
        raise UsageError(f"method {spec!r}: {err}") from None
    return names, options


def _check_keeps(text: str) -> list:
    from vtprune.eval.sweep import parse_keeps

    try:
        return parse_keeps(text)
    except (ValueError, TypeError) as err:
        raise UsageError(str(err) if str(err).startswith("--keep") else f"--keep {text}: {err}") from None


def _check_device(device: str):
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {device!r} is not a device (cpu, cuda, cuda:1, mps)") from None
    if dev.type == "cpu":
        return
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: this torch ({torch.__version__}) sees no CUDA GPU; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: there are {torch.cuda.device_count()} CUDA device(s)")
        return
    backend = getattr(torch.backends, dev.type, None) or getattr(torch, dev.type, None)
    if backend is None or not backend.is_available():
        raise UsageError(f"--device {device}: not available on this machine; use --device cpu")


def _check_model(model: str) -> str:
    """``toy``, ``toy-video``, a model folder, or a hub id whose config resolves; returns the model_type."""
    return _model_config(model).model_type


def _model_config(model: str):
    """The config of ``toy``, ``toy-video``, a model folder, or a hub id (``UsageError`` when it does not resolve)."""
    from vtprune import toy, toy_video

    path = os.path.expanduser(model)
    if model in ("toy", "toy-video"):
        path = toy.DEFAULT_PATH if model == "toy" else toy_video.DEFAULT_PATH
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise UsageError(f"the {model} model is missing from this install ({path})")
    elif os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise UsageError(f"--model {model}: the folder has no config.json (a saved transformers model has one)")
    elif os.path.exists(path):
        raise UsageError(f"--model {model} is a file: pass the model's folder (or a hub id like org/name)")
    elif path.startswith((".", "/", "~")) or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", model):
        raise UsageError(f"--model {model}: no such folder, and not a hub id (org/name)")
    from transformers import AutoConfig

    try:
        try:
            return AutoConfig.from_pretrained(path, local_files_only=True)
        except OSError:
            if os.path.isdir(path) or os.environ.get("HF_HUB_OFFLINE") == "1":
                raise
            return AutoConfig.from_pretrained(path)
    except Exception as err:  # noqa: BLE001 - any failure to resolve is a bad --model
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"--model {model}: cannot read its config ({first})") from None


def _needs(module: str, extra: str, why: str):
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise UsageError(f"{why} needs {module}: pip install 'vtprune[{extra}]'")


def _check_eval(args):
    from vtprune.eval.sweep import NATIVE, TOY_TASK, TOY_VIDEO_TASK
    from vtprune.spec import split_specs

    _positive(args, "limit", "seeds", "batch_size", "num_processes")
    args.keeps = _check_keeps(args.keep)
    args.specs = split_specs(args.methods)
    if not args.specs:
        raise UsageError("--methods is empty; e.g. --methods random,fastervlm")
    for spec in args.specs:
        _check_spec(spec, args.keeps)
    tasks = args.tasks if args.tasks is not None else NATIVE.get(args.model, TOY_TASK)
    args.task_list = [t.strip() for t in tasks.split(",") if t.strip()]
    if not args.task_list:
        raise UsageError("--tasks is empty; e.g. --tasks vtprune_toy")
    if args.model == "toy-video" and args.task_list != [TOY_VIDEO_TASK]:
        raise UsageError(f"--model toy-video answers its own task only (--tasks {TOY_VIDEO_TASK}: natively, or "
                         "through lmms-eval with --lmms)")
    if TOY_VIDEO_TASK in args.task_list and args.model != "toy-video":
        raise UsageError(f"--tasks {TOY_VIDEO_TASK} is the toy video model's task: use --model toy-video")
    if args.model == "toy-video" and any(n == "downsample" for spec in args.specs for n in spec.split(":")[0].split("+")):
        raise UsageError("downsample does not apply to the toy video model: its clips have one size "
                         "(uniform_time or pool stand in for it)")
    _check_device(args.device)
    config = _model_config(args.model)
    lmms = args.model not in NATIVE or args.lmms or any(t != NATIVE[args.model] for t in args.task_list)
    if lmms:
        _needs("lmms_eval", "eval", "evaluating through lmms-eval (a model other than toy, a task other than "
               f"{TOY_TASK}, or --lmms)")
        from vtprune.eval.lmms import FOR_MODEL_TYPE

        if config.model_type not in FOR_MODEL_TYPE:
            raise UsageError(f"--model {args.model}: model_type {config.model_type!r} is not supported; "
                             f"supported: {', '.join(sorted(FOR_MODEL_TYPE))}")
    pairs = [item for item in args.model_args.split(",") if item] if args.model_args else []
    bad = [item for item in pairs if "=" not in item]
    if bad:
        raise UsageError(f"--model-args {bad[0]!r} is not key=value")
    args.model_arg_pairs = dict(item.split("=", 1) for item in pairs)
    for path in args.include_path or []:
        if not os.path.isdir(path):
            raise UsageError(f"--include-path {path}: no such folder")
    from vtprune.eval.checks import check_options, check_tasks

    try:
        check_options(config, args.specs, next((k for k in args.keeps if k != 1.0), 0.5))
        if lmms and "WORLD_SIZE" not in os.environ:  # under --num-processes the parent checked them
            check_tasks(args.task_list, args.include_path, skip=(TOY_TASK, TOY_VIDEO_TASK))
    except ValueError as err:
        raise UsageError(str(err)) from None


def _check_demo(args):
    _positive(args, "n")
    args.method = args.method or ("evs" if args.video else "fastervlm")
    args.out = args.out or ("vtprune_demo_video.png" if args.video else "vtprune_demo.png")
    args.keeps = _check_keeps(args.keep)
    from vtprune.demo import defaults

    args.names, args.options = _check_spec(args.method, args.keeps, defaults)
    if len(args.names) != 1:
        raise UsageError("the demo runs one method at a time; use vtprune eval to combine methods")
    if args.names == ["downsample"] and args.video:
        raise UsageError("downsample does not apply to the toy video model: its clips have one size "
                         "(uniform_time or pool stand in for it)")
    if args.names == ["downsample"]:
        raise UsageError("downsample does not apply to the toy model: LLaVA-1.5 resizes every image to one "
                         "size (pool stands in for it)")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise UsageError(f"--out {args.out}: no such folder {out_dir}")


def _check_calibrate(args):
    _positive(args, "n", "top")
    if args.model == "toy-video":
        raise UsageError("calibrate reads images; use --model toy (or a model folder)")
    if not args.tau > 0:
        raise UsageError(f"--tau must be > 0, got {args.tau}")
    if args.images is not None and not os.path.isdir(args.images):
        raise UsageError(f"--images {args.images}: no such folder")
    _check_model(args.model)
    if args.model != "toy" and args.device not in ("auto", "balanced", "sequential"):
        _check_device(args.device)


def _check_toy_task(args):
    _positive(args, "n")
    if os.path.exists(args.folder) and not os.path.isdir(args.folder):
        raise UsageError(f"{args.folder} is a file, not a folder")


def _check_serve(args):
    import importlib.util

    from vtprune.serving import SERVED_TYPES, check
    from vtprune.spec import parse_spec

    keeps = _check_keeps(args.keep)
    if len(keeps) != 1:
        raise UsageError(f"--keep {args.keep}: vtprune serve takes one budget")
    try:
        names, options = parse_spec(args.method)
        if len(names) != 1:
            raise ValueError(f"--method {args.method}: vtprune serve runs one method, got {'+'.join(names)}")
        check(names[0], keeps[0], options, None)
    except (ValueError, TypeError) as err:
        raise UsageError(str(err)) from None
    given = [a.split("=")[0] for a in args.vllm_args]
    if "--video-pruning-rate" in given or "--video-pruning-method" in given:
        raise UsageError("--video-pruning-rate/--video-pruning-method: vtprune prunes a served model's videos by "
                         "--method and --keep (vLLM's EVS would not run); leave them out")
    model_type = _check_model(args.model)
    if model_type not in SERVED_TYPES:
        raise UsageError(f"--model {args.model} is a {model_type!r} model; vtprune serving runs "
                         f"{', '.join(SERVED_TYPES)} models in this version")
    try:
        args.config = check(names[0], keeps[0], options, model_type)
    except (ValueError, TypeError) as err:
        raise UsageError(str(err)) from None
    if importlib.util.find_spec("vllm") is None:
        raise UsageError("vtprune serve needs vLLM: build the serving venv (bash scripts/vllm_cpu_env.sh DIR) and run "
                         "DIR/bin/vtprune serve there")
    args.model_type = model_type
    if not 0 < args.port < 65536:
        raise UsageError(f"--port must lie in 1..65535, got {args.port}")
    from vtprune.serving import plugin_allowed
    from vtprune.serving.needs import VLLMMismatch
    from vtprune.serving.plugin import pruned_classes

    try:
        plugin_allowed()
        pruned_classes(args.config)  # the installed vLLM has what the plugin hooks (else one line, before loading)
    except (ValueError, VLLMMismatch) as err:
        raise UsageError(str(err)) from None


def _serve(args) -> int:
    import json

    from vtprune.serving import ENV, model_dir, refused_media

    env = dict(os.environ, **{ENV: json.dumps(args.config.to_dict())})
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # vLLM's server module (its `vllm serve` script looks up a distribution named "vllm", and the CPU build's
    # is "vllm-cpu")
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir(args.model),
               "--host", args.host, "--port", str(args.port)]
    if args.model == "toy":
        command += ["--dtype", "float32", "--max-model-len", "512", "--enforce-eager",
                    "--limit-mm-per-prompt", '{"image": 1}', "--served-model-name", "toy"]
    elif args.model == "toy-video":
        command += ["--dtype", "float32", "--max-model-len", "1024", "--enforce-eager",
                    "--limit-mm-per-prompt", '{"image": 0, "video": 1}', "--served-model-name", "toy-video"]
    elif refused_media(args.model_type):  # vLLM refuses video requests up front
        command += ["--limit-mm-per-prompt", json.dumps(refused_media(args.model_type))]
    if args.request_keep:  # vLLM refuses a request's mm_processor_kwargs without it
        command.append("--trust-request-mm-kwargs")
    command += args.vllm_args
    print("vtprune serve: " + " ".join(command), flush=True)
    os.execvpe(command[0], command, env)


CHECKS = {"eval": _check_eval, "demo": _check_demo, "calibrate": _check_calibrate, "toy-task": _check_toy_task,
          "serve": _check_serve}

def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("VTPRUNE_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    parser = _Parser(
        prog="vtprune",
        description="Visual-token pruning for Hugging Face VLMs: vtprune.wrap(model, method, keep=...). "
                    "Add --debug (or set VTPRUNE_DEBUG=1) to see the traceback of an error.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = sub.add_parser("info", help="versions, supported model families, registered methods, kernel backend")
    info.add_argument("--method", default=None, help="one method: its stage, options with defaults and ranges, "
                      "the paper")
    info.set_defaults(func=_info)
    demo = sub.add_parser("demo", help="run the embedded toy model unpruned and pruned, offline")
    demo.add_argument("--keep", default="1.0,0.25,0.1", help="comma-separated budgets (default: 1.0,0.25,0.1)")
    demo.add_argument("--method", default=None,
                      help="a method, with options as name:opt=value;... (default: fastervlm; evs with --video)")
    demo.add_argument("--n", type=int, default=6, help="number of questions (default: 6)")
    demo.add_argument("--out", default=None, help="where to write the kept-token overlay PNG (default: "
                      "vtprune_demo.png; vtprune_demo_video.png with --video)")
    demo.add_argument("--video", action="store_true", help="the toy video model (a tiny Qwen3-VL) on clips")
    demo.add_argument("--seed", type=int, default=0, help="seed of the questions")
    demo.set_defaults(func=_demo)
    ev = sub.add_parser("eval", help="sweep methods x budgets on benchmarks; tables, CSV, JSON and plots",
                        description="Run every method at every budget on the tasks (the toy benchmark natively, "
                        "anything else through lmms-eval), resuming finished cells, and write results.json, "
                        "results.csv, results.md and PNG plots to --out.")
    ev.add_argument("--model", default="toy", help="'toy' (the shipped toy LLaVA), 'toy-video' (the shipped toy "
                    "video model, a Qwen3-VL) or a model path / hub id")
    ev.add_argument("--tasks", default=None, help="comma-separated lmms-eval tasks (default: vtprune_toy; "
                    "vtprune_toy_video with --model toy-video)")
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
    ev.add_argument("--lmms", action="store_true", help="run the toy task (or the toy video task) through lmms-eval too")
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
    task.add_argument("--seed", type=int, default=None, help="seed of the split (default: 1234; 4321 with --video)")
    task.add_argument("--video", action="store_true",
                      help="the toy video benchmark (vtprune_toy_video, for --model vtprune_qwen3_vl "
                           "--model_args pretrained=toy-video)")
    task.set_defaults(func=_toy_task)
    serve = sub.add_parser("serve", help="start vLLM's OpenAI-compatible server with a vtprune method (serving venv)",
                           description="Serve MODEL with vLLM, pruned by --method at --keep; options vtprune does not "
                           "know go to vLLM's server (e.g. --max-num-seqs 8).")
    serve.add_argument("model", help="'toy' (the shipped toy LLaVA) or a model folder / hub id")
    serve.add_argument("--method", default="random",
                       help="random, uniform, pool, divprune, fastervlm, vtc_cls or visionzip, with options as in eval "
                            "(fastervlm:vision_layer=-3) (default: random)")
    serve.add_argument("--keep", default="1.0", help="budget: a fraction in (0, 1] or a token count (default: 1.0)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    serve.add_argument("--request-keep", action="store_true",
                       help="let a request ask for its own keep, at most --keep: \"mm_processor_kwargs\": {\"vtprune\": "
                       "{\"keep\": 0.1}} (adds vLLM's --trust-request-mm-kwargs, which lets requests pass the HF "
                       "processor's options too)")
    serve.set_defaults(func=_serve)
    try:
        if argv[:1] == ["serve"]:  # what vtprune does not know goes to vLLM's server
            args, extra = parser.parse_known_args(argv)
            args.vllm_args = extra
        else:
            args = parser.parse_args(argv)
        args.argv = argv
        if not getattr(args, "func", None):
            parser.print_help()
            return 0
        if args.command == "info" and args.method:
            from vtprune.spec import method_class

            try:
                method_class(args.method)
            except ValueError as err:
                raise UsageError(str(err)) from None
        if args.command in CHECKS:
            CHECKS[args.command](args)
        return args.func(args)
    except UsageError as err:
        if debug:
            raise
        print(f"vtprune: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vtprune: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - one line unless --debug
        if debug:
            raise
        text = str(err).strip().splitlines()
        print(f"vtprune: error: {type(err).__name__}: {text[0] if text else ''} "
              "(run with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
