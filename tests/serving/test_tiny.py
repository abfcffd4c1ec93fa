"""vtprune inside vLLM on tiny random InternVL, Qwen2-VL, Qwen2.5-VL and Qwen3-VL models (serving venv): the
processor's kept placeholder count, the kept rows and their positions.  Reference: the HF model wrapped
with the same method and the ``positions`` vLLM matches — Qwen: ``"original"`` (kept tokens at their
(t, h, w) mrope positions as EVS rewrites them, the text after the image at its unpruned positions;
Qwen3-VL with its deepstack features cut alike); InternVL: ``"renumber"`` (1-D positions numbered afresh;
its tiny model's rope is short-waved so that the two numberings answer differently) — token for token,
which a wrong position breaks."""

import os

import pytest
from served import hf_run, serve, until_eos

if os.environ.get("VTPRUNE_REQUIRE_VLLM") != "1":  # CI sets it: there a missing vLLM fails the run
    pytest.importorskip("vllm")

N = 16
STEPS = 4


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return {}


@pytest.fixture
def tiny(request, built, tmp_path_factory):
    """(folder, HF model, batch, model type) of the tiny model the test names (built once per module)."""
    model_type = request.param
    if model_type not in built:
        built[model_type] = _build(model_type, str(tmp_path_factory.mktemp(model_type)))
    return built[model_type]


def _build(model_type, folder):
    import tiny_internvl
    import tiny_qwen
    import transformers as tf

    from vtprune import toy

    tiny = tiny_internvl if model_type == "internvl" else tiny_qwen
    prompt = tiny.prompt
    folder = tiny.build(folder) if model_type == "internvl" else tiny.build(folder, model_type)
    model = tf.AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = tf.AutoProcessor.from_pretrained(folder)
    samples = toy.eval_split(n=N)
    batch = processor(images=[s["image"] for s in samples], text=[prompt(s["question"]) for s in samples],
                      return_tensors="pt", padding=True)
    return folder, model, batch, model_type


@pytest.mark.parametrize("tiny,method,keep", [("internvl", None, 1.0), ("internvl", "divprune", 0.25),
                                              ("qwen2_vl", None, 1.0), ("qwen2_vl", "pool", 0.25),
                                              ("qwen2_5_vl", None, 1.0), ("qwen2_5_vl", "divprune", 0.25),
                                              ("qwen3_vl", None, 1.0), ("qwen3_vl", "pool", 0.25)], indirect=["tiny"])
def test_a_served_tiny_model_keeps_and_answers_as_the_hf_wrap(tiny, method, keep):
    from vtprune.serving import POSITIONS, check
    from vtprune.serving.select import kept_count

    folder, model, batch, model_type = tiny
    tokens, kept = hf_run(model, batch, method, keep, steps=STEPS, positions=POSITIONS[model_type])
    served = serve(method or "random", keep, N, folder)
    assert [until_eos(t) for t in served["tokens"]] == tokens
    if kept is not None:
        assert sorted(map(tuple, served["kept"])) == sorted(map(tuple, kept))
    # tokens per image: InternVL 4 crops and a thumbnail of 4 x 4 each; Qwen a 6 x 6 grid of merged tokens
    n, grid = (80, [(4, 4)] * 5) if model_type == "internvl" else (36, (6, 6))
    dropped = n - kept_count(check(method or "random", keep, {}, model_type), n, grid)
    lengths = batch["attention_mask"].sum(1).tolist()
    assert served["prompt_tokens"] == [length - dropped for length in lengths]
    assert dropped > 0 or method is None
