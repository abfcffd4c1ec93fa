"""On the trained toy model, [CLS]-attention pruning keeps what random pruning loses."""

import os

import pytest
import torch

import vtprune
from vtprune import toy

pytestmark = pytest.mark.skipif(not os.path.exists(os.path.join(toy.DEFAULT_PATH, "model.safetensors")),
                                reason="toy weights not shipped in this checkout")


@pytest.fixture(scope="module")
def toy_model():
    torch.set_num_threads(2)
    yield toy.load()
    torch.set_num_threads(1)


def test_fastervlm_beats_random_at_90_percent_reduction(toy_model):
    model, processor = toy_model
    samples = toy.eval_split(n=160)
    accuracy = {}
    for method in ("random", "fastervlm"):
        with vtprune.wrapped(model, method, keep=0.1):
            accuracy[method] = toy.evaluate(model, processor, samples, batch_size=40, progress=False)
            assert vtprune.stats(model)["samples"][0]["tokens_out"] == 26
    # random falls to about the question-type prior; the [CLS] keeps colour and shape answerable
    assert accuracy["random"]["overall"] < 0.6
    assert accuracy["fastervlm"]["overall"] > accuracy["random"]["overall"] + 0.2
    assert accuracy["fastervlm"]["by_type"]["color"] > 0.9


def test_shipped_dyvte_routers_load_and_keep_accuracy(toy_model):
    model, processor = toy_model
    samples = toy.eval_split(n=80)
    with vtprune.wrapped(model, "dyvte", weights="toy", threshold=0.5):
        result = toy.evaluate(model, processor, samples, batch_size=40, progress=False)
        exits = vtprune.stats(model)["exit"]["exit_layers"]
    assert result["overall"] > 0.9
    assert len(exits) == 40 and all(e is None or e in (1, 2) for e in exits)


def test_train_dyvte_script_smoke(tmp_path, monkeypatch):
    import runpy
    import sys

    out = tmp_path / "routers.safetensors"
    monkeypatch.setattr(sys, "argv", ["train_dyvte.py", "--steps", "2", "--batch-size", "4", "--width", "16",
                                      "--out", str(out), "--threads", "1"])
    runpy.run_path(os.path.join(os.path.dirname(__file__), "..", "scripts", "train_dyvte.py"), run_name="__main__")
    from vtprune.dyvte import Routers

    routers = Routers.load(str(out))
    assert routers.layers == [0, 1] and routers.width == 16
