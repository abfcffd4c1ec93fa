"""FrameFusion: merges of a clip's repeated cells and a last-query prune inside the LLM, against the stock model
with each merge's slot replaced by its members' mean at its layer and each stage's tokens masked from its layer on
(hooks on the stock model, no vtprune code); its choices against its definition, written out as loops."""

import math

import pytest
import torch
from reference import assert_merged_and_masked, greedy_model, language_model_inputs, recorded_runs

import vtprune
from vtprune.methods.framefusion import pruning_ratio
from vtprune.testing import IMAGE_TOKEN, VIDEO_FAMILIES, VIDEO_TOKEN, tiny_inputs, tiny_model

DEEPSTACK = ("qwen3_vl", "qwen3_vl_moe")  # visual features still enter the hidden states after layer 0


def _first(family) -> int:
    return 1 if family in DEEPSTACK else 0


def _repeat_frames(inputs, noise=0.0):
    """Every clip's temporal slices made equal to its first (each slice is encoded on its own), so that cells
    repeat across frames and merge; ``noise``: then every pixel moved by that much at random."""
    _repeat(inputs["pixel_values_videos"], inputs)
    if noise:
        gen = torch.Generator().manual_seed(1)
        inputs["pixel_values_videos"] += noise * torch.randn(inputs["pixel_values_videos"].shape, generator=gen)
    return inputs


def _repeat(pixels, inputs):
    if pixels.dim() == 5:  # [clips, frames, C, H, W]
        pixels[:, 1:] = pixels[:, :1]
    elif "video_grid_thw" in inputs:  # Qwen: [patches, D], each clip's slices one after another
        start = 0
        for t, h, w in inputs["video_grid_thw"].tolist():
            n = h * w
            pixels[start + n:start + t * n] = pixels[start:start + n].repeat(t - 1, 1)
            start += t * n
    else:  # Gemma 4: a frame a row
        pixels[1:] = pixels[:1]


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
@pytest.mark.parametrize("images,videos,with_mask", [((0,), (1,), False), ((1, 0), (1, 2), True)])
def test_framefusion_equals_merged_and_masked_reference(family, images, videos, with_mask):
    model = tiny_model(family, llm_layers=4)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = None, 0
    inputs = _repeat_frames(tiny_inputs(model, family, images_per_row=images, videos_per_row=videos,
                                        with_mask=with_mask), noise=0.1)
    options = dict(layer=_first(family), cost=0.3, similarity_lower_bound=0.5)
    logits, record, tokens, after_generate = recorded_runs(model, inputs, "framefusion", **options)
    assert record.exit.merged, "no cell merged: the test would not check the merges"
    assert any(len(members) > 2 for _, _, _, members in record.exit.merged)  # runs over several frames
    merged = {k for k, *_ in record.exit.merged}
    pruned = [k for k, _, _ in record.exit.stages if k not in merged]
    assert merged and min(merged) == options["layer"]
    assert pruned, "no pruning stage ran"
    visual = (inputs["input_ids"] == IMAGE_TOKEN) | (inputs["input_ids"] == VIDEO_TOKEN)
    for _, _, drop in record.exit.stages:
        assert bool((drop.cpu() <= visual).all())
    assert_merged_and_masked(model, inputs, logits, tokens, record, after_generate)


def test_framefusion_on_glm4v_clips_equals_the_merged_and_masked_reference():
    """GLM-4.1V's clips (each frame's placeholders are image tokens, a timestamp after each frame) merge by cell
    across frames as Qwen's do."""
    from test_glm4v import _clip_inputs

    model = tiny_model("glm4v", llm_layers=4)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = None, 0
    inputs = _clip_inputs(model, [(3, 4, 6), (2, 4, 4)])
    t, h, w = 3, 4, 6
    pixels = inputs["pixel_values_videos"]  # the first clip's slices alike, then moved a little
    pixels[h * w:t * h * w] = pixels[:h * w].repeat(t - 1, 1) + 0.1 * torch.randn((t - 1) * h * w, pixels.shape[1])
    logits, record, tokens, after_generate = recorded_runs(model, inputs, "framefusion", cost=0.3,
                                                           similarity_lower_bound=0.5)
    assert any(len(members) > 2 for _, _, _, members in record.exit.merged)
    assert_merged_and_masked(model, inputs, logits, tokens, record, after_generate)


def _merge_by_loop(x, t, n, threshold, limit):
    """FrameFusion's merge of one clip, as loops: ``(merged token -> anchor, ratio, capped)``."""
    sims = {}
    for i in range(n, t * n):
        a, b = x[i].tolist(), x[i - n].tolist()
        dot = sum(p * q for p, q in zip(a, b))
        sims[i] = dot / (math.sqrt(sum(p * p for p in a)) * math.sqrt(sum(q * q for q in b)))
    merged = [i for i in sims if sims[i] >= threshold]
    ratio = len(merged) / (t * n)
    capped = ratio >= limit
    if capped:
        merged = sorted(sims, key=lambda i: (-sims[i], i % n, i // n))[:int(limit * t * n)]  # ties: by cell, time
    merged = set(merged)
    anchors = {}
    for i in sorted(merged):
        j = i - n
        while j in merged:
            j -= n
        anchors[i] = j
    return anchors, ratio, capped


@pytest.mark.parametrize("threshold,cost,capped", [(0.7, 0.6, False), (0.5, 0.6, True), (-1.0, 0.6, True)])
def test_the_first_merge_equals_its_definition_on_the_input_embeddings(threshold, cost, capped):
    """Below the cap (2 of 18 tokens merge, and merging goes on) and at it (the most similar 7 merge; every
    token with a predecessor is similar enough at -1)."""
    model = greedy_model("qwen2_vl")
    inputs = tiny_inputs(model, "qwen2_vl", images_per_row=(0,), videos_per_row=(1,), with_mask=False)
    t, h, w = inputs["video_grid_thw"][0].tolist()
    n = (h // 2) * (w // 2)
    _repeat_frames(inputs)
    later = inputs["pixel_values_videos"][n * 4:]  # the later slices: the first one's pixels, moved
    later += torch.randn(later.shape, generator=torch.Generator().manual_seed(0))
    embeds = language_model_inputs(model, inputs)["inputs_embeds"][0]
    where = (inputs["input_ids"][0] == VIDEO_TOKEN).nonzero().squeeze(1)
    layers = len(model.model.language_model.layers)
    anchors, ratio, at_cap = _merge_by_loop(embeds[where].float(), t, n, threshold, pruning_ratio([], cost, layers))
    assert anchors and at_cap == capped  # each case takes the branch it is there for
    with vtprune.wrapped(model, "framefusion", cost=cost, similarity_lower_bound=threshold):
        with torch.no_grad():
            model(**inputs)
        record = vtprune.record(model)
    first = {}
    for k, _, slot, members in record.exit.merged:
        if k == 0:
            for m in members:
                if m != slot:
                    first[m] = slot
    assert first == {int(where[i]): int(where[a]) for i, a in anchors.items()}
    stages = {k: dropped for k, dropped, _ in record.exit.stages}
    if capped:  # FrameFusion ends at the capped merge: nothing else leaves
        assert list(stages) == [0] and stages[0] == [int(pruning_ratio([], cost, layers) * t * n)]
    else:
        assert stages[0] == [len(anchors)] and math.isclose(ratio, len(anchors) / (t * n))


def test_pruning_keeps_the_share_that_brings_the_mean_to_cost():
    """After merges ``s_1..s_l`` the pruning step keeps ``round(n (1 - s))`` tokens, ``s`` solving
    ``sum_i prod_j<=i (1 - s_j) + (L - l) prod (1 - s) = L cost``."""
    model = greedy_model("llava_next_video")
    inputs = tiny_inputs(model, "llava_next_video", images_per_row=(0,), videos_per_row=(1,), with_mask=False)
    with vtprune.wrapped(model, "framefusion", cost=0.6, similarity_lower_bound=1.0):  # nothing merges
        with torch.no_grad():
            model(**inputs)
        record = vtprune.record(model)
    layers = len(model.model.language_model.layers)
    n = int((inputs["input_ids"] == VIDEO_TOKEN).sum())
    # merging ends at layer 0 (ratio 0 < 0.1); pruning before layer 1: 1 + (L - 1)(1 - s) = L cost
    s = 1 - (layers * 0.6 - 1) / (layers - 1)
    assert [(k, dropped) for k, dropped, _ in record.exit.stages] == [(1, [n - round(n * (1 - s))])]
    assert record.exit.merged == []


@pytest.mark.parametrize("sparsity,cost,layers", [([], 0.3, 28), ([0.2, 0.3], 0.3, 28), ([0.5], 0.9, 4),
                                                  ([0.0, 0.0], 0.5, 4), ([0.1] * 5, 0.2, 8)])
def test_pruning_ratio_solves_the_budget_equation(sparsity, cost, layers):
    s = pruning_ratio(sparsity, cost, layers)
    kept, spent = 1.0, 0.0
    for x in sparsity:
        kept *= 1 - x
        spent += kept
    if s == 1.0:  # the layers so far spent the budget
        assert spent >= layers * cost - 1e-9
    elif s == 0.0:
        assert spent + (layers - len(sparsity)) * kept <= layers * cost + 1e-9
    else:
        assert math.isclose(spent + (layers - len(sparsity)) * kept * (1 - s), layers * cost)


@pytest.mark.parametrize("options,error,words", [
    ({"cost": 0.0}, ValueError, r"cost must lie in \(0, 1\]"),
    ({"cost": "0.3"}, TypeError, "cost must be a number"),
    ({"similarity_lower_bound": 1.5}, ValueError, "similarity_lower_bound"),
    ({"ratio_lower_bound": 1.0}, ValueError, "ratio_lower_bound"),
    ({"layer": 9}, ValueError, "must lie in"),
    ({"layer": 1, "cost": 0.25}, ValueError, "raise cost to at least 0.500"),
    ({"layer": 1, "last_layer": 0}, ValueError, "last_layer must be an int >= layer"),
    ({"last_layer": 2}, ValueError, r"last_layer=2 must lie in \[0, 1\]"),
])
def test_framefusion_options_are_checked_before_anything_changes(options, error, words):
    model = greedy_model("qwen2_vl")
    with pytest.raises(error, match=words):
        vtprune.wrap(model, "framefusion", **options)
    assert not vtprune.is_wrapped(model)


def test_last_layer_ends_the_stages():
    from vtprune.methods import FrameFusion

    assert FrameFusion(layer=1, last_layer=2).stage_layers(4) == [1, 2] and FrameFusion().stage_layers(3) == [0, 1, 2]
    model = tiny_model("qwen2_vl", llm_layers=4)
    inputs = _repeat_frames(tiny_inputs(model, "qwen2_vl", images_per_row=(1,), with_mask=False,
                                        videos_per_row=(1,)), noise=0.1)
    stages = {}
    for last in (None, 1):
        with vtprune.wrapped(model, "framefusion", cost=0.3, similarity_lower_bound=0.5, last_layer=last):
            with torch.no_grad():
                model(**inputs)
            stages[last] = [k for k, _, _ in vtprune.record(model).exit.stages]
    assert max(stages[None]) > 1 and max(stages[1]) <= 1


def test_framefusion_refuses_a_layer_where_deepstack_still_adds_features():
    model = greedy_model("qwen3_vl")
    with pytest.raises(ValueError, match="too early"):
        vtprune.wrap(model, "framefusion", layer=0)
    assert not vtprune.is_wrapped(model)
