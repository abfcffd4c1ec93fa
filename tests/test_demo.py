"""``vtprune.demo.run``: every registered method runs on the toy model, prints what matters, and
writes a PNG that explains itself."""

import dataclasses
import os
import re

import pytest
from PIL import Image

from vtprune import demo, methods, toy

pytestmark = pytest.mark.skipif(not os.path.exists(os.path.join(toy.DEFAULT_PATH, "model.safetensors")),
                                reason="toy weights not shipped in this checkout")

QUESTIONS = toy.eval_split(n=2, seed=1000)  # what run(n=2, seed=0) asks


def _takes_keep(name):
    """Whether the demo runs one budget per ``keep`` (pre-LLM and in-LLM methods that take one)."""
    cls = methods.get(name)
    return cls.stage != "attention" and "keep" in {f.name for f in dataclasses.fields(cls) if f.init}


def _per_layer(text, label):
    """The visual tokens per decoder layer printed for run ``label`` (every question alike)."""
    match = re.search(rf"^  {re.escape(label)}\s+((?:\d+ )+\d+)  \(every question\)$", text, re.MULTILINE)
    assert match, f"no per-layer line for {label!r} in:\n{text}"
    return [int(v) for v in match.group(1).split()]


@pytest.mark.parametrize("name", methods.available())
def test_every_method_runs_and_explains_itself(name, tmp_path, capsys, monkeypatch):
    stage = methods.get(name).stage
    out = tmp_path / "demo.png"
    if stage == "input":  # downsample: one line, status 2, before any model is loaded
        monkeypatch.setattr(demo, "_load", lambda: pytest.fail("the demo loaded a model for downsample"))
        assert demo.run([1.0, 0.25], method=name, n=2, out=str(out)) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.count("\n") == 1
        assert name in captured.err and "fixed resolution" in captured.err and "pool" in captured.err
        assert not out.exists()
        return
    assert demo.run([1.0, 0.25], method=name, n=2, out=str(out)) == 0
    text = capsys.readouterr().out
    with Image.open(out) as image:
        width, height = image.size
        colours = image.convert("RGB").getcolors(1 << 20)
    assert 700 <= width <= 1600 and 350 <= height <= 900 and width > height
    assert colours is None or len(colours) > 1000  # the pictures are in it, not a blank page
    assert f"method {name!r}" in text and "correct" in text and "p(truth)" in text
    for s in QUESTIONS:
        assert re.search(rf"^{re.escape(s['question'])}\s+{s['answer']}\s", text, re.MULTILINE)
    labels = ["keep=1.0", "keep=0.25"] if _takes_keep(name) else ["stock"]
    for label in labels:  # run, tokens, LLM sequence, prefill, LLM work saved, p(truth), correct
        row = rf"^{re.escape(label)}\s+\d+\s+\d+\s+(\d+) ms \((\d+)-(\d+)\)\s+\d+%\s+[\d.]+\s+\d/2$"
        median, low, high = map(int, re.search(row, text, re.MULTILINE).groups())
        assert low <= median <= high, label  # the median of the timed runs, inside their range
    # a still image (one frame) stays whole (evs, uniform_time, dycoke); flashvid keeps keep x 1.25 before the LLM
    if stage == "select" and name not in ("evs", "uniform_time", "dycoke", "flashvid"):
        assert re.search(r"^keep=0\.25\s+64\s", text, re.MULTILINE)  # 64 of 256 tokens per image
    if stage == "llm":
        assert "visual tokens per decoder layer" in text
    if name == "pdrop":  # two stages, each said as what it is (not one "exit" dropping their sum)
        assert re.search(r"stage before layer 1: visual tokens dropped per question 128 128$", text, re.MULTILINE)
        assert re.search(r"stage before layer 2: visual tokens dropped per question 64 64$", text, re.MULTILINE)
        assert "exit before layer" not in text
        if _takes_keep(name):  # fastv, dart: 64 of 256 stay from layer 2 (their default)
            assert _per_layer(text, "keep=1.0") == [256, 256, 256]
            assert _per_layer(text, "keep=0.25") == [256, 256, 64]
            assert "exit before layer 2: visual tokens dropped per question 192 192" in text
        elif name == "exit":  # the stock model, then all leave before layer 1, then before layer 2
            assert _per_layer(text, "stock") == [256, 256, 256]
            assert _per_layer(text, "layer=1") == [256, 0, 0]
            assert _per_layer(text, "layer=2") == [256, 256, 0]
        elif name == "pdrop":  # stages before layers 1 and 2 of 3: half of what entered, then a quarter
            assert _per_layer(text, "pdrop") == [256, 128, 64]
        elif name == "sparsevlm":  # stages after layers 0 and 1 of 3 (2, 6, 15 of 32 scaled), fewer each time
            first, second, third = _per_layer(text, "sparsevlm")
            assert first == 256 > second > third > 0
        else:  # dynamic (dyvte): per question, the first layer without visual tokens
            assert "first layer without visual tokens, per question:" in text
    if stage == "attention":
        assert f"{name} stats (vtprune.stats(model)[{name!r}]" in text
        assert re.search(rf"^{name}\s+256\s+\d+", text, re.MULTILINE)  # every token stays
    if name == "vhr":
        assert re.search(r"heads_per_layer: layer \d+: \d+ \d+", text)
    if name == "var":
        assert "sink_dims: [" in text and re.search(r"visual_sinks_per_layer: layer 1: [1-9]\d* [1-9]", text)
    if name == "zerotuning":
        assert "demo default gamma=2.0" in text and "no entry for zerotuning (gamma=2.0)" in text


def test_options_reach_the_method(tmp_path, capsys):
    out = tmp_path / "fastv.png"
    assert demo.run([0.25], method="fastv", n=2, out=str(out), options={"layer": 1}) == 0
    text = capsys.readouterr().out
    assert "method 'fastv' (layer=1)" in text and "before decoder layer 1" in text
    assert _per_layer(text, "keep=0.25") == [256, 64, 64]
    assert demo.run([1.0], method="exit", n=2, out=str(out), options={"layer": 2}) == 0
    text = capsys.readouterr().out
    assert _per_layer(text, "exit") == [256, 256, 0] and "layer=1" not in text


@pytest.mark.parametrize("method, options, keeps, error, words", [
    ("fastervlmm", None, [0.5], ValueError, "registered methods"),
    ("fastv", {"alpha": 2}, [0.5], TypeError, "it takes: keep, layer, query"),
    ("fastv", {"query": "first"}, [0.5], ValueError, "query"),
    ("random", None, [0.0], ValueError, "keep"),
    ("random", None, [], ValueError, "at least one budget"),
    ("vhr", {"alpha": -1}, [1.0], ValueError, "alpha"),
])
def test_bad_method_or_option_fails_before_loading(method, options, keeps, error, words, monkeypatch, tmp_path):
    monkeypatch.setattr(demo, "_load", lambda: pytest.fail("the demo loaded a model before checking"))
    with pytest.raises(error, match=words):
        demo.run(keeps, method=method, n=2, out=str(tmp_path / "x.png"), options=options)
