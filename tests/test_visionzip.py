"""VisionZip equals an independent re-implementation of its code on the stock model (LLaVA)."""

import pytest
import torch
from reference import drop_mask, masked_greedy

import vtprune
from vtprune.testing import tiny_inputs, tiny_model


def _reference_inputs(family, inputs):
    """[CLS] attention (eager, output_attentions) and head-mean keys of the feature layer, per tile."""
    model = tiny_model(family, attn_implementation="eager")
    keys = []
    layer = model.model.vision_tower.encoder.layers[-2].self_attn
    handle = layer.k_proj.register_forward_hook(lambda m, a, out: keys.append(out))
    with torch.no_grad():
        out = model.model.vision_tower(pixel_values=inputs["pixel_values"], output_attentions=True,
                                       output_hidden_states=True)
    handle.remove()
    cls = out.attentions[-2][:, :, 0, 1:].sum(1)  # VisionZip sums over heads
    k = keys[0].view(keys[0].shape[0], keys[0].shape[1], layer.num_heads, -1).mean(2)[:, 1:]
    return cls, k


def _visionzip_reference(hidden, cls, metric, dominant, contextual):
    """The VisionZip formulation (batched, boolean masks), written from its paper/code description."""
    b, t, c = hidden.shape
    top = cls.topk(dominant, dim=1).indices
    keep_mask = torch.ones(b, t, dtype=torch.bool).scatter(1, top, False)
    rest_index = torch.arange(t).expand(b, t)[keep_mask].view(b, t - dominant)
    hidden_rest = hidden[keep_mask].view(b, t - dominant, c)
    metric_rest = metric[keep_mask].view(b, t - dominant, -1)
    metric_rest = metric_rest / metric_rest.norm(dim=-1, keepdim=True)
    step = max(1, metric_rest.shape[1] // contextual)
    target = torch.arange(0, metric_rest.shape[1], step)[:contextual]
    is_target = torch.zeros(metric_rest.shape[1], dtype=torch.bool)
    is_target[target] = True
    similarity = torch.bmm(metric_rest[:, ~is_target], metric_rest[:, target].transpose(1, 2))
    assign = torch.zeros(b, int((~is_target).sum()), contextual).scatter_(2, similarity.argmax(2, keepdim=True), 1)
    counts = assign.sum(1).clamp(min=1).unsqueeze(-1)
    aggregated = torch.bmm(assign.transpose(1, 2), hidden_rest[:, ~is_target]) / counts
    contextual_tokens = hidden_rest[:, target] + aggregated
    merged = hidden.clone()
    for i in range(b):
        merged[i, rest_index[i, target]] = contextual_tokens[i]
    kept = [torch.sort(torch.cat([top[i], rest_index[i, target]])).values for i in range(b)]
    return merged, kept


def test_visionzip_equals_reference_llava():
    model = tiny_model("llava")
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    inputs = tiny_inputs(model, "llava", images_per_row=(1,))
    cls, metric = _reference_inputs("llava", inputs)
    dominant, contextual = 5, 3  # keep 8 of 16 with contextual_share 0.4

    vtprune.wrap(model, "visionzip", keep=8, contextual_share=0.4)
    with torch.no_grad():
        logits = model(**inputs).logits
        tokens = model.generate(**inputs, max_new_tokens=6, do_sample=False)[:, inputs["input_ids"].shape[1]:]
    kept = vtprune.last_kept(model)
    vtprune.unwrap(model)

    state = {}

    def replace(module, args):
        merged, ref_kept = _visionzip_reference(args[0], cls, metric, dominant, contextual)
        state["kept"] = ref_kept
        return (merged, *args[1:])

    handle = model.model.multi_modal_projector.register_forward_pre_hook(replace)
    try:
        with torch.no_grad():
            model(**inputs)
        assert [k.tolist() for k in state["kept"]] == [kept[0][0].tolist()]
        drop = drop_mask(inputs["input_ids"], kept)
        mask = (~drop).long()
        with torch.no_grad():
            ref_logits = model(**{**inputs, "attention_mask": mask}).logits
        ref_tokens = masked_greedy(model, inputs, drop, steps=6)
    finally:
        handle.remove()
    torch.testing.assert_close(logits[:, -1], ref_logits[:, -1], atol=1e-5, rtol=0)
    assert torch.equal(tokens, ref_tokens)


def test_visionzip_llava_next_batch_and_unsupported_families():
    model = tiny_model("llava_next")
    inputs = tiny_inputs(model, "llava_next", images_per_row=(1, 2))
    with vtprune.wrapped(model, "visionzip", keep=0.25):
        with torch.no_grad():
            out = model(**inputs).logits
        stats = vtprune.stats(model)
    assert torch.isfinite(out).all()
    assert stats["visual_tokens_out"] < stats["visual_tokens_in"]
    other = tiny_model("qwen2_vl")
    with pytest.raises(ValueError, match="merge"):
        vtprune.wrap(other, "visionzip")
    assert not vtprune.is_wrapped(other)
    with pytest.raises(ValueError, match="contextual_share"):
        vtprune.wrap(model, "visionzip", contextual_share=1.0)


def test_visionzip_equals_reference_internvl():
    """InternVL merges in LLM-token units (after the 2x2 pixel shuffle): a token's [CLS] score sums,
    and its key averages, the 4 patches it holds."""
    model = tiny_model("internvl")
    inputs = tiny_inputs(model, "internvl", images_per_row=(1,), image_specs=[3])
    eager = tiny_model("internvl", attn_implementation="eager")
    keys = []
    attn_mod = eager.model.vision_tower.encoder.layer[-1].attention
    handle = attn_mod.k_proj.register_forward_hook(lambda m, a, out: keys.append(out))
    with torch.no_grad():
        out = eager.model.vision_tower(pixel_values=inputs["pixel_values"], output_attentions=True)
    handle.remove()
    children = torch.tensor([[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]])
    cls = out.attentions[-1][:, :, 0, 1:].sum(1)[:, children].sum(-1)  # [tiles, 4]
    k = keys[0].view(3, 17, attn_mod.num_heads, -1).mean(2)[:, 1:][:, children].mean(-2)

    vtprune.wrap(model, "visionzip", keep=2, contextual_share=0.5)
    with torch.no_grad():
        logits = model(**inputs).logits
    kept = vtprune.last_kept(model)
    vtprune.unwrap(model)
    state = {}

    def replace(module, args):
        merged, ref_kept = _visionzip_reference(args[0], cls, k, 1, 1)
        state["kept"] = ref_kept
        return (merged, *args[1:])

    handle = model.model.multi_modal_projector.register_forward_pre_hook(replace)
    try:
        drop = drop_mask(inputs["input_ids"], kept)
        with torch.no_grad():
            ref_logits = model(**{**inputs, "attention_mask": inputs["attention_mask"] * (~drop).long()}).logits
    finally:
        handle.remove()
    expected = torch.cat([idx + 4 * t for t, idx in enumerate(state["kept"])])
    assert kept[0][0].tolist() == expected.tolist()
    torch.testing.assert_close(logits[:, -1], ref_logits[:, -1], atol=1e-5, rtol=0)
