"""Exactness of the pre-LLM cut on all six families, against references that do not use vtprune.

keep-all ≡ stock model; pruning ≡ stock model with the dropped image tokens masked out (positions
kept): last-position logits within fp32 tolerance and identical greedy tokens with a cache.
"""

import pytest
import torch
from reference import drop_mask, generated, greedy_model, manual_greedy, masked_forward, masked_greedy, masked_loss

import vtprune
from vtprune.testing import FAMILIES, tiny_inputs

ATOL = 1e-5
# (images per row, pass an attention mask): batch 1 without a mask (what generate passes for an
# unpadded prompt), batch 2 left padded with different image counts, and a text-only row.
LAYOUTS = [((1,), False), ((1, 2), True), ((0, 1), True)]


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("rows,with_mask", LAYOUTS)
def test_keep_all_is_stock(family, rows, with_mask):
    model = greedy_model(family)
    inputs = tiny_inputs(model, family, images_per_row=rows, with_mask=with_mask)
    stock_logits, stock_tokens = _logits(model, inputs), generated(model, inputs)
    with vtprune.wrapped(model, "random", keep=1.0):
        logits, tokens = _logits(model, inputs), generated(model, inputs)
        stats = vtprune.stats(model)
    torch.testing.assert_close(logits, stock_logits, atol=ATOL, rtol=0)
    assert torch.equal(tokens, stock_tokens)
    assert stats["visual_tokens_out"] == stats["visual_tokens_in"] > 0


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("rows,with_mask", LAYOUTS)
@pytest.mark.parametrize("method,keep", [("random", 0.5), ("uniform", 0.25), ("random", 3)])
def test_pruning_equals_masked_reference(family, rows, with_mask, method, keep):
    model = greedy_model(family)
    inputs = tiny_inputs(model, family, images_per_row=rows, with_mask=with_mask)
    vtprune.wrap(model, method, keep=keep)
    logits = _logits(model, inputs)
    kept_forward = vtprune.last_kept(model)
    stats = vtprune.stats(model)
    tokens = generated(model, inputs)
    kept_generate = vtprune.last_kept(model)
    vtprune.unwrap(model)

    assert stats["visual_tokens_out"] < stats["visual_tokens_in"]
    assert stats["llm_sequence_out"] < stats["llm_sequence_in"]
    ref = masked_forward(model, inputs, drop_mask(inputs["input_ids"], kept_forward))
    torch.testing.assert_close(logits[:, -1], ref[:, -1], atol=ATOL, rtol=0)
    ref_tokens = masked_greedy(model, inputs, drop_mask(inputs["input_ids"], kept_generate))
    assert torch.equal(tokens, ref_tokens)


@pytest.mark.parametrize("family", FAMILIES)
def test_manual_decode_without_positions(family):
    """A user loop that passes no position_ids: original positions continue after the cut."""
    model = greedy_model(family)
    inputs = tiny_inputs(model, family, images_per_row=(1,), with_mask=False)
    vtprune.wrap(model, "uniform", keep=0.5)
    tokens = manual_greedy(model, inputs, steps=6)
    kept = vtprune.last_kept(model)
    vtprune.unwrap(model)
    ref = masked_greedy(model, inputs, drop_mask(inputs["input_ids"], kept), steps=6, plain=True)
    assert torch.equal(tokens, ref)


@pytest.mark.parametrize("family", ["llava", "internvl", "qwen2_vl"])
def test_manual_decode_with_padding_mask(family):
    """Manual loop on a left-padded batch passing the original-length mask and explicit positions."""
    model = greedy_model(family)
    inputs = tiny_inputs(model, family, images_per_row=(1, 2))
    vtprune.wrap(model, "random", keep=0.5, seed=3)
    from reference import positions

    pos = positions(model, inputs, for_generate=True)
    mask = inputs["attention_mask"]
    tokens = []
    with torch.no_grad():
        out = model(**{**inputs, "position_ids": pos}, use_cache=True)
        for _ in range(6):
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(tok)
            mask = torch.cat([mask, torch.ones_like(tok)], 1)
            pos = pos[..., -1:] + 1
            out = model(input_ids=tok, attention_mask=mask, position_ids=pos,
                        past_key_values=out.past_key_values, use_cache=True)
    kept = vtprune.last_kept(model)
    vtprune.unwrap(model)
    ref = masked_greedy(model, inputs, drop_mask(inputs["input_ids"], kept), steps=6)
    assert torch.equal(torch.cat(tokens, 1), ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_labels_loss_matches_reference(family):
    model = greedy_model(family)
    inputs = tiny_inputs(model, family, images_per_row=(1, 2))
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, -3:] = inputs["input_ids"][:, -3:]
    stock = masked_loss(model, inputs, torch.zeros_like(labels, dtype=torch.bool), labels)
    with vtprune.wrapped(model, "random", keep=1.0):
        with torch.no_grad():
            assert torch.equal(model(**inputs, labels=labels).loss, stock)
    vtprune.wrap(model, "random", keep=0.5)
    with torch.no_grad():
        loss = model(**inputs, labels=labels).loss
    kept = vtprune.last_kept(model)
    vtprune.unwrap(model)
    ref = masked_loss(model, inputs, drop_mask(inputs["input_ids"], kept), labels)
    torch.testing.assert_close(loss, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_unwrap_restores_exactly(family):
    model = greedy_model(family)
    inputs = tiny_inputs(model, family, images_per_row=(1, 2))
    before = _logits(model, inputs)
    hooks_before = _hook_count(model)
    attrs_before = _instance_attrs(model)
    vtprune.wrap(model, "uniform", keep=0.25)
    assert _hook_count(model) > hooks_before
    assert _logits(model, inputs).shape[1] < before.shape[1]
    assert "get_image_features" in vars(model.model)
    vtprune.unwrap(model)
    assert _hook_count(model) == hooks_before
    assert _instance_attrs(model) == attrs_before
    assert torch.equal(_logits(model, inputs), before)
    assert torch.equal(generated(model, inputs), generated(greedy_model(family), inputs))


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               for m in model.modules())


def _instance_attrs(model):
    return {(name, key) for name, m in model.named_modules() for key in vars(m) if not key.startswith("_")
            and callable(vars(m)[key])}
