"""The embedded toy video model (vtprune.toy_video): clips, prompts as Qwen3-VL's processor writes them,
the shipped weights' accuracy, and pruning on it against the masked stock model."""

import types

import numpy as np
import pytest
import torch
from reference import masked_forward, masked_greedy

import vtprune
from vtprune import toy_video as tv


def test_clips_are_deterministic_and_the_event_is_where_it_should_be():
    clip = tv.make_clip(3)
    frames = tv.render(clip)
    assert frames.shape == (tv.FRAMES, 3, tv.FRAME, tv.FRAME) and frames.dtype == np.uint8
    assert np.array_equal(frames, tv.render(clip))
    event = list(tv.event_slices(clip))
    assert len(event) == tv.EVENT_SLICES and all(0 <= s < tv.SLICES for s in event)
    row, col = divmod(clip["event"]["cell"], tv.GRID)
    cells = frames.astype(np.float32).reshape(tv.FRAMES, 3, tv.GRID, tv.CELL, tv.GRID, tv.CELL)
    before = event[0] - 1 if event[0] else event[-1] + 1
    change = np.abs(cells[event[0] * tv.TEMPORAL] - cells[before * tv.TEMPORAL]).mean(axis=(0, 2, 4))
    assert change.argmax() == row * tv.GRID + col  # the cell that changes most is the event's
    assert change.max() > 2 * np.median(change)  # the rest is sensor noise and jitter
    assert {o["shape"] for o in clip["static"]}.isdisjoint({clip["event"]["shape"]})


def test_questions_cover_every_type_with_the_right_answers():
    clip = tv.make_clip(5)
    qs = {q["type"]: q for q in tv.make_questions(clip, 0)}
    assert set(qs) == set(tv.QUESTION_TYPES)
    assert qs["event_shape"]["answer"] == clip["event"]["shape"]
    assert qs["event_time"]["answer"] == tv.QUARTERS[clip["quarter"]]
    assert qs["count"]["answer"] == tv.NUMBER_WORDS[len(clip["static"])]
    split = tv.eval_clips(50)
    assert [q["type"] for _, q in split[:5]] == list(tv.QUESTION_TYPES)
    words = tv.vocab()
    assert all(w in words for _, q in split for w in q["question"].split() + [q["answer"]])


def test_prompt_is_what_qwen3_vl_processor_and_the_chat_template_write():
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    tok = tv.build_tokenizer()
    # the processor's own placeholder code, on the toy's clip metadata (16 frames at 1 fps)
    proc = object.__new__(Qwen3VLProcessor)
    proc.video_processor = types.SimpleNamespace(merge_size=tv.MERGE, temporal_patch_size=tv.TEMPORAL)
    proc.vision_start_token, proc.vision_end_token, proc.video_token = tv.VISION_START, tv.VISION_END, tv.VIDEO_PAD
    meta = types.SimpleNamespace(fps=tv.FPS, frames_indices=list(range(tv.FRAMES)))
    grid = [[tv.SLICES, tv.FRAME // tv.PATCH, tv.FRAME // tv.PATCH]]
    placeholder = proc.replace_video_token({"video_grid_thw": torch.tensor(grid), "video_metadata": [meta]}, 0)
    assert placeholder == tv.video_text()
    question = "when does the cross appear ?"
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == tv.prompt(question)
    expanded = text.replace(tv.VISION_START + tv.VIDEO_PAD + tv.VISION_END, placeholder)
    assert tok(expanded, add_special_tokens=False)["input_ids"] == tv.prompt_ids(question)
    assert tok.unk_token_id not in tv.prompt_ids(question)


def test_inputs_are_left_padded_with_one_grid_per_clip():
    frames = [tv.render(tv.make_clip(i)) for i in range(2)]
    x = tv.inputs(frames, ["what shape appears ?", "when does the circle appear ?"])
    pad = tv.vocab()["<pad>"]
    assert x["input_ids"][1, 0] != pad and x["input_ids"][0, 0] == pad and x["attention_mask"][0, 0] == 0
    assert x["video_grid_thw"].tolist() == [[tv.SLICES, 8, 8]] * 2
    assert (x["mm_token_type_ids"] == 2).sum(1).tolist() == [tv.NUM_VIDEO_TOKENS] * 2
    with pytest.raises(ValueError, match="one question per clip"):
        tv.inputs(frames, ["what shape appears ?"])


@pytest.fixture(scope="module")
def toy_video():
    model, _ = tv.load()
    return model


@pytest.fixture(scope="module")
def samples():
    return tv.eval_split(100)


def test_shipped_model_answers_the_benchmark(toy_video, samples):
    res = tv.evaluate(toy_video, samples, progress=False)
    prior = tv.type_prior(samples)
    assert res["overall"] >= 0.9, res
    assert all(res["by_type"][t] > prior[t] + 0.2 for t in tv.QUESTION_TYPES), (res["by_type"], prior)


def _drop(inputs, kept):
    """True on the video tokens ``kept`` (per row, one clip each) leaves out."""
    drop = torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
    for b, row in enumerate(inputs["input_ids"]):
        where = (row == tv.vocab()[tv.VIDEO_PAD]).nonzero().squeeze(1)
        gone = torch.ones(len(where), dtype=torch.bool)
        gone[kept[b][0]] = False
        drop[b, where[gone]] = True
    return drop


def _until_eos(tokens):
    """Greedy tokens with everything after each row's first eos set to pad (``generate`` stops there)."""
    vocab = tv.vocab()
    done = (tokens == vocab["</s>"]).long().cumsum(1) - (tokens == vocab["</s>"]).long() > 0
    return tokens.masked_fill(done, vocab["<pad>"])


@pytest.mark.parametrize("method", ["evs", "vidcom2", "random"])
def test_pruned_toy_video_is_the_stock_model_with_dropped_tokens_masked(toy_video, samples, method):
    batch = samples[:3]
    inputs = tv.inputs([s["frames"] for s in batch], [s["question"] for s in batch])
    assert inputs["attention_mask"][:, 0].tolist() != [1, 1, 1]  # questions of several lengths: left padding
    with vtprune.wrapped(toy_video, method, keep=0.1):
        with torch.no_grad():
            got = toy_video(**inputs).logits[:, -1]
        kept = vtprune.last_kept(toy_video)
        tokens = toy_video.generate(**inputs, max_new_tokens=4, do_sample=False)[:, inputs["input_ids"].shape[1]:]
        kept_generate = vtprune.last_kept(toy_video)  # random draws anew on every prompt
    drop = _drop(inputs, kept)
    assert int((~drop & (inputs["mm_token_type_ids"] == 2)).sum(1).max()) < tv.NUM_VIDEO_TOKENS // 4
    want = masked_forward(toy_video, inputs, drop)[:, -1]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    as_lists = lambda k: [[list(map(int, clip)) for clip in row] for row in k]  # noqa: E731
    assert (as_lists(kept_generate) == as_lists(kept)) == (method != "random")
    want_tokens = _until_eos(masked_greedy(toy_video, inputs, _drop(inputs, kept_generate), steps=4))
    n = tokens.shape[1]  # generate stops once every row has its eos
    assert torch.equal(_until_eos(tokens), want_tokens[:, :n]) and (want_tokens[:, n:] == tv.vocab()["<pad>"]).all()


@pytest.mark.parametrize("sweep", ["toy_video_2026-12-06.json", "toy_video_framefusion_2026-12-07.json"])
def test_the_docs_table_is_the_committed_sweep(sweep):
    """docs/video.md's tables of the toy video sweeps are ``report.markdown`` of the committed JSON: their numbers
    are generated, not typed."""
    import json
    import os

    from vtprune.eval import report

    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs")
    with open(os.path.join(root, "bench", sweep)) as f:
        records = json.load(f)
    with open(os.path.join(root, "video.md")) as f:
        page = f.read()
    table = [line for line in report.markdown(records).splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(records) and "\n".join(table) in page
    stock = next(r for r in records if r["method"] == "stock")
    assert stock["n"] == 400 and stock["score"] >= 0.99  # the shipped model, unpruned
