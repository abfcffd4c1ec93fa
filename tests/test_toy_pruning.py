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
