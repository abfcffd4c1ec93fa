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
from vtprune.testing import tiny_inputs, tiny_model


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
    ours = model._vtprune_session.last["scores"][0]
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
    vtprune.wrap(model, "fastervlm", keep=0.5, layer=0)
    with torch.no_grad():
        model(**inputs)
    ours = model._vtprune_session.last["scores"][0]
    vtprune.unwrap(model)
    _, cls = _eager_cls("llava", inputs, layer=0)
    torch.testing.assert_close(ours, cls[0], atol=1e-6, rtol=1e-5)
    hooks = sum(len(m._forward_hooks) for m in model.modules())  # transformers' own, installed lazily
    with pytest.raises(ValueError, match="out of range"):
        vtprune.wrap(model, "fastervlm", layer=7)
    assert not vtprune.is_wrapped(model)
    assert sum(len(m._forward_hooks) for m in model.modules()) == hooks


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_families_without_cls_raise_and_stay_unwrapped(family):
    model = tiny_model(family)
    with pytest.raises(ValueError, match="no \\[CLS\\]"):
        vtprune.wrap(model, "fastervlm", keep=0.5)
    assert not vtprune.is_wrapped(model)
    assert "get_image_features" not in vars(model.model)
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0


def test_generate_with_fastervlm_batch_left_padded():
    from reference import masked_greedy

    model = tiny_model("llava_next")
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    inputs = tiny_inputs(model, "llava_next", images_per_row=(1, 2))
    with vtprune.wrapped(model, "fastervlm", keep=0.3):
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
    ours = model._vtprune_session.last["scores"][0]
    assert model._vtprune_session.tower_layers == [0, 1]
    vtprune.unwrap(model)
    ref = _eager_cls("llava", inputs, layer=0)[1][0] + _eager_cls("llava", inputs, layer=1)[1][0]
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="start_layer"):
        vtprune.wrap(model, "vtc_cls", start_layer=2)
    assert not vtprune.is_wrapped(model)
