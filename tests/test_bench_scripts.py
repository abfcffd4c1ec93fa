"""The benchmark scripts run end to end on tiny models (they are run for real on a GPU only when one
is lent, so a broken script must show up here first).  These check what the scripts report, not
how fast anything is."""

import importlib.util
import json
import math
import os

import pytest
import torch

from vtprune.budget import tokens_to_keep

SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(SCRIPTS, name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _keep_threads():
    threads = torch.get_num_threads()  # bench_prefill sets the thread count
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "qwen2_5_vl-video"])
def test_bench_prefill_rows(tmp_path, family):
    bench = _load("bench_prefill")
    out = str(tmp_path / "b")
    rows = bench.main(["--models", f"tiny-{family}", "--methods", "random,fastervlm,fastv,exit",
                       "--keep", "1.0,0.25", "--repeats", "1", "--decode-tokens", "2",
                       "--out", out])
    assert [(r["method"], r["keep"]) for r in rows] == [
        ("none", 1.0), ("random", 0.25), ("fastervlm", 0.25), ("fastv", 0.25), ("exit", 0.0)]
    n = rows[0]["visual_in"]
    for r in rows:
        assert r["llm_length"] == r["length"] - n + r["visual_out"]
        for key in ("prefill_ms", "oracle_ms", "wrapped_vs_oracle", "decode_tok_s", "oracle_decode_tok_s"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["method"], key)
    by = {r["method"]: r for r in rows}
    assert by["none"]["visual_out"] == n and by["none"]["ideal_speedup"] == pytest.approx(1.0)
    assert by["random"]["visual_out"] == by["fastervlm"]["visual_out"] == tokens_to_keep(0.25, n)
    assert by["random"]["stage"] == "pre-llm" and by["fastv"]["stage"] == "llm"
    assert by["fastv"]["exit_layer"] == by["exit"]["exit_layer"] == 1  # a 2-layer LLM exits at layer 1
    assert by["exit"]["visual_out"] == 0
    # the FLOPs model: in-LLM methods save less than pruning to the same count before the LLM
    assert 1.0 < by["fastv"]["ideal_speedup"] < by["random"]["ideal_speedup"]
    with open(out + ".json") as f:
        assert len(json.load(f)["rows"]) == len(rows)
    with open(out + ".md") as f:
        table = f.read()
    assert "fastv (L1/2)" in table and table.count("\n") == len(rows) + 2


def test_bench_kernels_smoke(monkeypatch, tmp_path):
    pytest.importorskip("triton", reason="the triton extra is not installed")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the smoke run needs TRITON_INTERPRET=1 (set before triton is imported)")
    bench = _load("bench_kernels")
    rows = bench.main(["--smoke", "--out", str(tmp_path / "k.md")])
    assert [(what.split()[0], batch) for what, batch, *_ in rows] == [("cut", 1), ("cut", 2)]
    assert all(v > 0 for *_, k, t, c in rows for v in (k, t, c))
    assert (tmp_path / "k.md").read_text().count("\n") == len(rows) + 2


def test_bench_prefill_without_decode_and_keep_1_timed_once(tmp_path):
    """What ``--quick`` runs (no decode; at keep 1 the oracle is the stock model, not timed twice)."""
    bench = _load("bench_prefill")
    out = str(tmp_path / "q")
    rows = bench.main(["--models", "tiny-llava", "--methods", "fastervlm", "--keep", "1.0,0.1", "--repeats", "1",
                       "--decode-tokens", "0", "--out", out])
    assert [(r["method"], r["keep"]) for r in rows] == [("none", 1.0), ("fastervlm", 0.1)]
    assert all(r["decode_tok_s"] is None and r["oracle_decode_tok_s"] is None for r in rows)
    assert rows[0]["oracle_ms"] == rows[0]["prefill_ms"] and rows[0]["wrapped_vs_oracle"] == 1.0
    assert rows[1]["oracle_ms"] != rows[1]["prefill_ms"] and rows[1]["visual_out"] < rows[1]["visual_in"]
    assert "| – | – |" in open(out + ".md").read()


def test_real_width_model_folder_loads_and_has_576_tokens_per_image(tmp_path):
    """``scripts/real_width_model.py`` (its language model shrunk here; the vision tower at ViT-L/14-336
    widths, 2 layers): the folder loads in transformers, an image becomes LLaVA-1.5's 576 tokens, a forward
    pass runs, and the CLIP keys are named as vLLM loads them."""
    import transformers as tf
    from safetensors import safe_open

    from vtprune import toy

    script = _load("real_width_model")
    with pytest.raises(SystemExit):
        script.main([str(tmp_path / "x"), "--llm-layers", "0"])
    folder = script.build(str(tmp_path / "m"), llm_layers=1, tower_layers=2, dtype="float32",
                          widths={"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2,
                                  "num_key_value_heads": 2, "vocab_size": 64})
    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("vision_tower.vision_model.") for k in keys)
    assert not any(k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model.") for k in keys)
    processor = tf.AutoProcessor.from_pretrained(folder)
    sample = toy.eval_split(n=1)[0]
    batch = processor(images=[sample["image"]], text=[toy.prompt(sample["question"])], return_tensors="pt")
    config = tf.AutoConfig.from_pretrained(folder)
    assert int((batch["input_ids"] == config.image_token_index).sum()) == 576
    assert config.vision_config.hidden_size == 1024 and config.vision_config.image_size == 336
    model = tf.AutoModelForImageTextToText.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[-1] == 64 and torch.isfinite(logits).all()


def test_bench_selection_rows():
    bench = _load("bench_selection")
    rows = bench.main(["--methods", "random,evs,fastvid,dycoke", "--slices", "4", "--side", "4", "--dim", "16",
                       "--repeats", "1", "--keep", "0.5"])
    assert [r["method"] for r in rows] == ["random", "evs", "fastvid", "dycoke"]
    assert all(r["tokens"] == 64 and 0 < r["kept"] < 64 and r["select_ms"] > 0 for r in rows)
    assert next(r for r in rows if r["method"] == "evs")["kept"] == 32  # max(n, int(T n keep))


def test_the_video_table_compares_each_row_with_the_unpruned_row_of_its_round():
    bench = _load("bench_vllm")
    row = dict(engine="vllm", keep=1.0, concurrency=8, n=4, ttft_ms=None, accuracy=1.0, by_type={"count": 1.0},
               prompt_tokens=168)
    rows = [dict(row, method="none", requests_per_s=10.0, run=0), dict(row, method="none", requests_per_s=20.0, run=1),
            dict(row, engine="vtprune", method="evs", keep=0.25, requests_per_s=15.0, run=0, prompt_tokens=72),
            dict(row, engine="vtprune", method="evs", keep=0.25, requests_per_s=15.0, run=1, prompt_tokens=72)]
    lines = bench.video_table(rows).splitlines()
    assert "| vtprune | evs | 0.25 | 72.0 | 8 | 15.00 | 1.50x |" in lines[4]
    assert "| vtprune | evs | 0.25 | 72.0 | 8 | 15.00 | 0.75x |" in lines[5]
