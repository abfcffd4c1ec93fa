"""FasterVLM scores computed from q/k hooks on SDPA equal the eager definition and select the same tokens.

The reference runs the stock tower with eager attention and ``output_attentions=True`` (what the
FasterVLM code does), takes the [CLS] row of the feature layer, drops the [CLS] column, averages
over heads, and maps tower tokens onto LLM tokens independently of vtprune's adapters:
LLaVA by position, LLaVA-NeXT by matching projected features, InternVL by the 2x2 pixel shuffle.
"""

import pytest
import torch
from reference import drop_mask, masked_forward

import vtprune
from vtprune.budget import tokens_to_keep
from vtprune.testing import FAMILIES, tiny_inputs, tiny_model


def _eager_cls(family, inputs, layer=-2):
    model = tiny_model(family, attn_implementation="eager")
    pix = inputs["pixel_values"]
    if family == "llava_next":
        pix = pix[0, :3]  # the tiles the model encodes for image size (50, 100)
    with torch.no_grad():
        out = model.model.vision_tower(pixel_values=pix, output_attentions=True)
    attn = out.attentions[layer]  # [tiles, heads, N, N]
    return model, attn[:, :, 0, 1:].mean(1)  # [tiles, patches]


def _reference_scores(family, inputs):
    if family == "llava":
        _, cls = _eager_cls(family, inputs)
        return cls[0]
    if family == "internvl":
        _, cls = _eager_cls(family, inputs, layer=-1)
        tiles, p = cls.shape
        side = int(p ** 0.5)
        grid = cls.view(tiles, side // 2, 2, side // 2, 2)  # token (i, j) <- patches (2i+a, 2j+b)
        return grid.sum((2, 4)).reshape(-1)
    # llava_next: find each LLM token's source by matching its projected feature
    model, cls = _eager_cls(family, inputs)
    with torch.no_grad():
        packed = model.model.get_image_features(pixel_values=inputs["pixel_values"],
                                                image_sizes=inputs["image_sizes"]).pooler_output[0]
        tower = model.model.vision_tower(pixel_values=inputs["pixel_values"][0, :3], output_hidden_states=True)
        per_tile = model.model.multi_modal_projector(tower.hidden_states[-2][:, 1:])  # [tiles, patches, D]
    flat = per_tile.reshape(-1, per_tile.shape[-1])
    dist = torch.cdist(packed, flat)
    best = dist.argmin(1)
    matched = dist.min(1).values < 1e-3  # newline tokens match nothing
    return torch.where(matched, cls.reshape(-1)[best], torch.zeros(()))


@pytest.mark.parametrize("family", ["llava", "llava_next", "internvl"])
@pytest.mark.parametrize("keep", [0.25, 0.5])
def test_scores_equal_eager_definition_and_select_same_tokens(family, keep):
    model = tiny_model(family)
    inputs = tiny_inputs(model, family)
    vtprune.wrap(model, "fastervlm", keep=keep)
    with torch.no_grad():
        logits = model(**inputs).logits
    ours = vtprune.record(model).scores[0]
    kept = vtprune.last_kept(model)
    vtprune.unwrap(model)
    ref = _reference_scores(family, inputs)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)
    layout_newline = ref == 0
    k = tokens_to_keep(keep, int((~layout_newline).sum()))
    ref_top = torch.sort(ref.masked_fill(layout_newline, -1), descending=True, stable=True).indices[:k]
    ours_content = [i for i in kept[0][0].tolist() if not layout_newline[i]]
    assert sorted(ours_content) == sorted(ref_top.tolist())
    # and the pruned forward equals the stock model with the dropped tokens masked
    ref_logits = masked_forward(model, inputs, drop_mask(inputs["input_ids"], kept))
    torch.testing.assert_close(logits[:, -1], ref_logits[:, -1], atol=1e-5, rtol=0)


def test_layer_option_and_range():
    model = tiny_model("llava")
    inputs = tiny_inputs(model, "llava")
    vtprune.wrap(model, "fastervlm", keep=0.5, vision_layer=0)
    with torch.no_grad():
        model(**inputs)
    ours = vtprune.record(model).scores[0]
    vtprune.unwrap(model)
    _, cls = _eager_cls("llava", inputs, layer=0)
    torch.testing.assert_close(ours, cls[0], atol=1e-6, rtol=1e-5)
    hooks = sum(len(m._forward_hooks) for m in model.modules())  # transformers' own, installed lazily
    with pytest.raises(ValueError, match="out of range"):
        vtprune.wrap(model, "fastervlm", vision_layer=7)
    assert not vtprune.is_wrapped(model)
    assert sum(len(m._forward_hooks) for m in model.modules()) == hooks


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["fastervlm", "vtc_cls"])
def test_generate_batch_left_padded_equals_masked_reference(family, method):
    from reference import masked_greedy

    model = tiny_model(family)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    inputs = tiny_inputs(model, family, images_per_row=(1, 2))
    with vtprune.wrapped(model, method, keep=0.3, **({"start_layer": 0} if method == "vtc_cls" else {})):
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=6, do_sample=False)[:, inputs["input_ids"].shape[1]:]
        kept = vtprune.last_kept(model)
    assert torch.equal(out, masked_greedy(model, inputs, drop_mask(inputs["input_ids"], kept), steps=6))


def test_vtc_cls_sums_layers_up_to_the_feature_layer():
    model = tiny_model("llava")  # 3 tower layers, the projector reads layer 1 (vision_feature_layer -2)
    inputs = tiny_inputs(model, "llava")
    vtprune.wrap(model, "vtc_cls", keep=0.5, start_layer=0)
    with torch.no_grad():
        model(**inputs)
    ours = vtprune.record(model).scores[0]
    assert vtprune.record(model).tower_layers == [0, 1]
    vtprune.unwrap(model)
    ref = _eager_cls("llava", inputs, layer=0)[1][0] + _eager_cls("llava", inputs, layer=1)[1][0]
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="start_layer"):
        vtprune.wrap(model, "vtc_cls", start_layer=2)
    assert not vtprune.is_wrapped(model)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "glm4v"])
def test_qwen_substitute_score_equals_recorded_attention(family):
    """Qwen has no [CLS]: the score is the attention each patch receives in the feature layer.

    The reference records the attention probabilities the stock tower computes, through a
    custom attention function registered with transformers (it sees the model's own rotated q/k).
    """
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    model = tiny_model(family)
    inputs = tiny_inputs(model, family, images_per_row=(2,), image_specs=[(8, 8), (4, 12)])
    target = model.model.visual.blocks[-1].attn
    probs = []

    def recording(module, query, key, value, attention_mask, scaling=None, **kwargs):
        if module is target:
            p = ((query.float() @ key.float().transpose(-1, -2)) * scaling).softmax(-1)  # [1, H, n, n]
            probs.append(p[0].mean(0).mean(0))  # received attention per key: mean over heads and queries
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)

    AttentionInterface.register("vtprune_test_recording", recording)
    model.set_attn_implementation({"vision_config": "vtprune_test_recording"})
    with torch.no_grad():
        model(**inputs)
    model.set_attn_implementation({"vision_config": "sdpa"})
    per_patch = torch.cat(probs)  # the tower sequence, image after image
    if family == "qwen2_5_vl":
        from transformers.vision_utils import get_vision_window_index

        v = model.config.vision_config
        window, _ = get_vision_window_index(inputs["image_grid_thw"], 2, v.window_size, v.patch_size)
        groups = per_patch.view(-1, 4).sum(1)[torch.argsort(window)]
    else:
        groups = per_patch.view(-1, 4).sum(1)
    ref = [groups[:16], groups[16:]]

    vtprune.wrap(model, "fastervlm", keep=0.25)
    with torch.no_grad():
        model(**inputs)
    ours = vtprune.record(model).scores
    vtprune.unwrap(model)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_received_attention_source_on_clip_equals_eager():
    model = tiny_model("llava")
    inputs = tiny_inputs(model, "llava")
    vtprune.wrap(model, "fastervlm", keep=0.5, source="received")
    with torch.no_grad():
        model(**inputs)
    ours = vtprune.record(model).scores[0]
    vtprune.unwrap(model)
    eager = tiny_model("llava", attn_implementation="eager")
    with torch.no_grad():
        attn = eager.model.vision_tower(pixel_values=inputs["pixel_values"], output_attentions=True).attentions[-2]
    ref = attn[0].mean(0).mean(0)[1:]  # received by each patch, averaged over heads and all queries
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="source"):
        vtprune.wrap(model, "fastervlm", source="mean")


@pytest.mark.parametrize("family", ["gemma3", "llava_onevision"])
def test_siglip_substitute_score_sums_the_patches_a_token_pools(family):
    """SigLIP has no [CLS]: a token's score is the attention its patches receive in the layer the projector
    reads (eager, heads and queries averaged), summed over the 2 x 2 patches it pools (Gemma 3: 8 x 8 patches
    averaged into 4 x 4 tokens; LLaVA-OneVision's clip frames: 4 x 4 halved to 2 x 2)."""
    eager = tiny_model(family, attn_implementation="eager")
    if family == "gemma3":
        inputs = tiny_inputs(eager, family)
        pixels, side = inputs["pixel_values"], 8
    else:
        inputs = tiny_inputs(eager, family, images_per_row=(0,), videos_per_row=(1,))
        pixels, side = inputs["pixel_values_videos"][0], 4
    with torch.no_grad():
        attn = eager.model.vision_tower(pixel_values=pixels, output_attentions=True).attentions[-1]
    per_patch = attn.mean(1).mean(1).view(-1, side // 2, 2, side // 2, 2)  # [frames, i, a, j, b]
    ref = per_patch.sum((2, 4)).reshape(-1)
    model = tiny_model(family)
    with vtprune.wrapped(model, "fastervlm", keep=0.5):
        with torch.no_grad():
            model(**inputs)
        ours = vtprune.record(model).scores[0]
    if family == "llava_onevision":
        assert ours[-1] == 0  # the newline after the clip
        ours = ours[:-1]
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)


def test_received_attention_strided_queries_approximate_the_full_mean():
    from vtprune.tower_scores import received

    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(700, 4, 8, generator=gen), torch.randn(700, 4, 8, generator=gen)
    segments = [(0, 300), (300, 700)]
    full = received(q, k, segments, 0.35, max_queries=10_000)
    strided = received(q, k, segments, 0.35, max_queries=128)
    assert torch.allclose(full[:300].sum(), torch.tensor(1.0)) and torch.allclose(strided[300:].sum(), torch.tensor(1.0))
    assert torch.corrcoef(torch.stack([full, strided]))[0, 1] > 0.9


def test_tower_scores_of_equal_and_unequal_segments_agree():
    """Segments of one length are batched: the same numbers as one segment at a time."""
    from vtprune.tower_scores import cls, received

    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(60, 2, 4, generator=gen), torch.randn(60, 2, 4, generator=gen)
    segments = [(0, 20), (20, 40), (40, 60)]
    for score in (cls, received):
        together = score(q, k, segments, 0.5)
        alone = torch.cat([score(q[a:b], k[a:b], [(0, b - a)], 0.5) for a, b in segments])
        torch.testing.assert_close(together, alone, atol=1e-6, rtol=0)
        for a, b in segments:
            torch.testing.assert_close(together[a:b].sum(), torch.tensor(1.0))


def test_cls_source_on_a_tower_without_cls_is_not_applicable():
    model = tiny_model("qwen2_vl")
    with pytest.raises(vtprune.NotApplicable, match="no \\[CLS\\] token"):
        vtprune.wrap(model, "fastervlm", keep=0.5, source="cls")
    assert not vtprune.is_wrapped(model)
    with vtprune.wrapped(model, "fastervlm", keep=0.5):  # the default there: the attention received
        with torch.no_grad():
            model(**tiny_inputs(model, "qwen2_vl"))
        assert vtprune.record(model).scores[0].sum() > 0
