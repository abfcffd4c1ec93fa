"""A Qwen2-VL or Qwen2.5-VL clip served pruned: its kept tokens, and the text after it, at the positions stock vLLM
gives them in the unpruned prompt (no engine is started: the pruned class's own numbering, embedding of a clip
and rewrite, run on a model object without weights, against vLLM's ``get_mrope_input_positions``)."""

import collections
import os
import types

import pytest

if os.environ.get("VTPRUNE_REQUIRE_VLLM") != "1":  # CI sets it: there a missing vLLM fails the run
    pytest.importorskip("vllm")

import torch  # noqa: E402
import transformers as tf  # noqa: E402

WIDTH = 16  # the features' width
START, END, IMAGE, VIDEO = 90, 91, 92, 93  # the tiny config's vision start, end, image and video tokens


def _config(model_type):
    ids = dict(vision_start_token_id=START, vision_end_token_id=END, image_token_id=IMAGE, video_token_id=VIDEO)
    text = dict(vocab_size=128, hidden_size=WIDTH, num_hidden_layers=1, num_attention_heads=2, bos_token_id=0,
                eos_token_id=1)
    if model_type == "qwen2_5_vl":
        return tf.Qwen2_5_VLConfig(text_config=text, vision_config=dict(spatial_merge_size=2, tokens_per_second=4),
                                   **ids)
    return tf.Qwen2VLConfig(text_config=text, vision_config=dict(spatial_merge_size=2), **ids)


def _feature(modality, offset, length, grid, seconds=None):
    from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange

    data = {f"{modality}_grid_thw": types.SimpleNamespace(data=torch.tensor(grid))}
    if seconds is not None:
        data["second_per_grid_ts"] = types.SimpleNamespace(data=seconds)
    return MultiModalFeatureSpec(data=data, modality=modality, identifier=f"{modality}{offset}",
                                 mm_position=PlaceholderRange(offset=offset, length=length))


@pytest.mark.parametrize("model_type,thw,fps,dtype", [
    ("qwen2_5_vl", (4, 12, 12), 6.0, torch.float32),  # a third of a second a slice: positions 0, 1, 2, 4
    ("qwen2_5_vl", (4, 12, 12), 6.0, torch.bfloat16),  # (its seconds in bf16, as vLLM casts them)
    ("qwen2_5_vl", (16, 8, 8), 2.0, torch.float32),  # time past the rows and columns: text after at 61
    ("qwen2_5_vl", (80, 4, 4), 2.0, torch.bfloat16),  # positions past 256, which bf16 rows would round
    ("qwen2_vl", (6, 12, 8), None, torch.bfloat16)])  # Qwen2-VL: a slice a position
def test_a_pruned_clip_keeps_vllms_unpruned_positions(model_type, thw, fps, dtype):
    """The kept tokens and the text after the clip at stock vLLM's unpruned positions, wherever vLLM's prefill chunks
    (or prefix-cache hits) cut the prompt."""
    from vtprune.serving import check
    from vtprune.serving.qwen import CLASSES, pruned_qwen, recompute_mrope_positions

    import importlib

    module, prefix, _ = CLASSES[model_type]
    Stock = getattr(importlib.import_module(module), f"{prefix}ForConditionalGeneration")
    config = check("random", 0.3, {}, model_type)
    Pruned = pruned_qwen(config, model_type)
    model = Pruned.__new__(Pruned)  # no weights: what the numbering, the embedding and the rewrite read
    hf = _config(model_type)
    t, h, w = thw
    n = t * h * w // 4
    features = torch.randn(n, WIDTH, generator=torch.Generator().manual_seed(n)).to(dtype)
    model.__dict__.update(config=hf, vtprune_width=WIDTH, vtprune_config=config, vtprune_kept=[],
                          vtprune_generator=torch.Generator().manual_seed(0),
                          vtprune_video_budgets=collections.deque(), visual=types.SimpleNamespace(spatial_merge_size=2),
                          _process_video_input=lambda given: (features,))
    seconds = None if fps is None else torch.tensor([2 / fps]).to(dtype)  # temporal patch 2 over the fps
    given = {"video_grid_thw": torch.tensor([thw]), "second_per_grid_ts": seconds}
    rows = model._vtprune_block_clips(given)[0]
    kept = torch.tensor(model.vtprune_kept[-1])
    assert 0 < len(kept) < n and rows.shape == (len(kept), WIDTH + 8)
    assert torch.equal(rows[:, :WIDTH], features[kept])

    # the prompt: an image, text, the clip, text; unpruned and as served (the clip's run cut to the kept count)
    head = [1, 2, START, IMAGE, IMAGE, IMAGE, IMAGE, END, 3, START]
    tail = [END, 4, 5, 6, 7]
    image = _feature("image", 3, 4, [1, 4, 4])
    full = head + [VIDEO] * n + tail
    stock, _ = Stock.get_mrope_input_positions(model, full, [image, _feature("video", len(head), n, [*thw], seconds)])
    served = head + [VIDEO] * len(kept) + tail
    before, _ = model.get_mrope_input_positions(served, [image, _feature("video", len(head), len(kept), [*thw],
                                                                         seconds)])
    image_rows = torch.cat([torch.zeros(4, WIDTH), torch.tensor([[0, 0, 0, 2], [0, 0, 1, 2], [0, 1, 0, 2],
                                                                 [0, 1, 1, 2]])], 1)
    _, after, delta = recompute_mrope_positions(model, torch.tensor(served), [image_rows, rows.float()], before, 0)
    ours = torch.tensor([True] * len(head) + [False] * n + [True] * len(tail))
    ours[len(head) + kept] = True
    assert torch.equal(after, stock[:, ours])
    assert torch.equal(before[:, len(head) + len(kept):], stock[:, len(head) + n:])  # (a prefix-cache hit's text)
    assert delta == int(stock.max()) + 1 - len(served)
    # a prefill chunk that ends just after the clip's start token (vLLM's rewrite alone raises IndexError there)
    _, staged, _ = recompute_mrope_positions(model, torch.tensor(served), [image_rows], before, 0)
    _, chunked, delta = recompute_mrope_positions(model, torch.tensor(served), [rows.float()], staged, len(head))
    assert torch.equal(chunked, stock[:, ours]) and delta == int(stock.max()) + 1 - len(served)
    # a chunk (or a prefix-cache hit) that ends inside the clip, and one that holds the end of the image and the clip
    cut = len(kept) // 2
    _, staged, _ = recompute_mrope_positions(model, torch.tensor(served), [image_rows, rows[:cut].float()], before, 0)
    _, chunked, _ = recompute_mrope_positions(model, torch.tensor(served), [rows[cut:].float()], staged, len(head) + cut)
    assert torch.equal(chunked, stock[:, ours])
    _, staged, _ = recompute_mrope_positions(model, torch.tensor(served), [image_rows[:1]], before, 0)
    _, chunked, _ = recompute_mrope_positions(model, torch.tensor(served), [image_rows[1:], rows.float()], staged, 4)
    assert torch.equal(chunked, stock[:, ours])


def test_a_prompt_the_model_did_not_number_is_refused_by_the_rewrite():
    """The rewrite places rows by where the numbering found each media: a prompt it never numbered has no places, and
    the rewrite says so rather than guess."""
    from vtprune.serving import mrope

    model = types.SimpleNamespace()
    prompt = [1, START, IMAGE, IMAGE, END, 2]
    mrope.record(model, prompt, [_feature("image", 2, 2, [1, 2, 4])])
    rows = torch.tensor([[0, 0, 0, 2], [0, 0, 1, 2]]).T
    positions, delta = mrope.place(model, torch.tensor(prompt), [rows], torch.arange(6).expand(3, 6), 0)
    assert positions[:, 2:4].tolist() == [[2, 2], [2, 2], [2, 3]] and delta == 0
    with pytest.raises(RuntimeError, match="not numbered by the served model"):
        mrope.place(model, prompt + [3], [rows], torch.arange(7).expand(3, 7), 0)
