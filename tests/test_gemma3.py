"""Gemma 3 specifics: image tokens that attend to each other both ways, and sliding windows that count the
tokens the language model holds (docs/families.md).

With a window shorter than the prompt, a cut sequence equals the stock model fed only the kept tokens at
their original positions (not the stock model with the dropped tokens masked, whose windows count them).
"""

import pytest
import torch
from reference import LayerMasked, drop_mask, kept_only, masked_forward, masked_greedy

import vtprune
from vtprune.testing import IMAGE_TOKEN, tiny_inputs, tiny_model

WINDOW = 12  # shorter than every prompt below (two images of 16 tokens)


def _model(window=WINDOW, family="gemma3"):
    model = tiny_model(family, sliding_window=window)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


@pytest.mark.parametrize("rows,with_mask", [((2,), False), ((1, 2), True)])
@pytest.mark.parametrize("method,keep", [("random", 0.5), ("divprune", 0.25)])
@pytest.mark.parametrize("family", ["gemma3", "gemma4"])  # (Gemma 4: with its per-layer inputs cut alike)
def test_sliding_window_counts_kept_tokens(rows, with_mask, method, keep, family):
    model = _model(family=family)
    inputs = tiny_inputs(model, family, images_per_row=rows, with_mask=with_mask)
    assert inputs["input_ids"].shape[1] > 2 * WINDOW
    with vtprune.wrapped(model, method, keep=keep):
        with torch.no_grad():
            logits = model(**inputs).logits
        kept = vtprune.last_kept(model)
        tokens = model.generate(**inputs, max_new_tokens=6, do_sample=False)[:, inputs["input_ids"].shape[1]:]
        kept_generate = vtprune.last_kept(model)
    ref_logits, _ = kept_only(model, inputs, kept, steps=0)
    torch.testing.assert_close(logits[:, -1], ref_logits[:, -1], atol=1e-5, rtol=0)
    assert torch.equal(tokens, kept_only(model, inputs, kept_generate)[1])
    # the masked reference counts the dropped tokens in its windows: a different model here
    masked = masked_forward(model, inputs, drop_mask(inputs["input_ids"], kept))
    assert (masked[:, -1] - logits[:, -1]).abs().max() > 1e-3


def test_keep_all_with_a_short_window_is_stock():
    model = _model()
    inputs = tiny_inputs(model, "gemma3", images_per_row=(1, 2))
    with torch.no_grad():
        stock = model(**inputs).logits
        stock_tokens = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        with vtprune.wrapped(model, "random", keep=1.0):
            assert torch.equal(model(**inputs).logits, stock)
            assert torch.equal(model.generate(**inputs, max_new_tokens=6, do_sample=False), stock_tokens)


def test_image_tokens_attend_both_ways_after_the_cut():
    """A kept image token sees the later kept tokens of its image: without the image blocks the first image
    token's output would not depend on the others."""
    model = _model(window=512)
    inputs = tiny_inputs(model, "gemma3", images_per_row=(1,), with_mask=False)
    first = int((inputs["input_ids"][0] == IMAGE_TOKEN).nonzero()[0])
    seen = {}
    handle = model.model.language_model.register_forward_hook(
        lambda m, a, k, out: seen.update(h=out.last_hidden_state), with_kwargs=True)
    with vtprune.wrapped(model, "uniform", keep=0.5):
        with torch.no_grad():
            model(**inputs)
            a = seen["h"][0, first].clone()
            changed = dict(inputs, pixel_values=inputs["pixel_values"].clone())
            changed["pixel_values"][..., 56:, :] += 1.0  # the lower half of the image: later tokens only
            model(**changed)
            b = seen["h"][0, first].clone()
        assert vtprune.last_kept(model)[0][0][0] == 0  # the first image token is kept
    handle.remove()
    assert (a - b).abs().max() > 1e-4


def test_exit_refuses_a_sequence_longer_than_the_window():
    model = _model()
    inputs = tiny_inputs(model, "gemma3", images_per_row=(2,), with_mask=False)
    with vtprune.wrapped(model, "fastv", layer=1, keep=0.5):
        with pytest.raises(ValueError, match="sliding window .12 tokens.*pre-LLM method"):
            with torch.no_grad():
                model(**inputs)
    with vtprune.wrapped(model, "fastv", layer=1, keep=0.5), torch.no_grad():  # within the window: it runs
        model(**tiny_inputs(model, "gemma3", images_per_row=(0,)))


def test_an_exit_gives_each_later_layer_type_its_own_inputs():
    """After an exit at layer 1 of a sliding/full/sliding/full model, every later layer gets the cut mask and
    rotary embeddings of its own type (Gemma's local and global RoPE differ): the released models mix five
    sliding layers to one full."""
    import transformers as tf

    from vtprune.testing import tiny_config

    config = tiny_config("gemma3")
    config.text_config.num_hidden_layers = 4
    config.text_config.layer_types = ["sliding_attention", "full_attention"] * 2
    torch.manual_seed(0)
    model = tf.Gemma3ForConditionalGeneration._from_config(config, attn_implementation="sdpa").eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=0.05)
    inputs = tiny_inputs(model, "gemma3", images_per_row=(1, 2))
    with vtprune.wrapped(model, "fastv", layer=1, keep=0.25):
        with torch.no_grad():
            logits = model(**inputs).logits
            drop = vtprune.record(model).exit.drop.clone()
            tokens = model.generate(**inputs, max_new_tokens=6, do_sample=False)[:, inputs["input_ids"].shape[1]:]
            drop_generate = vtprune.record(model).exit.drop.clone()
    none = torch.zeros_like(drop)
    with LayerMasked(model, 1, drop):
        ref = masked_forward(model, inputs, none)
    with LayerMasked(model, 1, drop_generate):
        ref_tokens = masked_greedy(model, inputs, none, steps=6)
    torch.testing.assert_close(logits[:, -1], ref[:, -1], atol=1e-5, rtol=0)
    assert torch.equal(tokens, ref_tokens)
