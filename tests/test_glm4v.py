"""GLM-4.1V's videos: each frame's placeholders are image tokens (``mm_token_type_ids`` 2 marks them as a
video's), between a start and an end token and followed by a timestamp; the frames are numbered one by one.
Pruned clips against the stock model with the dropped tokens masked, positions kept."""

import pytest
import torch
from reference import greedy_model, greedy_steps

import vtprune
from vtprune.testing import IMAGE_TOKEN, VISION_END, VISION_START


def _clip_inputs(model, rows, seed=0):
    """A left-padded batch: row b holds one clip of ``rows[b]`` ((t, h, w) patches) between a few text tokens
    (GLM-4.1V's stock model takes no image and video in one batch: its image mask counts a video's tokens)."""
    gen = torch.Generator().manual_seed(seed)
    v = model.config.vision_config
    dim = 3 * v.temporal_patch_size * v.patch_size ** 2
    prompts = []
    for b, (t, h, w) in enumerate(rows):
        ids = [1] + [5 + i for i in range(2 + 2 * b)] + [110]
        for f in range(t):
            ids += [VISION_START] + [IMAGE_TOKEN] * (h * w // 4) + [VISION_END] + [30 + f]
        prompts.append(torch.tensor(ids + [111, 7, 8, 9]))
    length = max(r.numel() for r in prompts)
    pad = lambda r: torch.cat([r.new_zeros(length - r.numel()), r])  # noqa: E731
    ids = torch.stack([pad(r) for r in prompts])
    return {"input_ids": ids, "attention_mask": torch.stack([pad(torch.ones_like(r)) for r in prompts]),
            "mm_token_type_ids": torch.where(ids == IMAGE_TOKEN, 2, 0).int(),
            "pixel_values_videos": torch.cat([torch.randn(t * h * w, dim, generator=gen) for t, h, w in rows]),
            "video_grid_thw": torch.tensor(rows)}


def _reference(model, inputs, kept, steps):
    """The stock model's logits and greedy tokens (with a cache) with the tokens ``kept`` leaves out masked."""
    ids = inputs["input_ids"]
    drop = torch.zeros_like(ids, dtype=torch.bool)
    for b, items in enumerate(kept):
        pos = (ids[b] == IMAGE_TOKEN).nonzero().squeeze(1)
        if not items:
            continue
        (k,) = items  # the row's clip
        gone = torch.ones(pos.numel(), dtype=torch.bool)
        gone[k] = False
        drop[b, pos[gone]] = True
    mask = inputs["attention_mask"] * (~drop).long()
    vision, _ = model.model.get_rope_index(ids, inputs["mm_token_type_ids"], None, inputs["video_grid_thw"],
                                           attention_mask=inputs["attention_mask"])
    text = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    pos = torch.cat([text[None], vision])
    kw = {k: v for k, v in inputs.items() if k != "attention_mask"}
    with torch.no_grad():
        out = model(**kw, attention_mask=mask, position_ids=pos, use_cache=True)
    return out.logits, greedy_steps(model, out, mask, pos, steps)


@pytest.mark.parametrize("rows", [[(3, 4, 6)], [(3, 4, 6), (2, 4, 4)]])
@pytest.mark.parametrize("method,keep", [("random", 0.5), ("evs", 0.25), ("fastervlm", 0.3)])
def test_a_pruned_clip_equals_the_masked_reference(rows, method, keep):
    model = greedy_model("glm4v")
    inputs = _clip_inputs(model, rows)
    if len(rows) == 1:
        del inputs["attention_mask"]  # batch 1 without a mask
    with vtprune.wrapped(model, method, keep=keep):
        with torch.no_grad():
            logits = model(**inputs).logits
        kept = vtprune.last_kept(model)
        clips = [sample["videos"][0] for sample in vtprune.stats(model)["samples"]]
        tokens = model.generate(**inputs, max_new_tokens=6, do_sample=False)[:, inputs["input_ids"].shape[1]:]
        kept_generate = vtprune.last_kept(model)
    inputs.setdefault("attention_mask", torch.ones_like(inputs["input_ids"]))
    for clip, (t, h, w) in zip(clips, rows):  # per frame: h/2 x w/2 tokens in, fewer out in all
        assert [f["tokens_in"] for f in clip["frames"]] == [h * w // 4] * t and clip["tokens_out"] < t * h * w // 4
    ref_logits, _ = _reference(model, inputs, kept, 0)
    torch.testing.assert_close(logits[:, -1], ref_logits[:, -1], atol=1e-5, rtol=0)
    assert torch.equal(tokens, _reference(model, inputs, kept_generate, 6)[1])


def test_keep_all_on_clips_is_stock():
    model = greedy_model("glm4v")
    inputs = _clip_inputs(model, [(3, 4, 6), (2, 4, 4)])
    with torch.no_grad():
        stock = model(**inputs).logits
        stock_tokens = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        with vtprune.wrapped(model, "random", keep=1.0):
            torch.testing.assert_close(model(**inputs).logits, stock, atol=1e-5, rtol=0)
            assert torch.equal(model.generate(**inputs, max_new_tokens=6, do_sample=False), stock_tokens)
