"""In-LLM exit (``exit``, ``fastv``) against the stock model with tokens masked from layer K on."""

import pytest
import torch
from reference import LayerMasked, always_exit_routers, drop_mask, greedy_model, masked_forward, masked_greedy

import vtprune
from vtprune.testing import FAMILIES, IMAGE_TOKEN, tiny_inputs, tiny_model

LAYOUTS = [((1,), False), ((1, 2), True), ((0, 1), True)]


def _assert_layer_masked(model, inputs, logits, tokens, drop, drop_gen, layer=1):
    """Logits and greedy tokens equal the stock model with ``drop`` masked from ``layer`` on."""
    none = torch.zeros_like(drop)
    with LayerMasked(model, layer, drop):
        ref = masked_forward(model, inputs, none)
    with LayerMasked(model, layer, drop_gen):
        ref_tokens = masked_greedy(model, inputs, none)
    torch.testing.assert_close(logits[:, -1], ref[:, -1], atol=1e-5, rtol=0)
    assert torch.equal(tokens, ref_tokens)


def _run(model, inputs, method, **options):
    vtprune.wrap(model, method, **options)
    with torch.no_grad():
        logits = model(**inputs).logits
        drop_forward = vtprune.record(model).exit.drop.clone()
        stats = vtprune.stats(model)
        tokens = model.generate(**inputs, max_new_tokens=8, do_sample=False)[:, inputs["input_ids"].shape[1]:]
        drop_generate = vtprune.record(model).exit.drop.clone()
    vtprune.unwrap(model)
    return logits, drop_forward, tokens, drop_generate, stats


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("rows,with_mask", LAYOUTS)
def test_exit_equals_layer_masked_reference(family, rows, with_mask):
    model = greedy_model(family)
    inputs = tiny_inputs(model, family, images_per_row=rows, with_mask=with_mask)
    logits, drop, tokens, _, stats = _run(model, inputs, "exit", layer=1)
    visual = inputs["input_ids"] == IMAGE_TOKEN
    assert torch.equal(drop, visual)
    assert stats["exit"]["visual_tokens_dropped"] == visual.sum(1).tolist()
    assert 0 < stats["exit"]["llm_flops_saved"] < 1
    _assert_layer_masked(model, inputs, logits, tokens, visual, visual)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("rows,with_mask", LAYOUTS[:2])
@pytest.mark.parametrize("query", ["last", "text"])
def test_fastv_equals_layer_masked_reference(family, rows, with_mask, query):
    model = greedy_model(family)
    inputs = tiny_inputs(model, family, images_per_row=rows, with_mask=with_mask)
    logits, drop, tokens, drop_gen, _ = _run(model, inputs, "fastv", layer=1, keep=0.25, query=query)
    visual = inputs["input_ids"] == IMAGE_TOKEN
    assert bool((drop <= visual).all()) and torch.equal(drop.sum(1), visual.sum(1) - (visual.sum(1) * 0.25 + 0.5).floor().long())
    _assert_layer_masked(model, inputs, logits, tokens, drop, drop_gen)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_fastv_scores_equal_eager_attention(family):
    """The kept tokens are the top visual tokens of layer K-1's eager attention, last row, head mean."""
    model = tiny_model(family)
    inputs = tiny_inputs(model, family, images_per_row=(1,))
    vtprune.wrap(model, "fastv", layer=1, keep=0.25)
    with torch.no_grad():
        model(**inputs)
    ours = vtprune.record(model).exit.scores[0]
    drop = vtprune.record(model).exit.drop[0]
    vtprune.unwrap(model)
    model.set_attn_implementation({"text_config": "eager"})
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    model.set_attn_implementation({"text_config": "sdpa"})
    attn = out.attentions[0][0, :, -1].mean(0)  # layer K-1 = 0, last query row, mean over heads
    torch.testing.assert_close(ours, attn, atol=1e-6, rtol=1e-5)
    visual = (inputs["input_ids"][0] == IMAGE_TOKEN)
    top = torch.sort(attn.masked_fill(~visual, -1), descending=True, stable=True).indices[:4]
    assert sorted((visual & ~drop).nonzero().squeeze(1).tolist()) == sorted(top.tolist())


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_kv_cache_is_short_from_layer_k(family):
    model = tiny_model(family)
    # 2 decoder layers: layer 0 keeps the full cache, layer 1 only the text
    inputs = tiny_inputs(model, family, images_per_row=(1, 2))
    visual = (inputs["input_ids"] == IMAGE_TOKEN).sum(1)
    with vtprune.wrapped(model, "exit", layer=1):
        with torch.no_grad():
            out = model(**inputs, use_cache=True)
    cache = out.past_key_values
    length = inputs["input_ids"].shape[1]
    assert cache.layers[0].keys.shape[-2] == length
    # the rows keep the same number of tokens: the row with fewer images is padded with masked slots
    assert cache.layers[1].keys.shape[-2] == length - int(visual.min())


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "internvl", "gemma3", "llava_onevision"])
@pytest.mark.parametrize("rows,with_mask", LAYOUTS[:2])
def test_exit_before_layer_0_is_masked_there_and_cut_from_layer_1(family, rows, with_mask):
    """A stage before layer 0 keeps layer 0's cache whole (the sequence's bookkeeping reads it): generate runs, and
    equals the stock model with the visual tokens masked from layer 0 on."""
    model = greedy_model(family)
    inputs = tiny_inputs(model, family, images_per_row=rows, with_mask=with_mask)
    logits, drop, tokens, _, stats = _run(model, inputs, "exit", layer=0)
    visual = inputs["input_ids"] == IMAGE_TOKEN
    assert torch.equal(drop, visual) and stats["samples"][-1]["visual_tokens_per_layer"][0] == 0
    _assert_layer_masked(model, inputs, logits, tokens, visual, visual, layer=0)


def test_compose_pre_llm_cut_and_exit():
    model = greedy_model("llava")
    inputs = tiny_inputs(model, "llava", images_per_row=(1, 2))
    vtprune.wrap(model, [vtprune.methods.get("uniform")(keep=0.5), vtprune.methods.get("fastv")(layer=1, keep=0.5)])
    with torch.no_grad():
        logits = model(**inputs).logits
    kept = vtprune.last_kept(model)
    record = vtprune.record(model)
    index, real = record.cut
    drop_in_cut = record.exit.drop
    stats = vtprune.stats(model)
    vtprune.unwrap(model)
    assert stats["visual_tokens_out"] == 24 and stats["exit"]["visual_tokens_dropped"] == [4, 8]
    # map the exit's drops back to the original sequence, then mask: pre-LLM drops everywhere,
    # fastv drops from layer 1 on
    pre_drop = drop_mask(inputs["input_ids"], kept)
    late = torch.zeros_like(pre_drop)
    for b in range(late.shape[0]):
        late[b, index[b][drop_in_cut[b] & real[b]]] = True
    with LayerMasked(model, 1, late):
        ref = masked_forward(model, inputs, pre_drop)
    torch.testing.assert_close(logits[:, -1], ref[:, -1], atol=1e-5, rtol=0)


def test_layer_errors_and_unwrap_restores_attention():
    model = tiny_model("llava")
    with pytest.raises(ValueError, match="layer=5"):
        vtprune.wrap(model, "exit", layer=5)
    with pytest.raises(ValueError, match="layer=0"):
        vtprune.wrap(model, "fastv", layer=0)
    with pytest.raises(ValueError, match="query"):
        vtprune.wrap(model, "fastv", query="all")
    with pytest.raises(ValueError, match="only one in-LLM"):
        vtprune.wrap(model, ["exit", "fastv"])
    assert not vtprune.is_wrapped(model)
    qwen3 = tiny_model("qwen3_vl")
    with pytest.raises(ValueError, match="too early"):
        vtprune.wrap(qwen3, "exit", layer=0)
    assert not vtprune.is_wrapped(qwen3)
    from transformers import AttentionInterface

    before = dict(AttentionInterface._global_mapping)
    vtprune.wrap(model, "fastv", layer=1)
    assert model.config.text_config._attn_implementation.startswith("vtprune_")
    vtprune.unwrap(model)
    assert model.config.text_config._attn_implementation == "sdpa"
    assert dict(AttentionInterface._global_mapping) == before




@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "internvl"])
def test_dyvte_that_always_exits_equals_exit(family, tmp_path):
    model = greedy_model(family)
    inputs = tiny_inputs(model, family, images_per_row=(1, 2))
    path = str(tmp_path / "routers.safetensors")
    always_exit_routers([0]).save(path)
    dyvte = _run(model, inputs, "dyvte", weights=path)
    fixed = _run(model, inputs, "exit", layer=1)
    torch.testing.assert_close(dyvte[0], fixed[0], atol=1e-6, rtol=0)
    assert torch.equal(dyvte[2], fixed[2])
    assert dyvte[4]["exit"]["layer"] == 1


def test_dyvte_rows_exit_at_different_layers():
    """Row 0 leaves after layer 0; row 1 never: row 0 is masked from layer 1 on, row 1 untouched."""
    from vtprune.methods import DyVTE

    class RowZeroOnly(DyVTE):
        def decide(self, runtime, j, hidden):
            return torch.tensor([True, False])

    model = greedy_model("llava")
    inputs = tiny_inputs(model, "llava", images_per_row=(1, 2))
    config = RowZeroOnly(weights=always_exit_routers([0]))
    vtprune.wrap(model, config)
    with torch.no_grad():
        logits = model(**inputs).logits
        tokens = model.generate(**inputs, max_new_tokens=8, do_sample=False)[:, inputs["input_ids"].shape[1]:]
        stats = vtprune.stats(model)
    vtprune.unwrap(model)
    assert stats["exit"]["exit_layers"] == [1, None]
    drop = (inputs["input_ids"] == IMAGE_TOKEN) & torch.tensor([[True], [False]])
    _assert_layer_masked(model, inputs, logits, tokens, drop, drop)


def test_dyvte_errors(tmp_path):
    model = tiny_model("llava")
    with pytest.raises(ValueError, match="weights"):
        vtprune.wrap(model, "dyvte")
    with pytest.raises(ValueError, match="not found"):
        vtprune.wrap(model, "dyvte", weights=str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="do not fit"):
        vtprune.wrap(model, "dyvte", weights=always_exit_routers([1]))
    with pytest.raises(ValueError, match="threshold"):
        vtprune.wrap(model, "dyvte", weights=always_exit_routers([0]), threshold=1.5)
    assert not vtprune.is_wrapped(model)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "internvl"])
def test_dart_equals_layer_masked_reference_and_keep_all_is_stock(family):
    model = greedy_model(family)
    inputs = tiny_inputs(model, family, images_per_row=(1, 2))
    with torch.no_grad():
        stock = model(**inputs).logits
    with vtprune.wrapped(model, "dart", layer=1, keep=1.0):
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, stock)
    logits, drop, tokens, drop_gen, stats = _run(model, inputs, "dart", layer=1, keep=0.5, pivot_image=2, pivot_text=2)
    visual = inputs["input_ids"] == IMAGE_TOKEN
    kept = (visual & ~drop).sum(1)
    assert bool((drop <= visual).all()) and torch.equal(kept, (visual.sum(1) * 0.5 + 0.5).floor().long())
    _assert_layer_masked(model, inputs, logits, tokens, drop, drop_gen)


class _KeysOfLayer:
    """Record layer ``j``'s keys (RoPE applied) from inside the stock attention: a registered
    attention function that stores them and calls plain SDPA."""

    name = "record_keys"

    def __init__(self, model, j):
        from transformers import AttentionInterface, AttentionMaskInterface
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.masking_utils import sdpa_mask

        self.model, self.j, self.keys = model, j, None

        def attention(module, query, key, value, attention_mask, **kwargs):
            if module.layer_idx == self.j:
                self.keys = key.detach()
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

        AttentionInterface.register(self.name, attention)
        AttentionMaskInterface.register(self.name, sdpa_mask)
        model.set_attn_implementation({"text_config": self.name})

    def close(self):
        from vtprune.attention import _unregister

        self.model.set_attn_implementation({"text_config": "sdpa"})
        _unregister(self.name)


def _dart_reference(model, inputs, layer, keep, pivot_image, pivot_text):
    """DART's selection written out from its definition (K-norm pivots, least-similar per pivot) on
    the stock model's layer ``layer - 1``: the bool [B, L] tokens that leave."""
    import math

    probe = _KeysOfLayer(model, layer - 1)
    try:
        with torch.no_grad():
            out = model(**inputs, output_hidden_states=True)
    finally:
        probe.close()
    with torch.no_grad():
        hidden = model.model.language_model.norm(out.hidden_states[layer]).float()
    hidden = hidden / hidden.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    key_l1 = probe.keys.float().abs().sum(-1).sum(1)  # [B, L]: L1 norm over every head's key
    visual = inputs["input_ids"] == IMAGE_TOKEN
    real = inputs.get("attention_mask", torch.ones_like(visual, dtype=torch.long)).bool()
    drop = visual.clone()
    for b in range(visual.shape[0]):
        vis = visual[b].nonzero().squeeze(1).tolist()
        if not vis:
            continue
        budget = max(1, min(len(vis), math.floor(keep * len(vis) + 0.5)))
        by_norm = sorted(vis, key=lambda t: -float(key_l1[b, t]))
        image_pivots = by_norm[:min(pivot_image, budget)]
        text = [t for t in range(visual.shape[1]) if real[b, t] and not visual[b, t] and t > max(vis)]
        text_pivots = sorted(text, key=lambda t: -float(key_l1[b, t]))[:pivot_text]
        pivots = image_pivots + text_pivots
        base, extra = divmod(budget - len(image_pivots), len(pivots))
        kept = set(image_pivots)
        for i, p in enumerate(pivots):
            rest = [t for t in vis if t not in kept]
            if not rest:
                break
            sims = {t: float(hidden[b, t] @ hidden[b, p]) for t in rest}
            kept.update(sorted(rest, key=lambda t: sims[t])[:base + (i < extra)])
        for t in kept:
            drop[b, t] = False
    return drop


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "internvl"])
@pytest.mark.parametrize("keep,pivots", [(0.5, (2, 2)), (0.25, (4, 4))])
def test_dart_selection_equals_an_independent_reimplementation(family, keep, pivots):
    model = greedy_model(family)
    inputs = tiny_inputs(model, family, images_per_row=(1, 2))
    expected = _dart_reference(model, inputs, 1, keep, *pivots)
    logits, drop, tokens, drop_gen, stats = _run(model, inputs, "dart", layer=1, keep=keep, pivot_image=pivots[0],
                                                  pivot_text=pivots[1])
    assert torch.equal(drop, expected)
