"""PyramidDrop: staged exits against the stock model with each stage's tokens masked from its layer on."""

import pytest
import torch
from reference import masked_forward, masked_greedy, staged_masks

import vtprune
from vtprune.testing import FAMILIES, IMAGE_TOKEN, tiny_inputs, tiny_model


def _model(family, layers=4):
    model = tiny_model(family, llm_layers=layers)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("rows,with_mask", [((1,), False), ((1, 2), True)])
def test_pdrop_equals_stage_masked_reference(family, rows, with_mask):
    model = _model(family)
    inputs = tiny_inputs(model, family, images_per_row=rows, with_mask=with_mask)
    with vtprune.wrapped(model, "pdrop"):
        with torch.no_grad():
            logits = model(**inputs).logits
            stages = vtprune.record(model).exit.stages
            stats = vtprune.stats(model)
            tokens = model.generate(**inputs, max_new_tokens=6, do_sample=False)[:, inputs["input_ids"].shape[1]:]
            gen_stages = vtprune.record(model).exit.stages
    visual = (inputs["input_ids"] == IMAGE_TOKEN).sum(1)
    assert [k for k, _, _ in stages] == [1, 2, 3]  # the quarter points of 4 layers
    left = visual.clone()
    for s, (k, dropped, drop) in enumerate(stages, start=1):  # lambda = 0.5: 1/2, 1/4, 1/8 of the visual tokens
        keep = torch.clamp((visual.double() * 0.5 ** s + 0.5).floor().long(), min=1) * (visual > 0)
        assert dropped == (left - keep).tolist()
        assert bool((drop.sum(1).cpu() == left - keep).all())
        left = keep
    per_layer = stats["samples"][0]["visual_tokens_per_layer"]
    assert per_layer[0] == int(visual[0]) and per_layer[1:] == sorted(per_layer[1:], reverse=True)
    none = torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
    with staged_masks(model, stages):
        ref = masked_forward(model, inputs, none)
    torch.testing.assert_close(logits[:, -1], ref[:, -1], atol=1e-5, rtol=0)
    with staged_masks(model, gen_stages):
        assert torch.equal(tokens, masked_greedy(model, inputs, none, steps=6))


def test_pdrop_after_a_pre_llm_cut_and_options():
    model = _model("llava", layers=6)
    inputs = tiny_inputs(model, "llava", images_per_row=(1, 2))
    with vtprune.wrapped(model, ["fastervlm", "pdrop"], keep=0.5, layer_list=[2, 4], ratio=0.5):
        with torch.no_grad():
            model(**inputs)
        stats = vtprune.stats(model)
    assert [s["tokens_out"] for s in stats["samples"]] == [8, 16]
    assert stats["samples"][1]["visual_tokens_per_layer"] == [16, 16, 8, 8, 4, 4]
    assert stats["exit"]["visual_tokens_dropped"] == [6, 12]
    assert stats["exit"]["stages"] == [{"layer": 2, "visual_tokens_dropped": [4, 8]},
                                       {"layer": 4, "visual_tokens_dropped": [2, 4]}]
    for options, words in [({"ratio": 1.0}, "ratio"), ({"layer_list": [0, 2]}, r"\[0\]"), ({"layer": 2}, "layer_list"),
                           ({"layer_list": [9]}, "must lie in")]:
        with pytest.raises(ValueError, match=words):
            vtprune.wrap(model, "pdrop", **options)
        assert not vtprune.is_wrapped(model)
