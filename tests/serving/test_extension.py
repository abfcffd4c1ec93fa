"""A family and a selector of one's own, each one module (``tests/extension_example.py``), served in vLLM:
the toy model renamed ``RenamedLlavaForConditionalGeneration`` (an architecture neither vLLM nor vtprune
knows) pruned by ``centre`` (a selector vtprune does not ship), both reaching vLLM's processes through
``VTPRUNE_EXTENSIONS`` — token for token the HF wrap of the toy with ``centre``."""

import json
import os
import shutil

import pytest
from served import hf_run, serve, until_eos

if os.environ.get("VTPRUNE_REQUIRE_VLLM") != "1":
    pytest.importorskip("vllm")

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 8


def test_a_family_and_a_selector_of_ones_own_serve_as_the_hf_wrap(extension, tmp_path, monkeypatch):
    from vtprune import toy
    from vtprune.serving import model_dir

    monkeypatch.setenv("VTPRUNE_EXTENSIONS", "extension_example")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]))
    folder = tmp_path / "renamed"
    shutil.copytree(model_dir("toy"), folder)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["RenamedLlavaForConditionalGeneration"]
    (folder / "config.json").write_text(json.dumps(config))

    model, processor = toy.load()
    samples = toy.eval_split(n=N)
    batch = processor(images=[s["image"] for s in samples], text=[toy.prompt(s["question"]) for s in samples],
                      return_tensors="pt", padding=True)
    tokens, kept = hf_run(model, batch, "centre", 0.25, positions="renumber")
    served = serve("centre", 0.25, N, str(folder), engine_process=True)  # the extension imported in each process
    assert [until_eos(t) for t in served["tokens"]] == tokens
    assert sorted(map(tuple, served["kept"])) == sorted(map(tuple, kept))
    assert {len(k) for k in kept} == {64}
    lengths = batch["attention_mask"].sum(1).tolist()
    assert served["prompt_tokens"] == [length - 192 for length in lengths]
