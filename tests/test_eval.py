"""The lmms-eval plugin, the toy task, and the ``vtprune eval`` sweep (tables, plots, resume)."""

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import vtprune
from vtprune import toy
from vtprune.eval import report, sweep, toytask

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled"}


def need_lmms():
    """lmms-eval is the eval extra: CI installs it and sets VTPRUNE_REQUIRE_EVAL=1 so nothing is skipped."""
    if os.environ.get("VTPRUNE_REQUIRE_EVAL") == "1":
        import lmms_eval  # noqa: F401
        return
    pytest.importorskip("lmms_eval")


@pytest.fixture(scope="module")
def toy_model():
    return toy.load()


def native_answers(model, processor, n, method=None, **options):
    samples = toy.eval_split(n=n)
    if method is None:
        return toy.evaluate(model, processor, samples, progress=False)["predictions"]
    with vtprune.wrapped(model, method, **options):
        return toy.evaluate(model, processor, samples, progress=False)["predictions"]


def test_plugin_found_by_lmms_eval_registry():
    need_lmms()
    from lmms_eval import models

    from vtprune.eval import lmms

    for model_id in lmms.BASES:
        cls = models.get_model(model_id)
        assert issubclass(cls, lmms.VtpruneModel), model_id
        assert cls.__module__ == "vtprune.eval.lmms"


def test_lmms_eval_cli_on_toy_task_matches_native(tmp_path, toy_model):
    """A real ``python -m lmms_eval`` run: same answers per question as our own evaluation."""
    need_lmms()
    n = 10
    folder = toytask.write(tmp_path / "task", n=n)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "vtprune_llava_hf",
           "--model_args", "pretrained=toy,method=fastervlm,keep=0.1", "--tasks", toytask.TASK,
           "--include_path", str(folder), "--batch_size", "1", "--device", "cpu", "--limit", str(n),
           "--output_path", str(out), "--log_samples", "--verbosity", "DEBUG"]
    done = subprocess.run(cmd, env={**os.environ, **OFFLINE}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.load(open(glob.glob(str(out / "**" / "*_results.json"), recursive=True)[0]))
    rows = [json.loads(line) for line in open(glob.glob(str(out / "**" / "*_samples_*.jsonl"), recursive=True)[0])]
    assert len(rows) == n
    model, processor = toy_model
    expected = native_answers(model, processor, n, "fastervlm", keep=0.1)
    got = {r["doc_id"]: r["filtered_resps"] for r in rows}
    assert [got[i].split()[0] for i in range(n)] == expected
    accuracy = results["results"][toytask.TASK]["accuracy,none"]
    truth = [s["answer"] for s in toy.eval_split(n=n)]
    assert accuracy == pytest.approx(sum(a == b for a, b in zip(expected, truth)) / n)
    assert "vtprune[fastervlm] visual tokens" in done.stderr + done.stdout


def test_plugin_strict_raises_generation_errors(tmp_path):
    need_lmms()
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from vtprune.eval.lmms import VtpruneLlavaHf

    folder = toytask.write(tmp_path / "task", n=4)
    model = VtpruneLlavaHf(pretrained="toy", device="cpu", method="random", keep=0.5)
    assert vtprune.is_wrapped(model.model)

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    model.model.generate = broken
    with pytest.raises(RuntimeError, match="boom"):
        simple_evaluate(model=model, tasks=[toytask.TASK], limit=2, task_manager=TaskManager(include_path=str(folder)),
                        batch_size=1, device="cpu", log_samples=False)


def test_plugin_options_and_errors():
    need_lmms()
    from vtprune.eval.lmms import VtpruneLlavaHf, parse_methods

    assert parse_methods("fastervlm+vhr") == ["fastervlm", "vhr"]
    assert parse_methods("none") == [] and parse_methods(None) == []
    with pytest.raises(ValueError, match="registered methods"):
        VtpruneLlavaHf(pretrained="toy", device="cpu", method="nosuchmethod", keep=0.5)
    model = VtpruneLlavaHf(pretrained="toy", device="cpu")
    assert not vtprune.is_wrapped(model.model)
    with pytest.raises(TypeError, match="without a method"):
        model.rewrap(None, keep=0.5)
    model.rewrap("fastervlm+vhr", keep=0.25, alpha=2.0)
    from vtprune.api import methods_of
    assert [c.name for c in methods_of(model.model)] == ["fastervlm", "vhr"]
    model.rewrap("fastervlm:source=received;scope=tile", keep=0.25)  # the one spec grammar (vtprune.spec)
    (config,) = methods_of(model.model)
    assert (config.source, config.scope, config.keep) == ("received", "tile", 0.25)
    model.rewrap(None)
    assert not vtprune.is_wrapped(model.model)
    with pytest.raises(ValueError, match="pool"):  # LLaVA-1.5's processor has one fixed resolution
        model.rewrap("downsample", keep=0.25)
    assert not vtprune.is_wrapped(model.model) and type(model._image_processor).__name__ == "LlavaProcessor"


def test_toy_task_folder(tmp_path):
    pytest.importorskip("datasets")
    import datasets

    folder = toytask.write(tmp_path / "t", n=12, seed=7)
    text = open(os.path.join(folder, "vtprune_toy.yaml")).read()
    assert "task: vtprune_toy" in text and str(tmp_path) in text
    data = datasets.load_from_disk(os.path.join(folder, "data"))["test"]
    reference = toy.eval_split(n=12, seed=7)
    assert [d["question"] for d in data] == [s["question"] for s in reference]
    image = toytask.doc_to_visual(data[3])[0]
    assert (np.asarray(image) == np.asarray(reference[3]["image"].convert("RGB"))).all()
    assert toytask.process_results(data[0], [reference[0]["answer"] + " extra"])["accuracy"] == 1.0
    assert toytask.process_results(data[0], [""])["accuracy"] == 0.0


# ------------------------------------------------------------------------------------ sweep

def test_parse_and_plan():
    assert sweep.parse_spec("fastervlm+vhr:alpha=2;source=received") == (["fastervlm", "vhr"],
                                                                         {"alpha": 2, "source": "received"})
    with pytest.raises(ValueError, match="registered methods"):
        sweep.parse_spec("nosuch")
    with pytest.raises(ValueError, match="key=value"):
        sweep.parse_spec("fastervlm:oops")
    assert sweep.parse_keeps("1,0.25,64") == [1.0, 0.25, 64]
    with pytest.raises(ValueError):
        sweep.parse_keeps("1.5")
    cells = sweep.plan(["t"], ["random", "vhr", "fastv:keep=0.5"], [1.0, 0.25, 0.1])
    assert [(c.spec, c.keep) for c in cells] == [("stock", None), ("random", 0.25), ("random", 0.1), ("vhr", None),
                                                 ("fastv:keep=0.5", None)]
    assert cells[1].wrap_args() == (["random"], {"keep": 0.25})


def test_margins_match_realized_tokens_and_flag_below_random():
    rows = [
        {"task": "t", "method": "stock", "keep": None, "score": 0.9, "visual_tokens_llm": 256.0, "n": 10, "seconds": 1},
        {"task": "t", "method": "random", "keep": 0.25, "score": 0.5, "visual_tokens_llm": 64.0, "n": 10, "seconds": 1},
        {"task": "t", "method": "pool", "keep": 0.25, "score": 0.6, "visual_tokens_llm": 64.0, "n": 10, "seconds": 1},
        {"task": "t", "method": "good", "keep": 0.25, "score": 0.8, "visual_tokens_llm": 64.0, "n": 10, "seconds": 1},
        {"task": "t", "method": "bad", "keep": 0.25, "score": 0.4, "visual_tokens_llm": 64.5, "n": 10, "seconds": 1},
        {"task": "t", "method": "late", "keep": 0.25, "score": 0.7, "visual_tokens_llm": 192.0, "n": 10, "seconds": 1},
    ]
    report.add_margins(rows)
    by = {r["method"]: r for r in rows}
    assert by["good"]["delta_random"] == pytest.approx(0.3) and by["good"]["delta_pool"] == pytest.approx(0.2)
    assert by["bad"]["delta_random"] == pytest.approx(-0.1)
    assert by["late"]["delta_random"] is None  # no random cell at 192 tokens
    assert by["random"]["delta_random"] is None and by["random"]["delta_pool"] == pytest.approx(-0.1)
    text = report.markdown(rows)
    assert "| bad | 0.25 | 64.5 | 0.400 ✗ |" in text
    assert "| good | 0.25 | 64.0 | 0.800 |" in text


def test_sweep_writes_everything_and_resumes(tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    calls = []
    original = sweep.ToyRunner.run

    def counting(self, cell, seed=None):
        calls.append((cell.spec, cell.keep, seed))
        return original(self, cell, seed)

    monkeypatch.setattr(sweep.ToyRunner, "run", counting)
    kwargs = dict(model="toy", tasks=["vtprune_toy"], methods=["random", "fastervlm", "fastv:layer=2"],
                  keeps=[1.0, 0.25], out=str(out), limit=16, seeds=2, progress=False)
    records = sweep.run(**kwargs)
    assert [(r["method"], r["keep"]) for r in records] == [("stock", None), ("random", 0.25), ("fastervlm", 0.25),
                                                           ("fastv:layer=2", 0.25)]
    assert calls.count(("random", 0.25, 0)) == 1 and calls.count(("random", 0.25, 1)) == 1  # seeds averaged
    for name in ("results.json", "results.csv", "results.md", "score_vtprune_toy.png", "time_vtprune_toy.png"):
        assert (out / name).stat().st_size > 0, name
    by = {r["method"]: r for r in records}
    assert by["stock"]["visual_tokens_llm"] == toy.NUM_IMAGE_TOKENS
    assert by["fastervlm"]["visual_tokens_out"] == 64
    assert by["fastv:layer=2"]["visual_tokens_out"] == toy.NUM_IMAGE_TOKENS
    assert by["fastv:layer=2"]["visual_tokens_llm"] == pytest.approx((2 * 256 + 64) / 3)
    assert by["fastervlm"]["delta_random"] == pytest.approx(by["fastervlm"]["score"] - by["random"]["score"])
    assert len(by["stock"]["prefill_ms_runs"]) == 7 and len(by["random"]["prefill_ms_runs"]) == 14  # every repeat
    assert by["stock"]["prefill_ms"] == pytest.approx(np.median(by["stock"]["prefill_ms_runs"]))
    # the stock cell is the unwrapped model's own accuracy
    model, processor = toy.load()
    stock = toy.evaluate(model, processor, toy.eval_split(n=16), progress=False)
    assert by["stock"]["score"] == stock["overall"]
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("task,method,keep") and len(csv_lines) == 5
    # resume: nothing runs again; a deleted cell runs again alone
    calls.clear()
    again = sweep.run(**kwargs)
    assert calls == [] and [r["score"] for r in again] == [r["score"] for r in records]
    os.remove(out / "cells" / (sweep.Cell("vtprune_toy", "fastervlm", 0.25).slug + ".json"))
    sweep.run(**kwargs)
    assert calls == [("fastervlm", 0.25, None)]
    # another limit is another sweep: the cells are not reused
    calls.clear()
    sweep.run(**{**kwargs, "limit": 8})
    assert len(calls) == 5


def test_sweep_through_lmms_eval(tmp_path):
    need_lmms()
    records = sweep.run(model="toy", tasks=["vtprune_toy"], methods=["fastervlm"], keeps=[1.0, 0.1],
                        out=str(tmp_path / "s"), limit=6, use_lmms=True, progress=False)
    assert [r["runner"] for r in records] == ["lmms-eval", "lmms-eval"]
    model, processor = toy.load()
    truth = [s["answer"] for s in toy.eval_split(n=6)]
    for record, method in zip(records, [None, "fastervlm"]):
        answers = native_answers(model, processor, 6, method, keep=0.1) if method else \
            native_answers(model, processor, 6)
        assert record["score"] == pytest.approx(sum(a == b for a, b in zip(answers, truth)) / 6)
        assert record["n"] == 6
    assert records[0]["visual_tokens_llm"] == toy.NUM_IMAGE_TOKENS and records[1]["visual_tokens_out"] == 26


def test_cli_eval_and_toy_task(tmp_path, capsys):
    from vtprune.cli import main

    assert main(["toy-task", str(tmp_path / "task"), "--n", "5"]) == 0
    assert (tmp_path / "task" / "vtprune_toy.yaml").exists()
    assert main(["eval", "--methods", "random", "--keep", "1,0.5", "--limit", "8", "--out", str(tmp_path / "e")]) == 0
    printed = capsys.readouterr().out
    assert "| random | 0.5 | 128.0 |" in printed and "2 cells" in printed


def test_cli_eval_toy_video(tmp_path, capsys):
    from vtprune.cli import main

    out = tmp_path / "v"
    assert main(["eval", "--model", "toy-video", "--methods", "evs,uniform_time", "--keep", "1,0.25", "--limit", "10",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "vtprune_toy_video" in printed and "3 cells" in printed
    cells = {}
    for path in (out / "cells").glob("*.json"):
        with open(path) as f:
            record = json.load(f)
        cells[record["method"]] = record
    assert cells["stock"]["visual_tokens_out"] == 128  # per clip: the stock counter sees video tokens
    assert cells["evs"]["visual_tokens_out"] == cells["uniform_time"]["visual_tokens_out"] == 32
    assert set(cells["evs"]["by_type"]) == {"color", "event_shape", "event_color", "event_time", "count"}


@pytest.mark.parametrize("through_lmms", [False, True])
def test_two_processes_give_the_one_process_answers(tmp_path, through_lmms):
    """``--num-processes 2`` (torch.distributed.run, gloo): native cells dealt to the ranks, or
    lmms-eval sharding the questions; the same answers, scores and visual-token counts as 1 process."""
    if through_lmms:
        need_lmms()
    args = ["--methods", "fastervlm", "--keep", "1,0.1", "--limit", "8"] + (["--lmms"] if through_lmms else [])
    one = sweep.run(model="toy", tasks=["vtprune_toy"], methods=["fastervlm"], keeps=[1.0, 0.1],
                    out=str(tmp_path / "one"), limit=8, use_lmms=through_lmms, progress=False)
    env = {**os.environ, **OFFLINE, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "vtprune.cli", "eval", *args, "--out", str(tmp_path / "two"),
                           "--num-processes", "2"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.load(open(tmp_path / "two" / "results.json"))
    assert [r["method"] for r in two] == [r["method"] for r in one] == ["stock", "fastervlm"]
    for a, b in zip(one, two):
        assert b["world_size"] == 2
        assert a["answers"] == b["answers"] and len(a["answers"]) == 8
        assert a["score"] == b["score"] and a["visual_tokens_out"] == b["visual_tokens_out"]
        if through_lmms:
            assert len(b["ranks"]) == 2 and all(r["samples"] == 4 for r in b["ranks"])
