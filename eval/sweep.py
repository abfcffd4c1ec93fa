"""``vtprune eval``: a methods x budgets sweep, one result file per cell, then tables and plots.

A *cell* is (task, method spec, keep). A method spec is ``name[+name...][:option=value;...]``,
e.g. ``fastervlm``, ``fastervlm:source=received``, ``fastervlm+vhr:alpha=2``. ``keep = 1`` is the
stock model (one ``stock`` cell per task); a spec without a ``keep`` option (``vhr``, ``exit``,
``dyvte``) runs once per task whatever the budgets. Methods with a ``seed`` (``random``) are
averaged over ``seeds`` runs.

The toy benchmarks with their toy models (``--model toy --tasks vtprune_toy``, ``--model toy-video
--tasks vtprune_toy_video``) run natively: batched, and with the prefill time of a fixed batch measured
in each cell (``--lmms`` runs them through lmms-eval instead). Every other (model, task) goes
through lmms-eval in this process, with one model load re-wrapped per cell (``vtprune.eval.lmms``).

Each finished cell is written to ``OUT/cells/``; a re-run skips cells whose file exists for the
same model and limit. ``OUT/results.{json,csv,md}`` and the plots are rebuilt from all cells.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import statistics
import time

from vtprune.errors import NotApplicable
from vtprune.spec import parse_spec, parse_value  # noqa: F401 (the sweep's grammar)

TOY_TASK = "vtprune_toy"
TOY_VIDEO_TASK = "vtprune_toy_video"
NATIVE = {"toy": TOY_TASK, "toy-video": TOY_VIDEO_TASK}  # the toy models and the task each runs natively


def parse_keeps(text: str) -> list:
    """``"1,0.25,64"`` -> ``[1.0, 0.25, 64]`` (floats are fractions, ints token counts; 1 is stock)."""
    from vtprune.budget import check_keep

    out = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        try:
            value = 1.0 if item in ("1", "1.0") else (float(item) if "." in item else int(item))
        except ValueError:
            raise ValueError(f"--keep {item!r} is not a number: budgets are fractions in (0, 1] (0.25) or "
                             "token counts per image (64)") from None
        out.append(check_keep(value))
    if not out:
        raise ValueError("--keep needs at least one budget, e.g. 1,0.25,0.1")
    return out


def _accepts(names, option):
    from vtprune import methods

    return any(option in {f.name for f in dataclasses.fields(methods.get(n))} for n in names)


@dataclasses.dataclass(frozen=True)
class Cell:
    task: str
    spec: str  # "stock" or a method spec
    keep: object = None  # None: the spec takes no budget (or stock)

    @property
    def slug(self):
        keep = "all" if self.keep is None else str(self.keep)
        return re.sub(r"[^A-Za-z0-9_.=+-]", "_", f"{self.task}__{self.spec}__{keep}")

    def wrap_args(self):
        """``(method names, options)`` for ``vtprune.wrap``; ``([], {})`` for stock."""
        if self.spec == "stock":
            return [], {}
        names, options = parse_spec(self.spec)
        if self.keep is not None:
            options = {"keep": self.keep, **options}
        return names, options


def plan(tasks, specs, keeps) -> list:
    """The cells of a sweep, in run order (stock first per task)."""
    cells = []
    for task in tasks:
        cells.append(Cell(task, "stock"))
        for spec in specs:
            names, options = parse_spec(spec)
            free = [n for n in names if _accepts([n], "keep") and f"{n}.keep" not in options]
            if "keep" in options or not free:  # the spec has its own budget(s): one cell
                cells.append(Cell(task, spec))
                continue
            cells += [Cell(task, spec, keep) for keep in keeps if keep != 1.0]
    return cells


# --------------------------------------------------------------------------------- runners

class ToyRunner:
    """A toy benchmark on its toy model, natively (batched ``toy.evaluate`` / ``toy_video.evaluate``)."""

    def __init__(self, limit=None, batch_size=32, timing_batch=8, device="cpu", video=False):
        from vtprune import toy, toy_video

        self.video = video
        self.batch_size = batch_size
        if video:
            self.model, self.processor = toy_video.load()
            self.samples = toy_video.eval_split(n=limit or 400)
            timing = self.samples[:timing_batch]
            inputs = toy_video.inputs([s["frames"] for s in timing], [s["question"] for s in timing])
            self.timing_inputs = {k: v.to(device) for k, v in inputs.items()}
        else:
            self.model, self.processor = toy.load()
            self.samples = toy.eval_split(n=limit or 400)
            timing = self.samples[:timing_batch]
            self.timing_inputs = self.processor(images=[s["image"] for s in timing],
                                                text=[toy.prompt(s["question"]) for s in timing],
                                                padding=True, return_tensors="pt").to(device)
        self.model.to(device)

    def prefill_ms(self):
        import torch

        cuda = next(self.model.parameters()).is_cuda
        with torch.no_grad():
            self.model(**self.timing_inputs)
            times = []
            for _ in range(7):
                if cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                self.model(**self.timing_inputs)
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
        # every repeat, per sample: the record keeps their median and all of them (the plots draw the spread)
        return [1000 * t / len(self.timing_inputs["input_ids"]) for t in times]

    def run(self, cell, seed=None):
        import vtprune
        from vtprune import toy, toy_video
        from vtprune.downsample import split as split_downsample

        names, options = cell.wrap_args()
        if seed is not None:
            options["seed"] = seed
        processor = self.processor
        keep, names, options = split_downsample(names, {"keep": 1.0, **options} if "downsample" in names else options)
        if keep is not None:  # on the processor (LLaVA-1.5 raises: pool stands in; the CLI refuses it on clips)
            processor = vtprune.downsample(processor, keep)

        def evaluate():
            if self.video:
                return toy_video.evaluate(self.model, self.samples, self.batch_size, progress=False)
            return toy.evaluate(self.model, processor, self.samples, self.batch_size, progress=False)

        if not names:
            result, totals = _count_stock(self.model, evaluate)
            prefill = self.prefill_ms()
        else:
            with vtprune.wrapped(self.model, names, **options):
                result = evaluate()
                totals = vtprune.stats(self.model)["totals"]
                prefill = self.prefill_ms()
        return {"score": result["overall"], "by_type": result["by_type"], "n": result["n"], "totals": totals,
                "prefill_ms": prefill, "answers": _answers(result)}


def _answers(result):
    return {str(i): p for i, p in enumerate(result["predictions"])}


def _count_stock(model, fn):
    """Run ``fn`` on the unwrapped model, counting the image tokens of its forwards with images."""
    from .lmms import count_visual_tokens, stock_totals

    totals = stock_totals()
    handle = count_visual_tokens(model, totals)
    try:
        return fn(), totals
    finally:
        handle.remove()


class LmmsRunner:
    """Any task through lmms-eval, in this process, one model load re-wrapped per cell."""

    def __init__(self, model, include_path=None, limit=None, device="cpu", model_args=None, lmms_model=None):
        try:
            from lmms_eval.tasks import TaskManager
        except ImportError as err:
            raise ImportError("lmms-eval tasks need the eval extra: see docs/evaluation.md") from err
        from . import lmms

        model_args = dict(model_args or {})
        if model == "toy-video":  # trained in float32, which lmms-eval's Qwen classes would load as bfloat16
            model_args.setdefault("dtype", "float32")
        lmms_model = lmms_model or _lmms_model_for(model)
        cls = getattr(lmms, lmms._class_name(lmms_model))
        self.instance = cls(pretrained=model, device=device, **model_args)
        self.instance.vtprune_reuse = True
        self.task_manager = TaskManager(include_path=include_path)
        self.limit, self.device = limit, device

    def run(self, cell, seed=None):
        from lmms_eval.evaluator import simple_evaluate

        names, options = cell.wrap_args()
        if seed is not None:
            options["seed"] = seed
        self.instance.rewrap("+".join(names) or None, **options)
        out = simple_evaluate(model=self.instance, tasks=[cell.task], limit=self.limit, device=self.device,
                              task_manager=self.task_manager, batch_size=1, log_samples=True,
                              verbosity="WARNING", distributed_executor_backend=_backend())
        ranks = _gather(self.instance.vtprune_totals)
        totals = {k: sum(r.get(k, 0) for r in ranks) for k in ranks[0]}
        if int(os.environ.get("RANK", 0)) != 0:
            return {"score": float("nan"), "totals": totals, "ranks": ranks}
        if out is None or cell.task not in out.get("results", {}):
            raise RuntimeError(f"lmms-eval returned no results for task {cell.task!r}")
        metrics = {k: v for k, v in out["results"][cell.task].items()
                   if isinstance(v, (int, float)) and "stderr" not in k}
        if not metrics:
            raise RuntimeError(f"lmms-eval returned no metric for task {cell.task!r}: {out['results'][cell.task]}")
        name, score = next(iter(metrics.items()))
        n = out.get("n-samples", {}).get(cell.task, {}).get("effective")
        answers = {str(s["doc_id"]): _text(s.get("filtered_resps")) for s in out.get("samples", {}).get(cell.task, [])}
        return {"score": float(score), "metric": name.split(",")[0], "metrics": metrics, "n": n,
                "totals": totals, "ranks": ranks, "answers": answers}


def _backend():
    """lmms-eval's collectives: torch.distributed's own when we run under torchrun (we initialised
    the process group), else accelerate (lmms-eval's default)."""
    return "torchrun" if int(os.environ.get("WORLD_SIZE", 1)) > 1 else "accelerate"


def _text(resps):
    while isinstance(resps, (list, tuple)) and resps:
        resps = resps[0]
    return resps if isinstance(resps, str) else str(resps)


def _lmms_model_for(model):
    from transformers import AutoConfig

    from vtprune import toy, toy_video

    from .lmms import FOR_MODEL_TYPE

    path = {"toy": toy.DEFAULT_PATH, "toy-video": toy_video.DEFAULT_PATH}.get(model, model)
    model_type = AutoConfig.from_pretrained(path).model_type
    if model_type not in FOR_MODEL_TYPE:
        raise ValueError(f"no lmms-eval class for model_type {model_type!r}; "
                         f"supported: {', '.join(sorted(FOR_MODEL_TYPE))}")
    return FOR_MODEL_TYPE[model_type]


# --------------------------------------------------------------------------------- the sweep

def run(model="toy", tasks=(TOY_TASK,), methods=("fastervlm", "random"), keeps=(1.0, 0.25, 0.1), out="vtprune_eval",
        limit=None, seeds=1, batch_size=32, device="cpu", include_path=None, model_args=None, lmms_model=None,
        use_lmms=False, progress=True) -> list:
    """Run (or resume) a sweep; returns all cell records and writes ``OUT/results.*`` and plots.

    Under ``torch.distributed.run`` (``WORLD_SIZE`` > 1; ``vtprune eval --num-processes N`` launches
    it) native cells are dealt round-robin to the ranks, and every rank runs each lmms-eval cell,
    whose questions lmms-eval shards; rank 0 gathers the per-rank visual-token counts, writes the
    lmms-eval cells and the report, and returns the records (other ranks return ``[]``).
    """
    for spec in methods:
        parse_spec(spec)  # fail before any model is loaded
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and device == "cuda":  # one GPU per rank
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        import torch

        torch.cuda.set_device(device)
    with _process_group(device) as (rank, world):
        return _sweep(rank, world, model, tasks, methods, keeps, out, limit, seeds, batch_size, device,
                      include_path, model_args, lmms_model, use_lmms, progress)


def _sweep(rank, world, model, tasks, methods, keeps, out, limit, seeds, batch_size, device, include_path,
           model_args, lmms_model, use_lmms, progress):
    from tqdm.auto import tqdm

    from . import report

    cells = plan(tasks, methods, keeps)
    config = {"model": model, "limit": limit, "seeds": seeds, "model_args": model_args or {}}
    os.makedirs(os.path.join(out, "cells"), exist_ok=True)
    todo = [c for c in cells if not _done(out, c, config)]
    if rank == 0 and len(todo) < len(cells):
        print(f"vtprune eval: reusing {len(cells) - len(todo)} of {len(cells)} cells finished in {out}/cells "
              f"(same model and limit); {len(todo)} to run", flush=True)
    native_cells = [c for c in todo if NATIVE.get(model) == c.task and not use_lmms]
    mine = [c for i, c in enumerate(native_cells) if i % world == rank] + [c for c in todo if c not in native_cells]
    runners = {}
    bar = tqdm(total=len(mine), desc="vtprune eval" + (f" rank {rank}" if world > 1 else ""),
               disable=not progress or rank != 0)
    for cell in mine:
        native = cell in native_cells
        key = "toy" if native else "lmms"
        if key not in runners:
            if native:
                runners[key] = ToyRunner(limit=limit, batch_size=batch_size, device=device,
                                         video=model == "toy-video")
            else:
                paths = list(include_path or [])
                for task, folder in ((TOY_TASK, "tasks"), (TOY_VIDEO_TASK, "video_tasks")):
                    if task in tasks:
                        from .toytask import write
                        folder = os.path.join(out, folder)
                        if rank == 0:
                            write(folder, n=limit or 400, video=task == TOY_VIDEO_TASK)
                        _barrier(world)
                        paths.append(os.path.abspath(folder))
                runners[key] = LmmsRunner(model, include_path=paths or None, limit=limit, device=device,
                                          model_args=model_args, lmms_model=lmms_model)
        bar.set_postfix_str(f"{cell.spec} keep={cell.keep if cell.keep is not None else '-'}")
        record = _run_cell(runners[key], cell, seeds)
        if native or rank == 0:
            record.update(config=config, runner="native" if native else "lmms-eval", world_size=world)
            _save(os.path.join(out, "cells", cell.slug + ".json"), record)
        bar.update(1)
    bar.close()
    _barrier(world)
    if rank != 0:
        return []
    records = [_load(os.path.join(out, "cells", c.slug + ".json")) for c in cells]
    missing = [c.slug for c, r in zip(cells, records) if r is None]
    if missing:
        raise RuntimeError(f"cells without results: {missing}")
    report.write_all(records, out)
    return records


def _done(out, cell, config):
    """A cell file of the same model and limit: a result, or a typed not-applicable (an error of an
    older version without that mark runs again)."""
    done = _load(os.path.join(out, "cells", cell.slug + ".json"))
    if done is None or done.get("config") != config:
        return False
    return done.get("score") is not None or bool(done.get("not_applicable"))


@contextlib.contextmanager
def _process_group(device):
    """``(rank, world size)``; under torchrun, initialises the process group (gloo on CPU, nccl on
    CUDA) and destroys the one it made on the way out. A group left to the interpreter's exit can
    abort a rank ("terminate called without an active exception", seen on torch 2.14)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        yield 0, 1
        return
    import torch.distributed as dist

    made = not dist.is_initialized()
    if made:
        dist.init_process_group("nccl" if str(device).startswith("cuda") else "gloo")
    try:
        yield dist.get_rank(), dist.get_world_size()
    finally:
        if made and dist.is_initialized():
            dist.destroy_process_group()


def _barrier(world):
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _gather(obj):
    """Every rank's ``obj`` (a list of one item when not distributed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _run_cell(runner, cell, seeds):
    names, _ = cell.wrap_args()
    repeat = seeds if names and _accepts(names, "seed") and "seed" not in parse_spec(cell.spec)[1] else 1
    start = time.perf_counter()
    try:
        runs = [runner.run(cell, seed=s if repeat > 1 else None) for s in range(repeat)]
    except NotApplicable as err:  # inherent to model and method: say so, record it, go on
        print(f"vtprune eval: {cell.spec} keep={cell.keep} not applicable: {err}", flush=True)
        return {"slug": cell.slug, "task": cell.task, "method": cell.spec, "keep": cell.keep, "runs": 0,
                "score": None, "error": str(err), "not_applicable": True, "visual_tokens_in": None,
                "visual_tokens_out": None, "visual_tokens_llm": None}
    seconds = time.perf_counter() - start
    first = runs[0]
    totals = first["totals"]
    samples = max(totals.get("samples", 0), 1)
    record = {
        "slug": cell.slug, "task": cell.task, "method": cell.spec, "keep": cell.keep, "runs": repeat,
        "score": statistics.fmean(r["score"] for r in runs),
        "score_runs": [r["score"] for r in runs],
        "metric": first.get("metric", "accuracy"),
        "n": first.get("n"),
        "visual_tokens_in": totals.get("visual_tokens_in", 0) / samples,
        "visual_tokens_out": totals.get("visual_tokens_out", 0) / samples,
        "visual_tokens_llm": totals.get("visual_tokens_llm", totals.get("visual_tokens_out", 0)) / samples,
        "llm_flops_saved": totals.get("llm_flops_saved", 0.0),
        "seconds": seconds,
    }
    if "by_type" in first:
        record["by_type"] = {t: statistics.fmean(r["by_type"][t] for r in runs) for t in first["by_type"]}
    if "prefill_ms" in first:  # a runner's repeats (a list), or one value
        record["prefill_ms_runs"] = [t for r in runs for t in
                                     (r["prefill_ms"] if isinstance(r["prefill_ms"], list) else [r["prefill_ms"]])]
        record["prefill_ms"] = statistics.median(record["prefill_ms_runs"])
    if "metrics" in first:
        record["metrics"] = first["metrics"]
    if "ranks" in first:
        record["ranks"] = first["ranks"]
    if "answers" in first:
        record["answers"] = first["answers"]  # of the first run (seed 0)
    return record


def _load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def _save(path, record):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, path)
