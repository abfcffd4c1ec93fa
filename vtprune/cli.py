"""The ``vtprune`` command: ``vtprune info``, ``vtprune demo``."""

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
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
