"""Gemma 4 specifics (docs/families.md): images at their own aspect ratio padded to a patch budget, pooled k x k in
the tower; per-layer input embeddings; image blocks on the sliding layers only; the smaller models' shared keys
and values; the larger ones' mixture of experts and keys standing in for values.

The generic tests (``vtprune.testing.FAMILIES``) run the default tiny model (a sliding and a full layer,
per-layer inputs, image blocks); here are the variants and what only Gemma 4 has.
"""

import pytest
import torch
from reference import LayerMasked, drop_mask, masked_forward, masked_greedy

import vtprune
from vtprune.errors import NotApplicable
from vtprune.testing import IMAGE_TOKEN, tiny_config, tiny_inputs, tiny_model

ATOL = 1e-5
# non-square images, one padded: 16 x 16 pixels of 4 x 4 patches would be (4, 4); (4, 6) and (6, 4) leave
# 40 of the 64 patch slots to padding
SPECS = [(8, 8), (4, 6), (6, 4)]
VARIANTS = {
    # E2B/E4B-like: six layers, the last two reuse the keys and values of layers 2 (sliding) and 3 (full)
    "shared_kv": dict(num_hidden_layers=6, num_kv_shared_layers=2),
    # 31B-like: no per-layer inputs, full layers' keys stand in for their values, one global KV head
    "k_eq_v": dict(hidden_size_per_layer_input=0, attention_k_eq_v=True, num_global_key_value_heads=1),
    # 26B-A4B-like: a mixture of experts beside each MLP, causal image tokens
    "moe": dict(hidden_size_per_layer_input=0, enable_moe_block=True, num_experts=4, top_k_experts=2,
                moe_intermediate_size=16, use_bidirectional_attention=None),
    # mixed layer types after an exit: full, sliding, full, sliding, full
    "five_layers": dict(num_hidden_layers=5),
}


def _model(**text):
    import transformers as tf

    torch.manual_seed(0)
    model = tf.Gemma4ForConditionalGeneration._from_config(tiny_config("gemma4", **text), attn_implementation="sdpa")
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def _inputs(model, rows, with_mask):
    specs = (SPECS * 2)[:sum(rows)]
    return tiny_inputs(model, "gemma4", images_per_row=rows, image_specs=specs, with_mask=with_mask)


def _check_cut(model, inputs, method, **options):
    with vtprune.wrapped(model, method, **options):
        with torch.no_grad():
            logits = model(**inputs).logits
            kept = vtprune.last_kept(model)
            tokens = model.generate(**inputs, max_new_tokens=6, do_sample=False)[:, inputs["input_ids"].shape[1]:]
            kept_generate = vtprune.last_kept(model)
    ref = masked_forward(model, inputs, drop_mask(inputs["input_ids"], kept))
    torch.testing.assert_close(logits[:, -1], ref[:, -1], atol=ATOL, rtol=0)
    assert torch.equal(tokens, masked_greedy(model, inputs, drop_mask(inputs["input_ids"], kept_generate), steps=6))
    assert any(len(k) < n for row, counts in zip(kept, _counts(inputs)) for k, n in zip(row, counts))


def _counts(inputs):
    from reference import image_runs

    return [[run.numel() for run in row] for row in image_runs(inputs["input_ids"])]


def _check_exit(model, inputs, layer, **options):
    with vtprune.wrapped(model, "fastv", layer=layer, keep=0.25, **options):
        with torch.no_grad():
            logits = model(**inputs).logits
            drop = vtprune.record(model).exit.drop.clone()
            tokens = model.generate(**inputs, max_new_tokens=6, do_sample=False)[:, inputs["input_ids"].shape[1]:]
            drop_generate = vtprune.record(model).exit.drop.clone()
    assert bool(drop.any())
    none = torch.zeros_like(drop)
    with LayerMasked(model, layer, drop):
        ref = masked_forward(model, inputs, none)
    with LayerMasked(model, layer, drop_generate):
        ref_tokens = masked_greedy(model, inputs, none, steps=6)
    torch.testing.assert_close(logits[:, -1], ref[:, -1], atol=ATOL, rtol=0)
    assert torch.equal(tokens, ref_tokens)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("rows,with_mask", [((1,), False), ((1, 2), True)])
def test_variants_prune_exactly(variant, rows, with_mask):
    model = _model(**VARIANTS[variant])
    inputs = _inputs(model, rows, with_mask)
    with torch.no_grad():
        stock = model(**inputs).logits
        with vtprune.wrapped(model, "random", keep=1.0):
            assert torch.equal(model(**inputs).logits, stock)
    _check_cut(model, inputs, "divprune", keep=0.25)
    _check_cut(model, inputs, "fastervlm", keep=0.5)


@pytest.mark.parametrize("variant,layer", [("shared_kv", 1), ("shared_kv", 2), ("five_layers", 1), ("five_layers", 2)])
@pytest.mark.parametrize("rows,with_mask", [((1,), False), ((1, 2), True)])
def test_exits_across_layer_types_and_shared_keys(variant, layer, rows, with_mask):
    """After an exit the later layers get the cut mask and rotary embeddings of their own type (sliding layers
    attend within image blocks, full ones do not; their RoPE differs), and layers that reuse earlier keys get
    them cut alike; ``generate`` runs the shared layers on the prompt's last row only."""
    model = _model(**VARIANTS[variant])
    _check_exit(model, _inputs(model, rows, with_mask), layer)


def test_an_exit_after_a_layer_whose_keys_are_shared_is_refused():
    model = _model(**VARIANTS["shared_kv"])
    with pytest.raises(NotApplicable, match="layer 3, too late for gemma4.*layer 2 or earlier"):
        vtprune.wrap(model, "fastv", layer=3, keep=0.25)
    with pytest.raises(NotApplicable, match="too late"):
        vtprune.wrap(model, "pdrop", layer_list=[1, 4])
    assert not vtprune.is_wrapped(model)
    _check_exit(model, _inputs(model, (1, 2), True), 2)  # the model is as it was


def test_tokens_pool_the_patches_their_layout_names():
    """Each token is the mean of the tower outputs of the patches ``layout.source`` names (times sqrt(width),
    the pooler's scale), for square, wide, tall and padded images; a layout that swapped x and y fails."""
    from vtprune.patches.gemma4 import pooled_layout

    model = tiny_model("gemma4")
    inputs = _inputs(model, (3,), True)
    seen = {}
    hooks = [model.model.vision_tower.encoder.register_forward_hook(lambda m, a, out: seen.update(tower=out[0])),
             model.model.vision_tower.pooler.register_forward_hook(lambda m, a, out: seen.update(pooled=out[0]))]
    with torch.no_grad():
        model.model.get_image_features(inputs["pixel_values"], inputs["image_position_ids"])
    for h in hooks:
        h.remove()
    width = seen["tower"].shape[-1]
    for i, (h, w) in enumerate(SPECS):
        n = h * w // 4
        layout = pooled_layout(inputs["image_position_ids"][i], 2, n)
        assert layout.shapes == [(h // 2, w // 2)]
        mean = seen["tower"][i, layout.source].mean(1) * width**0.5
        torch.testing.assert_close(seen["pooled"][i, :n], mean, atol=1e-5, rtol=1e-5)
        swapped = pooled_layout(inputs["image_position_ids"][i].flip(-1), 2, n)
        if h != w:
            assert swapped.source is None or not torch.allclose(seen["tower"][i, swapped.source].mean(1) * width**0.5,
                                                               seen["pooled"][i, :n], atol=1e-3)


def test_received_score_is_the_attention_real_patches_receive():
    """No [CLS]: a token's score sums the attention its 2 x 2 patches receive in the tower's last layer (eager,
    heads and the image's real patches as queries averaged; padding patches neither give nor receive)."""
    eager = tiny_model("gemma4", attn_implementation="eager")
    inputs = _inputs(eager, (3,), True)
    with torch.no_grad():
        attn = eager.model.vision_tower(pixel_values=inputs["pixel_values"], pixel_position_ids=inputs["image_position_ids"],
                                        output_attentions=True).attentions[-1]
    model = tiny_model("gemma4")
    with vtprune.wrapped(model, "fastervlm", keep=0.5):
        with torch.no_grad():
            model(**inputs)
        ours = vtprune.record(model).scores  # per image
    from vtprune.patches.gemma4 import pooled_layout

    for i, (h, w) in enumerate(SPECS):
        valid = (inputs["image_position_ids"][i] >= 0).all(-1)
        per_patch = torch.zeros(valid.numel())
        per_patch[valid] = attn[i][:, valid][:, :, valid].mean(0).mean(0)
        layout = pooled_layout(inputs["image_position_ids"][i], 2, h * w // 4)
        torch.testing.assert_close(ours[i], per_patch[layout.source].sum(1), atol=1e-6, rtol=1e-5)


def test_a_generated_image_token_is_text():
    """Gemma 4 finds image tokens before it encodes: a decode step whose token equals the image token is not an
    image (the stock model scatters nothing there either)."""
    model = tiny_model("gemma4")
    inputs = _inputs(model, (1,), False)
    with vtprune.wrapped(model, "random", keep=0.5), torch.no_grad():
        out = model(**inputs, use_cache=True)
        step = model(input_ids=torch.tensor([[IMAGE_TOKEN]]), past_key_values=out.past_key_values, use_cache=True)
        assert torch.isfinite(step.logits).all()
        assert vtprune.stats(model)["totals"]["forwards"] == 1



def test_kv_bytes_count_the_layers_that_store_keys():
    """A pre-LLM cut saves each dropped token's keys and values in every layer that stores its own: in the E2B-like
    model layers 4 and 5 reuse those of layers 2 and 3 and store none; full layers are 16 wide, sliding ones 8."""
    model = _model(**VARIANTS["shared_kv"])
    inputs = _inputs(model, (1,), False)
    with vtprune.wrapped(model, "uniform", keep=0.5), torch.no_grad():
        model(**inputs)
        stats = vtprune.stats(model)
    per_token = 2 * 2 * (8 + 16 + 8 + 16) * 4  # keys and values x 2 KV heads x the 4 storing layers' widths x fp32
    assert stats["kv_bytes_saved"] == per_token * (stats["llm_sequence_in"] - stats["llm_sequence_out"])
