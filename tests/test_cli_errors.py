"""First contact: every mistake on the command line is one line, exit status 2, before a model loads;
a failure while running is one line, exit status 1; ``--debug`` shows the traceback."""

import pytest

import vtprune
from vtprune import methods, toy, toy_video
from vtprune.cli import main
from vtprune.eval import sweep

BAD = [
    (["eval", "--methods", "fastervlmm"], "did you mean 'fastervlm'"),
    (["eval", "--methods", "fastervlm:sourse=received"], "did you mean 'source'"),
    (["eval", "--methods", "fastervlm:source=cls_token"], "source must be"),
    (["eval", "--methods", "fastervlm:oops"], "not key=value"),
    (["eval", "--methods", "exit:layer=x"], "layer must be an int"),
    (["eval", "--methods", "visionzip+vhr+fastv"], "does not compose"),
    (["eval", "--methods", "downsample:keep=3.0"], "must lie in (0, 1]"),
    (["eval", "--methods", ""], "--methods is empty"),
    (["eval", "--keep", "0"], "--keep"),
    (["eval", "--keep", "abc"], "is not a number"),
    (["eval", "--keep", "1.5"], "must lie in (0, 1]"),
    (["eval", "--device", "cuda"] if not __import__("torch").cuda.is_available() else ["eval", "--device", "cuda:99"],
     "--device cuda"),
    (["eval", "--device", "floppy"], "is not a device"),
    (["eval", "--model", "/no/such/folder"], "no such folder"),
    (["eval", "--model", "./relative/missing"], "no such folder"),
    (["eval", "--model", "not a model id!"], "not a hub id"),
    (["eval", "--limit", "0"], "--limit must be >= 1"),
    (["eval", "--model-args", "dtype"], "not key=value"),
    (["eval", "--include-path", "/no/such/tasks"], "no such folder"),
    (["eval", "--bogus"], "unrecognized arguments"),
    (["demo", "--method", "fastv:keep=2.0"], "must lie in (0, 1]"),
    (["demo", "--method", "fastervlm+vhr"], "one method at a time"),
    (["demo", "--method", "downsample"], "pool stands in"),
    (["demo", "--n", "0"], "--n must be >= 1"),
    (["demo", "--keep", "0.1,nan?"], "is not a number"),
    (["demo", "--out", "/no/such/dir/demo.png"], "no such folder"),
    (["info", "--method", "fastrv"], "did you mean 'fastv'"),
    (["info", "--method", "FASTERVLM"], "did you mean 'fastervlm'"),
    (["calibrate", "var", "--model", "toy", "--images", "/no/such/images"], "no such folder"),
    (["calibrate", "var", "--model", "toy", "--tau", "0"], "--tau must be > 0"),
    (["eval", "--methods", "fastv:layer=99"], "--methods fastv:layer=99: fastv layer=99 must lie in [1, 2]"),
    (["eval", "--methods", "random,vhr:layers=[0,7]"], "vhr layers [7] do not exist"),
    (["eval", "--methods", "zerotuning:heads=[9]", "--model", "toy-video"], "the language model has 4 heads"),
    (["eval", "--methods", "pdrop:layer_list=[1,5]"], "pdrop layer_list [5] must lie in [1, 2]"),
    (["eval", "--tasks", "no_such_task"], "lmms-eval has no such task"),
    (["eval", "--tasks", "mmee"], "did you mean 'mme'"),
    (["eval", "--model", "toy-video", "--tasks", "vtprune_toy"], "answers its own task only"),
    (["eval", "--model", "toy-video", "--lmms", "--tasks", "mme"], "answers its own task only"),
    (["eval", "--tasks", "vtprune_toy_video"], "use --model toy-video"),
    (["eval", "--model", "toy-video", "--methods", "downsample"], "clips have one size"),
    (["demo", "--video", "--method", "downsample"], "clips have one size"),
    (["demo", "--video", "--method", "evss"], "did you mean 'evs'"),
    (["calibrate", "var", "--model", "toy-video"], "calibrate reads images"),
    (["serve", "toy", "--method", "evs"], "evs ranks a video's tokens across its frames"),
    (["serve", "toy-video", "--method", "evs", "--video-pruning-rate", "0.5"], "leave them out"),
    (["nosuchcommand"], "invalid choice"),
]


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if anything loads a model or starts a sweep."""
    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded before the command line was checked")

    monkeypatch.setattr(toy, "load", forbidden)
    monkeypatch.setattr(toy_video, "load", forbidden)
    monkeypatch.setattr(sweep, "run", forbidden)
    monkeypatch.setattr("vtprune.demo.run", forbidden)
    monkeypatch.setattr("vtprune.demo_video.run", forbidden)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("VTPRUNE_DEBUG", raising=False)


@pytest.mark.parametrize("argv,expected", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_command_is_one_line_and_exit_2(argv, expected, capsys, no_model):
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vtprune: error: "), captured.err
    assert expected in lines[0]
    assert "Traceback" not in captured.err + captured.out


def test_a_task_whose_dataset_cannot_be_read_is_named_before_loading(capsys, no_model, monkeypatch):
    """Offline without a cached copy (HF_HUB_OFFLINE): one line naming the dataset; online, a hub that does
    not answer gives the same advice."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", "/no/such/cache")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert main(["eval", "--tasks", "mme"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--tasks mme: its dataset " in err and "/MME is not in the local hub cache" in err
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.HfApi.dataset_info", lambda *a, **k: (_ for _ in ()).throw(OSError("no route")))
    assert main(["eval", "--tasks", "mme"]) == 2
    assert "the hub did not answer (no route)" in capsys.readouterr().err


def test_lmms_eval_missing_is_named(monkeypatch, capsys, no_model):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lmms_eval" else real(name, *a))
    assert main(["eval", "--tasks", "mme"]) == 2
    assert "pip install 'vtprune[eval]'" in capsys.readouterr().err


def test_a_failure_while_running_is_one_line_exit_1_and_debug_shows_it(monkeypatch, capsys):
    def broken(**kwargs):
        raise RuntimeError("disk full\nsecond line")

    monkeypatch.setattr(sweep, "run", broken)
    monkeypatch.delenv("VTPRUNE_DEBUG", raising=False)
    assert main(["eval", "--methods", "random"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["vtprune: error: RuntimeError: disk full (run with --debug for the traceback)"]
    with pytest.raises(RuntimeError, match="disk full"):
        main(["eval", "--methods", "random", "--debug"])
    monkeypatch.setenv("VTPRUNE_DEBUG", "1")
    with pytest.raises(RuntimeError, match="disk full"):
        main(["eval", "--methods", "random"])


@pytest.mark.parametrize("name", methods.available())
def test_info_method_says_stage_options_and_paper(name, capsys):
    assert main(["info", "--method", name]) == 0
    out = capsys.readouterr().out
    cls = methods.get(name)
    assert out.startswith(f"{name}: ")
    assert {"select": "before the LLM", "llm": "inside the LLM", "attention": "attention",
            "input": "the processor"}[cls.stage] in out
    for option in vtprune.spec.options_of(name):
        assert f"\n  {option} " in out
    assert (cls.paper in out) if cls.paper else "a control" in out
    if name not in ("random", "uniform", "pool", "downsample", "exit", "uniform_time"):  # controls
        assert "arXiv" in cls.paper


def test_every_option_has_a_range():
    for name in methods.available():
        described = vtprune.spec.describe(name)
        assert all(o["range"] for o in described["options"]), (name, described["options"])


def test_sweep_caches_only_typed_not_applicable(tmp_path, monkeypatch, capsys):
    """A ``NotApplicable`` cell is recorded and skipped on resume; any other error stops the sweep
    and leaves no cell file, so the cell runs again next time."""
    def fake_run(self, cell, seed=None):
        if cell.spec == "visionzip":
            raise vtprune.NotApplicable("no per-patch tower features to merge")
        if cell.spec == "fastervlm":
            raise RuntimeError("a real bug")
        visual = 256 if cell.keep is None else int(256 * cell.keep)
        return {"score": 0.5, "by_type": {}, "n": 4, "prefill_ms": 1.0, "answers": {},
                "totals": {"samples": 4, "visual_tokens_in": 4 * 256, "visual_tokens_out": 4 * visual,
                           "visual_tokens_llm": 4 * visual}}

    monkeypatch.setattr(sweep.ToyRunner, "__init__", lambda self, **kwargs: None)
    monkeypatch.setattr(sweep.ToyRunner, "run", fake_run)
    out = tmp_path / "sweep"
    kwargs = dict(model="toy", tasks=["vtprune_toy"], keeps=[1.0, 0.5], out=str(out), limit=4, progress=False)
    with pytest.raises(RuntimeError, match="a real bug"):
        sweep.run(methods=["visionzip", "fastervlm"], **kwargs)
    files = {p.name for p in (out / "cells").iterdir()}
    assert files == {sweep.Cell("vtprune_toy", "stock").slug + ".json",
                     sweep.Cell("vtprune_toy", "visionzip", 0.5).slug + ".json"}
    capsys.readouterr()
    records = sweep.run(methods=["visionzip", "random"], **kwargs)
    assert "reusing 2 of 3 cells" in capsys.readouterr().out
    by = {r["method"]: r for r in records}
    assert by["visionzip"]["not_applicable"] and by["visionzip"]["score"] is None
    assert by["random"]["score"] == 0.5


def test_per_method_options_in_one_spec(capsys, no_model):
    """``a:opt=v+b:opt=w``: each method its own options (``b.opt`` in wrap's terms); a typo names the method."""
    from vtprune.spec import parse_spec

    names, options = parse_spec("uniform:keep=0.25+fastv:layer=1;keep=0.5")
    assert names == ["uniform", "fastv"] and options == {"uniform.keep": 0.25, "fastv.layer": 1, "fastv.keep": 0.5}
    assert parse_spec("fastervlm+vhr:alpha=2") == (["fastervlm", "vhr"], {"alpha": 2})  # shared, as before
    from vtprune.api import methods_of
    from vtprune.testing import tiny_model

    model = tiny_model("llava")
    with vtprune.wrapped(model, names, **options):
        configs = methods_of(model)
    assert [(c.name, c.keep) for c in configs] == [("uniform", 0.25), ("fastv", 0.5)]
    cells = sweep.plan(["t"], ["uniform:keep=0.25+fastv:layer=1;keep=0.5", "uniform+fastv:layer=1"], [1.0, 0.5, 0.1])
    assert [(c.spec, c.keep) for c in cells] == [("stock", None), ("uniform:keep=0.25+fastv:layer=1;keep=0.5", None),
                                                 ("uniform+fastv:layer=1", 0.5), ("uniform+fastv:layer=1", 0.1)]
    assert main(["eval", "--methods", "uniform:keep=0.25+fastv:layr=1"]) == 2
    assert "option 'layr' is not accepted by fastv (did you mean 'layer'?)" in capsys.readouterr().err


def test_list_values_in_specs(capsys, no_model):
    """``bias_layers=[0,1]``: a list value; the commas inside brackets do not split the method list."""
    from vtprune.spec import parse_spec, split_specs

    assert split_specs("random, fastervlm:summary=4;bias_layers=[0,1],pool") == \
        ["random", "fastervlm:summary=4;bias_layers=[0,1]", "pool"]
    assert parse_spec("fastervlm:bias_layers=[0,1];summary=2") == (["fastervlm"], {"bias_layers": [0, 1], "summary": 2})
    assert parse_spec("fastervlm:bias_layers=[]") == (["fastervlm"], {"bias_layers": []})
    assert main(["eval", "--methods", "random,fastervlm:summary=4;summary_group=kmeans"]) == 2
    assert "summary_group must be one of" in capsys.readouterr().err
    assert main(["eval", "--methods", "pool:summary=1"]) == 2
    assert "use size_bias=True" in capsys.readouterr().err


def test_serve_errors_are_one_line_before_anything_loads(capsys, no_model, monkeypatch):
    """``vtprune serve``: unsupported methods, bad budgets and a missing vLLM stop with status 2."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    cases = [(["serve", "toy", "--method", "fastv"], "fastv acts inside the language model"),
             (["serve", "toy", "--method", "uniform", "--keep", "2.5"], "must lie in (0, 1]"),
             (["serve", "toy", "--method", "uniform", "--keep", "0.25"], "needs vLLM: build the serving venv"),
             (["serve", "toy", "--keep", "lots"], "--keep 'lots' is not a number"),
             (["serve", "toy", "--method", "fastervlm+vhr", "--keep", "0.25"], "runs one method"),
             (["serve", "toy", "--method", "visionzip:contextual_share=2", "--keep", "0.25"], "contextual_share"),
             (["serve", "toy", "--keep", "0.5,0.25"], "takes one budget"),
             (["serve", "toy", "--method", "uniform:summary=2;summary_group=space", "--keep", "0.25"],
              "summary_group='similarity'")]
    for argv, words in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, err
