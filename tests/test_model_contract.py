"""A wrapped model still does what transformers' own model tests ask: save/load, generate, train."""

import pytest
import torch
from reference import drop_mask, positions

import vtprune
from vtprune.testing import FAMILIES, tiny_inputs, tiny_model


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_load_while_wrapped(family, tmp_path):
    import transformers as tf

    model = tiny_model(family)
    inputs = tiny_inputs(model, family)
    with torch.no_grad():
        stock = model(**inputs).logits
    vtprune.wrap(model, "random", keep=1.0)
    model.save_pretrained(tmp_path)
    vtprune.unwrap(model)
    loaded = getattr(tf, type(model).__name__).from_pretrained(tmp_path).eval()
    assert not vtprune.is_wrapped(loaded)
    assert set(loaded.state_dict()) == set(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, stock, atol=1e-6, rtol=0)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["llava", "llava_next", "internvl", "qwen2_vl", "qwen3_vl"])
def test_training_step_gradients(family):
    """keep=1 gives the stock gradients; pruning gives those of the masked reference."""
    model = tiny_model(family).train()
    inputs = tiny_inputs(model, family, images_per_row=(1, 2))
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, -3:] = inputs["input_ids"][:, -3:]

    model(**inputs, labels=labels).loss.backward()
    stock = _grads(model)
    model.zero_grad()
    with vtprune.wrapped(model, "random", keep=1.0):
        model(**inputs, labels=labels).loss.backward()
    same = _grads(model)
    model.zero_grad()
    assert stock.keys() == same.keys() and all(torch.equal(stock[k], same[k]) for k in stock)

    vtprune.wrap(model, "random", keep=0.5)
    loss = model(**inputs, labels=labels).loss
    loss.backward()
    kept = vtprune.last_kept(model)
    vtprune.unwrap(model)
    pruned = _grads(model)
    model.zero_grad()
    kw = dict(inputs, attention_mask=inputs["attention_mask"] * (~drop_mask(inputs["input_ids"], kept)).long())
    pos = positions(model, inputs, for_generate=False)
    if pos is not None:
        kw["position_ids"] = pos
    ref_loss = model(**kw, labels=labels).loss
    ref_loss.backward()
    ref = _grads(model)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=0)
    assert pruned.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(pruned[k], ref[k], atol=1e-5, rtol=1e-4, msg=k)


def test_generate_with_sampling_and_beams_runs():
    model = tiny_model("llava")
    inputs = tiny_inputs(model, "llava", images_per_row=(1, 1))
    with vtprune.wrapped(model, "uniform", keep=0.25):
        torch.manual_seed(0)
        out = model.generate(**inputs, max_new_tokens=4, do_sample=True, top_k=5, min_new_tokens=4)
        assert out.shape == (2, inputs["input_ids"].shape[1] + 4)
        beams = model.generate(**inputs, max_new_tokens=4, num_beams=2, min_new_tokens=4)
        assert beams.shape == (2, inputs["input_ids"].shape[1] + 4)
        kept = vtprune.last_kept(model)  # 2 samples x 2 beams; the beams of a sample share the selection
        assert len(kept) == 4 and all(len(k) == 1 for k in kept)
        assert torch.equal(kept[0][0], kept[1][0]) and torch.equal(kept[2][0], kept[3][0])
