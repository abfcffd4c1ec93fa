"""Qwen3.5 (dense and MoE): its linear-attention layers read every token, so a cut sequence is checked against
the stock model fed only the kept tokens at their original positions (``reference.kept_only``), images and
videos, batch 1 without a mask and batch 2 left padded, with ``generate``'s cache."""

import pytest
import torch
from reference import drop_mask, greedy_model, kept_only, masked_forward, video_counts

import vtprune
from vtprune.errors import NotApplicable
from vtprune.runtime.session import ATTR
from vtprune.testing import KEPT_ONLY_FAMILIES, tiny_inputs

ATOL = 1e-5
LAYOUTS = [((1,), (0,), False), ((1, 2), (0, 1), True), ((0, 1), (1, 0), True)]  # images, videos per row; a mask


@pytest.mark.parametrize("family", KEPT_ONLY_FAMILIES)
@pytest.mark.parametrize("images,videos,with_mask", LAYOUTS)
def test_keep_all_is_stock(family, images, videos, with_mask):
    model = greedy_model(family)
    inputs = tiny_inputs(model, family, images_per_row=images, videos_per_row=videos, with_mask=with_mask)
    with torch.no_grad():
        stock = model(**inputs).logits
        stock_tokens = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        with vtprune.wrapped(model, "random", keep=1.0):
            torch.testing.assert_close(model(**inputs).logits, stock, atol=ATOL, rtol=0)
            assert torch.equal(model.generate(**inputs, max_new_tokens=6, do_sample=False), stock_tokens)


@pytest.mark.parametrize("family", KEPT_ONLY_FAMILIES)
@pytest.mark.parametrize("images,videos,with_mask", LAYOUTS)
@pytest.mark.parametrize("method,keep", [("random", 0.5), ("fastervlm", 0.25), ("divprune", 3)])
def test_pruning_equals_the_stock_model_fed_the_kept_tokens(family, images, videos, with_mask, method, keep):
    model = greedy_model(family)
    inputs = tiny_inputs(model, family, images_per_row=images, videos_per_row=videos, with_mask=with_mask)
    clips = video_counts(model, inputs)
    with vtprune.wrapped(model, method, keep=keep):
        with torch.no_grad():
            logits = model(**inputs).logits
        kept = vtprune.last_kept(model)
        stats = vtprune.stats(model)
        tokens = model.generate(**inputs, max_new_tokens=6, do_sample=False)[:, inputs["input_ids"].shape[1]:]
        kept_generate = vtprune.last_kept(model)
    assert stats["visual_tokens_out"] < stats["visual_tokens_in"]
    ref_logits, _ = kept_only(model, inputs, kept, steps=0, video_counts=clips)
    torch.testing.assert_close(logits[:, -1], ref_logits[:, -1], atol=ATOL, rtol=0)
    assert torch.equal(tokens, kept_only(model, inputs, kept_generate, video_counts=clips)[1])


def test_the_masked_reference_differs_here():
    """Why the reference above: masking a token out of attention leaves it in the linear layers' state."""
    model = greedy_model("qwen3_5")
    inputs = tiny_inputs(model, "qwen3_5", images_per_row=(1,), with_mask=False)
    with vtprune.wrapped(model, "uniform", keep=0.25), torch.no_grad():
        logits = model(**inputs).logits
        kept = vtprune.last_kept(model)
    masked = masked_forward(model, inputs, drop_mask(inputs["input_ids"], kept))
    assert (masked[:, -1] - logits[:, -1]).abs().max() > 1e-4


@pytest.mark.parametrize("method", ["fastv", "pdrop", "sparsevlm"])
def test_in_llm_exits_are_refused_before_anything_changes(method):
    model = greedy_model("qwen3_5")
    with pytest.raises(NotApplicable, match="linear-attention layers carry every token"):
        vtprune.wrap(model, method)
    assert not vtprune.is_wrapped(model)


def test_attention_interventions_act_on_the_attention_layers_only():
    model = greedy_model("qwen3_5")  # layer 0 linear attention, layer 1 full attention
    with pytest.raises(ValueError, match=r"layers \[0\] have no attention heads .*choose among \[1\]"):
        vtprune.wrap(model, "vhr", layers=[0, 1])
    assert not vtprune.is_wrapped(model)
    inputs = tiny_inputs(model, "qwen3_5", images_per_row=(1,))
    with vtprune.wrapped(model, "zerotuning"), torch.no_grad():  # every layer by default: the attending ones
        assert getattr(model, ATTR).attention.layer_ids == [1]
        model(**inputs)
