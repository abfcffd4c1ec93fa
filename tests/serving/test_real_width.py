"""``scripts/real_width_model.py --family qwen3_vl`` and ``--family qwen2_5_vl`` (shrunk here) make folders that
transformers and vLLM load, with the processors the serving benchmark's prompts need: a toy image becomes 196 (256)
tokens, a toy clip 8 slices of 4 x 4; ``scripts/bench_vllm.py`` serves both on them, pruned (prompt lengths as the
kept counts say)."""

import importlib.util
import os

import pytest
from served import result

if os.environ.get("VTPRUNE_REQUIRE_VLLM") != "1":  # CI sets it: there a missing vLLM fails the run
    pytest.importorskip("vllm")

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
SHRUNK = {"text": dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=32, vocab_size=128,
                       rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [8, 4, 4],
                                        "mrope_interleaved": True}),
          "vision": dict(hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=128)}


def _script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    script = _script("real_width_model")
    return script.build_qwen(str(tmp_path_factory.mktemp("rw") / "qwen3_vl"), "qwen3_vl", llm_layers=2,
                             tower_layers=3, dtype="float32", widths=SHRUNK)


def _image_tokens_of_a_toy_image(folder, config) -> int:
    """The image tokens ``folder``'s processor makes of a toy image in the benchmark's prompt; the model, loaded by
    transformers, answers it with finite logits."""
    import torch
    import transformers as tf

    from vtprune import toy

    processor = tf.AutoProcessor.from_pretrained(folder)
    sample = toy.eval_split(n=1)[0]
    batch = processor(images=[sample["image"]], text=[_script("bench_vllm").image_prompt(sample["question"], folder)],
                      return_tensors="pt")
    model = tf.AutoModelForImageTextToText.from_pretrained(folder).eval()
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()
    return int((batch["input_ids"] == config.image_token_id).sum())


def test_the_folder_has_qwen3_vl_8b_shapes_where_not_shrunk_and_loads(folder):
    import transformers as tf

    config = tf.AutoConfig.from_pretrained(folder)
    assert config.vision_config.patch_size == 16 and config.vision_config.depth == 3
    assert config.vision_config.deepstack_visual_indexes == [0, 1, 2]  # 8, 16, 24 of 27 spread over 3
    assert config.vision_config.num_position_embeddings == 2304
    assert _image_tokens_of_a_toy_image(folder, config) == 196  # 448 x 448: 28 x 28 patches, merged 2 x 2


def _row(*argv):
    return result([os.path.join(ROOT, "scripts", "bench_vllm.py"), *argv], timeout=900)


def test_the_benchmark_serves_its_clips_and_images_pruned(folder):
    clip = _row("--video-worker", "vtprune", "evs", "0.25", "2", "1", folder, "float32")
    stock = _row("--video-worker", "vllm", "none", "1.0", "2", "1", folder, "float32")
    assert stock["prompt_tokens"] - clip["prompt_tokens"] == 128 - 32  # a clip's 128 tokens, evs keeps a quarter
    image = _row("--worker", "divprune", "0.25", "2", "1", folder, "float32")
    full = _row("--worker", "random", "1.0", "2", "1", folder, "float32")
    assert full["prompt_tokens"] - image["prompt_tokens"] == 196 - 49


def test_a_qwen2_5_vl_folder_has_its_shapes_and_loads(tmp_path):
    import transformers as tf

    script = _script("real_width_model")
    text = dict(SHRUNK["text"], rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                                 "mrope_section": [8, 4, 4]})
    text.pop("head_dim")
    folder = script.build_qwen(str(tmp_path / "qwen2_5_vl"), "qwen2_5_vl", llm_layers=2, tower_layers=3,
                               dtype="float32", widths={"text": text, "vision": SHRUNK["vision"]})
    config = tf.AutoConfig.from_pretrained(folder)
    assert config.vision_config.patch_size == 14 and config.vision_config.window_size == 112
    assert config.vision_config.fullatt_block_indexes == [0, 1, 2]  # 7, 15, 23, 31 of 32 spread over 3
    assert _image_tokens_of_a_toy_image(folder, config) == 256  # 448 x 448: 32 x 32 patches, merged 2 x 2
    # its clips served pruned by vtprune (one block of tokens a clip, vtprune's own rows): 8 slices of 4 x 4
    clip = _row("--video-worker", "vtprune", "evs", "0.25", "2", "1", folder, "float32")
    stock = _row("--video-worker", "vllm", "none", "1.0", "2", "1", folder, "float32")
    assert stock["prompt_tokens"] - clip["prompt_tokens"] == 128 - 32
