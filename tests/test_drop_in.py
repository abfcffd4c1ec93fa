"""A wrapped model keeps the stock contract: what transformers' own model tests check, kept as ours.

Found by running transformers' model tests of the six families with every model wrapped at keep=1
(``scripts/hf_tests/run.py``): generate with dict outputs and without a cache, a static cache,
``inputs_embeds`` with a static cache, custom 4-D masks (and per-layer-type dicts of them),
``shift_labels``, ``get_image_features`` return types, ``torch.compile``, and video inputs.  Each
is checked at keep=1 against the stock model and, where tokens are cut, against the same wrap on
the default path (itself tested against the masked reference in ``test_exact``) or the reference.
"""

import pytest
import torch
import transformers
from reference import drop_mask, masked_greedy, masked_loss

import vtprune
from vtprune.testing import FAMILIES, IMAGE_TOKEN, VIDEO_TOKEN, tiny_inputs, tiny_model

ATOL = 1e-5
NO_IMAGE_TOKENS = [[IMAGE_TOKEN], [VIDEO_TOKEN]]  # a random model may sample them; without a cache they would
# be read as image placeholders at the next step (the stock model fails on them too)


def _model(family, attn="sdpa"):
    model = tiny_model(family, attn_implementation=attn)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def _generate(model, inputs, steps=4, **kwargs):
    torch.manual_seed(0)
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, **kwargs)


MODES = {
    "greedy": dict(do_sample=False),
    "sample": dict(do_sample=True, top_k=5),
    "beam": dict(do_sample=False, num_beams=2),
    "beam_sample": dict(do_sample=True, num_beams=2, top_k=5),
}
DICT = dict(return_dict_in_generate=True, output_scores=True, output_logits=True, output_hidden_states=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_dict_outputs_without_cache_at_keep_1(family):
    """Greedy, sampling, beams and beam sampling with every dict output, as transformers tests them
    (``use_cache=False``: each step scatters the prompt's image features again)."""
    model = _model(family, attn="eager")
    inputs = tiny_inputs(model, family, images_per_row=(1, 2))
    for name, mode in MODES.items():
        kw = dict(mode, **DICT, output_attentions=True, use_cache=False, bad_words_ids=NO_IMAGE_TOKENS)
        stock = _generate(model, inputs, **kw)
        with vtprune.wrapped(model, "random", keep=1.0):
            wrapped = _generate(model, inputs, **kw)
            assert vtprune.stats(model)["visual_tokens_out"] > 0
        assert type(wrapped) is type(stock), name
        assert torch.equal(wrapped.sequences, stock.sequences), name
        for a, b in zip(wrapped.scores, stock.scores):
            torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
        for a, b in zip(wrapped.logits, stock.logits):
            torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
        assert [len(s) for s in wrapped.hidden_states] == [len(s) for s in stock.hidden_states]
        assert [a.shape for a in wrapped.attentions[0]] == [b.shape for b in stock.attentions[0]]


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_generate_without_cache_equals_with_cache(family):
    """Pruning without a cache re-uses the prefill's selection at every step: the same tokens as the
    cached run, which equals the masked reference."""
    model = _model(family)
    inputs = tiny_inputs(model, family, images_per_row=(1, 2))
    prompt = inputs["input_ids"].shape[1]
    vtprune.wrap(model, "uniform", keep=0.5)
    cached = _generate(model, inputs, do_sample=False, bad_words_ids=NO_IMAGE_TOKENS)
    kept = vtprune.last_kept(model)
    uncached = _generate(model, inputs, do_sample=False, bad_words_ids=NO_IMAGE_TOKENS, use_cache=False, **DICT)
    assert torch.equal(uncached.sequences, cached)
    again = vtprune.last_kept(model)
    assert [len(r) for r in again] == [len(r) for r in kept]
    assert all(torch.equal(a, b) for ra, rb in zip(again, kept) for a, b in zip(ra, rb))
    vtprune.unwrap(model)
    ref = masked_greedy(model, inputs, drop_mask(inputs["input_ids"], kept), steps=4)
    if not torch.isin(ref, torch.tensor([IMAGE_TOKEN, VIDEO_TOKEN])).any():  # the reference may sample those
        assert torch.equal(cached[:, prompt:], ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_static_cache(family):
    model = _model(family)
    inputs = tiny_inputs(model, family, images_per_row=(1, 2))
    static = dict(do_sample=False, cache_implementation="static")
    stock = _generate(model, inputs, **static)
    with vtprune.wrapped(model, "random", keep=1.0):
        assert torch.equal(_generate(model, inputs, **static), stock)
    if not torch.equal(_generate(model, inputs, **static, num_beams=2), _generate(model, inputs, do_sample=False, num_beams=2)):
        pytest.skip(f"stock {family} beams differ with a static cache on transformers {transformers.__version__}")
    for method, options in [("uniform", dict(keep=0.5)), ("fastv", dict(layer=1, keep=0.5)),
                            (["uniform", "exit"], dict(keep=0.5, layer=1))]:
        with vtprune.wrapped(model, method, **options):
            dynamic = _generate(model, inputs, do_sample=False)
            assert torch.equal(_generate(model, inputs, **static), dynamic), method
            beams = _generate(model, inputs, do_sample=False, num_beams=2)
            assert torch.equal(_generate(model, inputs, **static, num_beams=2), beams), method


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_from_inputs_embeds_with_static_cache(family):
    model = _model(family)
    inputs = tiny_inputs(model, family, images_per_row=(1,), with_mask=False)
    inputs = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}
    ids = inputs.pop("input_ids")
    embeds = model.get_input_embeddings()(ids).detach()
    for cache in ({}, {"cache_implementation": "static"}):
        kw = {"inputs_embeds": embeds, **inputs}  # first: generate takes the batch size from the first input
        try:
            stock = _generate(model, kw, do_sample=False, **cache)
        except ValueError as refusal:  # Gemma 3's generate takes no inputs_embeds: wrapped, it refuses alike
            assert "inputs_embeds" in str(refusal)
            with vtprune.wrapped(model, "random", keep=1.0), pytest.raises(ValueError, match="inputs_embeds"):
                _generate(model, kw, do_sample=False, **cache)
            continue
        with vtprune.wrapped(model, "random", keep=1.0):
            assert torch.equal(_generate(model, kw, do_sample=False, **cache), stock)


def _mask_4d(mask2d, dtype):
    """The 4-D causal + padding mask of a 2-D padding mask: bool, or additive float."""
    n = mask2d.shape[1]
    allowed = torch.ones(n, n, dtype=torch.bool).tril()[None, None] & mask2d.bool()[:, None, None, :]
    allowed |= torch.eye(n, dtype=torch.bool)[None, None]  # padding rows attend to themselves
    if dtype == torch.bool:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


def _pos(mask2d):
    return (mask2d.long().cumsum(-1) - 1).clamp(min=0)


@pytest.mark.parametrize("family", ["llava", "llava_next", "internvl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
def test_custom_4d_mask(family, dtype):
    """A 4-D mask is passed through untouched at keep=1 and cut like the sequence when pruning:
    the same logits as the 2-D mask it encodes, and a decode step with an original-length 4-D mask."""
    model = _model(family)
    inputs = tiny_inputs(model, family, images_per_row=(1, 2))
    pad = inputs.pop("attention_mask")
    pos = _pos(pad)
    four = _mask_4d(pad, dtype)
    # per-layer-type dicts are accepted by text models with ``layer_types`` (InternVL's Qwen2), not by Llama
    layer_types = hasattr(model.config.get_text_config(), "layer_types")
    assert layer_types == (family == "internvl")
    with torch.no_grad():
        for mask in (four, {"full_attention": four}) if layer_types else (four,):
            stock = model(**inputs, attention_mask=mask, position_ids=pos).logits
            with vtprune.wrapped(model, "random", keep=1.0):
                torch.testing.assert_close(model(**inputs, attention_mask=mask, position_ids=pos).logits, stock,
                                           atol=0, rtol=0)
            with vtprune.wrapped(model, "uniform", keep=0.5):
                two = model(**inputs, attention_mask=pad, position_ids=pos, use_cache=True)
                out = model(**inputs, attention_mask=mask, position_ids=pos, use_cache=True)
                torch.testing.assert_close(out.logits[:, -1], two.logits[:, -1], atol=ATOL, rtol=0)
                assert out.logits.shape[1] < stock.shape[1]
                # next step, the two sequences interleaved: one token, masks over the original sequence
                # (2-D, and 4-D of the same width)
                tok = two.logits[:, -1].argmax(-1, keepdim=True)
                step_pad = torch.cat([pad, torch.ones_like(tok)], 1)
                step_four = _mask_4d(step_pad, dtype)[:, :, -1:]
                step_pos = pos[:, -1:] + 1
                a = model(input_ids=tok, attention_mask=step_pad, position_ids=step_pos,
                          past_key_values=two.past_key_values)
                b = model(input_ids=tok, attention_mask=step_four, position_ids=step_pos,
                          past_key_values=out.past_key_values)
                torch.testing.assert_close(b.logits, a.logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_custom_4d_mask_qwen(family):
    """Qwen: 3-D positions from the model; a float 4-D mask equals its 2-D mask, pruned or not."""
    model = _model(family)
    inputs = tiny_inputs(model, family, images_per_row=(1, 2))
    from reference import positions

    pad = inputs["attention_mask"]
    pos = positions(model, inputs, for_generate=False)
    kw = dict(inputs, position_ids=pos)
    with torch.no_grad():
        stock = model(**kw).logits
        with vtprune.wrapped(model, "random", keep=1.0):
            four = model(**dict(kw, attention_mask=_mask_4d(pad, torch.float32))).logits
            torch.testing.assert_close(four[pad.bool()], stock[pad.bool()], atol=ATOL, rtol=0)
        with vtprune.wrapped(model, "uniform", keep=0.5):
            two = model(**kw).logits
            four = model(**dict(kw, attention_mask=_mask_4d(pad, torch.float32))).logits
            torch.testing.assert_close(four[:, -1], two[:, -1], atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_shift_labels(family):
    """Pre-shifted targets are honoured: bitwise the stock loss at keep=1, the masked reference when pruning."""
    model = _model(family)
    inputs = tiny_inputs(model, family, images_per_row=(1, 2))
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, -3:] = inputs["input_ids"][:, -3:]
    shifted = torch.full_like(labels, -100)
    shifted[:, -4:-1] = inputs["input_ids"][:, -2:].flip(-1)[:, :1].expand(-1, 3)  # targets that are not labels[1:]
    with torch.no_grad():
        stock = model(**inputs, labels=labels, shift_labels=shifted).loss
        plain = model(**inputs, labels=labels).loss
        assert not torch.equal(stock, plain)  # the targets matter
        with vtprune.wrapped(model, "random", keep=1.0):
            assert torch.equal(model(**inputs, labels=labels, shift_labels=shifted).loss, stock)
            assert torch.equal(model(**inputs, labels=labels).loss, plain)
        vtprune.wrap(model, "uniform", keep=0.5)
        loss = model(**inputs, labels=labels, shift_labels=shifted).loss
        kept = vtprune.last_kept(model)
        vtprune.unwrap(model)
    drop = drop_mask(inputs["input_ids"], kept)
    ref = masked_loss(model, dict(inputs, shift_labels=shifted), drop, labels)
    torch.testing.assert_close(loss, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_get_image_features_keeps_its_return_type(family):
    model = _model(family)
    inputs = tiny_inputs(model, family)
    keys = {"pixel_values", "image_sizes", "image_grid_thw", "image_position_ids"}
    pix = {k: v for k, v in inputs.items() if k in keys}
    for return_dict in (True, False, None):
        kw = {} if return_dict is None else {"return_dict": return_dict}
        with torch.no_grad():
            stock = model.get_image_features(**pix, **kw)
            with vtprune.wrapped(model, "uniform", keep=0.5):
                wrapped = model.get_image_features(**pix, **kw)
                model(**inputs)  # a forward after a direct call still prunes
                assert vtprune.stats(model)["visual_tokens_out"] < vtprune.stats(model)["visual_tokens_in"]
        assert type(wrapped) is type(stock)
        first = stock[0] if isinstance(stock, tuple) else stock.last_hidden_state
        again = wrapped[0] if isinstance(wrapped, tuple) else wrapped.last_hidden_state
        assert torch.equal(first, again)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_video_inputs_at_keep_1_run_as_stock_and_are_pruned_otherwise(family):
    model = _model(family)
    inputs = tiny_inputs(model, family)
    ids = inputs["input_ids"].clone()
    ids[ids == IMAGE_TOKEN] = VIDEO_TOKEN
    video = {"input_ids": ids, "pixel_values_videos": inputs["pixel_values"],
             "video_grid_thw": inputs["image_grid_thw"], "mm_token_type_ids": (ids == VIDEO_TOKEN).int() * 2}
    with torch.no_grad():
        stock = model(**video).logits
        with vtprune.wrapped(model, "random", keep=1.0):
            assert torch.equal(model(**video).logits, stock)
        for method, options in (("uniform", {}), ("exit", {"layer": 1})):  # and a pruning wrap prunes them
            with vtprune.wrapped(model, method, **options):
                assert not torch.allclose(model(**video).logits[:, -1], stock[:, -1])
                stats = vtprune.stats(model)
            (clip,) = stats["samples"][0]["videos"]
            assert clip["tokens_out"] < clip["tokens_in"] if method == "uniform" else stats["exit"]["visual_tokens_dropped"]
        assert torch.equal(model(**video).logits, stock)


@pytest.mark.parametrize("family", FAMILIES)
def test_compile_at_keep_1_and_a_clear_error_when_pruning(family):
    """``torch.compile(fullgraph=True)`` of a decode step (what generate compiles) and, where the stock
    tower compiles, of the whole forward: the keep=1 hooks step aside; a pruning wrap says why it cannot."""
    model = _model(family)
    inputs = tiny_inputs(model, family, images_per_row=(1,), with_mask=False)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    whole = family in ("llava", "internvl")  # the other towers have data-dependent shapes, stock too

    def run(call):
        torch._dynamo.reset()
        with torch.no_grad():
            out = model(**inputs, use_cache=True)
            step = dict(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values)
            return call(**step).logits, (call(**inputs).logits if whole else None)

    stock = run(model)
    with vtprune.wrapped(model, "random", keep=1.0):
        wrapped = run(compiled)
    torch.testing.assert_close(wrapped[0], stock[0], atol=ATOL, rtol=0)
    if whole:
        torch.testing.assert_close(wrapped[1], stock[1], atol=ATOL, rtol=0)
    with vtprune.wrapped(model, "uniform", keep=0.5):
        with pytest.raises(Exception, match="torch.compile"):
            run(compiled)
    torch._dynamo.reset()


def test_generate_does_not_auto_compile_a_pruning_wrap():
    from transformers import GenerationConfig

    model = _model("llava")
    config = GenerationConfig(cache_implementation="static")
    kwargs = {"past_key_values": None}
    stock = model._valid_auto_compile_criteria(kwargs, config)
    with vtprune.wrapped(model, "random", keep=1.0):
        assert model._valid_auto_compile_criteria(kwargs, config) == stock
    with vtprune.wrapped(model, "uniform", keep=0.5):
        assert model._valid_auto_compile_criteria(kwargs, config) is False
    assert "_valid_auto_compile_criteria" not in vars(model)


@pytest.mark.parametrize("method,options", [("exit", dict(layer=1)), ("fastv", dict(layer=1, keep=0.5)),
                                            ("dart", dict(layer=1)), ("vhr", {}), ("zerotuning", {})])
def test_last_kept_and_per_layer_stats_for_every_stage(method, options):
    """Methods that keep every token before the LLM still answer ``last_kept`` (all of them), and
    ``stats`` says per sample how many visual tokens each decoder layer saw."""
    model = _model("llava")
    inputs = tiny_inputs(model, "llava", images_per_row=(1, 2))
    n_layers = len(model.model.language_model.layers)
    per_row = (inputs["input_ids"] == IMAGE_TOKEN).sum(1).tolist()
    with vtprune.wrapped(model, method, **options):
        _generate(model, inputs, do_sample=False)
        kept = vtprune.last_kept(model)
        stats = vtprune.stats(model)
    assert [sum(len(k) for k in row) for row in kept] == per_row
    assert stats["method"] == method and stats["methods"] == [method]
    layers = [s["visual_tokens_per_layer"] for s in stats["samples"]]
    assert all(len(counts) == n_layers and counts[0] == n for counts, n in zip(layers, per_row))
    if method in ("exit", "fastv", "dart"):
        assert all(counts[1] < counts[0] for counts in layers)
        assert stats["exit"]["method"] == method
        assert stats["llm_flops_saved"] > 0
    else:
        assert all(counts == [counts[0]] * n_layers for counts in layers)
        assert stats["llm_flops_saved"] == 0


def test_stats_name_every_method_and_count_the_pre_llm_cut():
    model = _model("llava")
    inputs = tiny_inputs(model, "llava", images_per_row=(1, 1))
    with vtprune.wrapped(model, ["uniform", "vhr"], keep=0.25):
        with torch.no_grad():
            model(**inputs)
        stats = vtprune.stats(model)
    assert stats["method"] == "uniform+vhr" and stats["methods"] == ["uniform", "vhr"]
    assert stats["vhr"]["method"] == "vhr"
    visual_in, visual_out = stats["visual_tokens_in"], stats["visual_tokens_out"]
    text = int(inputs["attention_mask"].sum()) - visual_in
    assert stats["llm_flops_saved"] == pytest.approx((visual_in - visual_out) / (visual_in + text))
    assert stats["totals"]["llm_flops_saved"] == pytest.approx(stats["llm_flops_saved"])
    with vtprune.wrapped(model, "var", sink_dims=[0, 1]):
        with torch.no_grad():
            model(**inputs)
        stats = vtprune.stats(model)
    assert stats["method"] == "var" and stats["var"]["method"] == "var"


@pytest.mark.parametrize("family", FAMILIES)
def test_deepcopy_of_a_wrapped_model_is_wrapped_alike(family):
    """``copy.deepcopy`` (transformers' tests copy models, so do EMA and distillation code): the copy
    prunes with its own hooks and tower; the original is unchanged."""
    import copy

    model = _model(family)
    inputs = tiny_inputs(model, family, images_per_row=(1, 2))
    method = "fastervlm" if family != "qwen2_vl" else "uniform"
    vtprune.wrap(model, method, keep=0.5)
    with torch.no_grad():
        before = model(**inputs).logits
        clone = copy.deepcopy(model)
        assert vtprune.is_wrapped(clone) and vtprune.is_wrapped(model)
        assert torch.equal(clone(**inputs).logits, before)
        assert vtprune.stats(clone)["totals"]["forwards"] == 1
        for p in clone.parameters():
            p.mul_(0.5)
        assert not torch.equal(clone(**inputs).logits, before)
        assert torch.equal(model(**inputs).logits, before)
    vtprune.unwrap(clone)
    vtprune.unwrap(model)
    assert not any(k in vars(clone) for k in ("__deepcopy__", "_vtprune_session"))


@pytest.mark.parametrize("family", ["llava", "llava_next", "internvl", "qwen2_vl"])
def test_assisted_decoding_while_pruning_equals_greedy(family):
    """Assisted decoding verifies candidates in one call and crops the rejected ones from the cache:
    the pruned cache's bookkeeping follows the crop, and the tokens equal plain greedy decoding."""
    model = _model(family)
    inputs = tiny_inputs(model, family, images_per_row=(1,), with_mask=False)
    other = _model(family)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))  # a different assistant: some candidates are rejected
    kw = dict(do_sample=False, max_new_tokens=6, min_new_tokens=6)
    vtprune.wrap(model, "uniform", keep=0.5)
    with torch.no_grad():
        greedy = model.generate(**inputs, **kw)
        for assistant in (model, other):
            assistant.generation_config.num_assistant_tokens = 2
            assistant.generation_config.num_assistant_tokens_schedule = "constant"
            assisted = model.generate(**inputs, **kw, assistant_model=assistant)
            assert torch.equal(assisted, greedy)
    vtprune.unwrap(model)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_right_padding_and_masked_positions_keep_their_place(family):
    """Only left padding leaves with the cut: masked positions after a row's first real token (right
    padding) stay, so the last position — the one generate reads — is the stock model's last position."""
    model = _model(family)
    inputs = tiny_inputs(model, family, images_per_row=(1, 1), text_lens=[3, 3])
    mask = inputs["attention_mask"].clone()
    mask[0, -2:] = 0  # row 0 right-padded by two
    inputs["attention_mask"] = mask
    from reference import positions

    pos = positions(model, inputs, for_generate=False)
    kw = dict(inputs, **({"position_ids": pos} if pos is not None else {}))
    with torch.no_grad():
        vtprune.wrap(model, "uniform", keep=0.5)
        pruned = model(**kw).logits
        kept = vtprune.last_kept(model)
        vtprune.unwrap(model)
        drop = drop_mask(inputs["input_ids"], kept)
        ref = model(**dict(kw, attention_mask=mask * (~drop).long())).logits
    assert pruned.shape[1] == inputs["input_ids"].shape[1] - int(drop[0].sum())
    torch.testing.assert_close(pruned[:, -1], ref[:, -1], atol=ATOL, rtol=0)
    torch.testing.assert_close(pruned[:, -3], ref[:, -3], atol=ATOL, rtol=0)


def test_labels_of_another_length_are_a_clear_error():
    model = _model("llava")
    inputs = tiny_inputs(model, "llava", images_per_row=(1,))
    with vtprune.wrapped(model, "uniform", keep=0.5):
        with torch.no_grad():
            logits = model(**inputs).logits
            with pytest.raises(ValueError, match="for the whole prompt"):
                model(**inputs, labels=torch.zeros(logits.shape[:2], dtype=torch.long))


@pytest.mark.parametrize("family,types", [("llava", True), ("llava_next", True), ("internvl", True), ("qwen2_vl", True),
                                          ("qwen3_vl", True), ("qwen2_vl", False), ("qwen3_vl", False)])
def test_generate_continues_from_a_pruned_cache(family, types):
    """A second ``generate`` given the whole conversation so far and the returned cache (multi-turn
    chat; the pixels are in the cache) feeds only what the cache does not hold: the same tokens as one
    longer generate, as for the stock model (transformers' test_generate_continue_from_past_key_values).
    Qwen without ``mm_token_type_ids`` (``types=False``): generate positions the continuation from the
    attention mask plus ``rope_deltas``, which must be the stock value there, not the one shifted for the
    shorter cache (found on transformers 5.17, which takes that path with the types too)."""
    model = _model(family)
    inputs = tiny_inputs(model, family, images_per_row=(1, 2))
    kw = dict(do_sample=False, bad_words_ids=NO_IMAGE_TOKENS)
    with vtprune.wrapped(model, "uniform", keep=0.5):
        with torch.no_grad():
            full = model.generate(**inputs, **kw, max_new_tokens=6, min_new_tokens=6)
            first = model.generate(**inputs, **kw, max_new_tokens=3, min_new_tokens=3, return_dict_in_generate=True)
            mask = torch.cat([inputs["attention_mask"], torch.ones_like(first.sequences[:, -3:])], 1)
            more = {k: v for k, v in inputs.items() if "pixel" not in k}  # the images are in the cache
            more.update(input_ids=first.sequences, attention_mask=mask)
            if "mm_token_type_ids" in more:
                more["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(
                    first.sequences[:, -3:], dtype=inputs["mm_token_type_ids"].dtype)], 1)
            if not types:
                del more["mm_token_type_ids"]
            second = model.generate(**more, **kw, past_key_values=first.past_key_values, max_new_tokens=3,
                                    min_new_tokens=3)
    assert torch.equal(second, full)


@pytest.mark.parametrize("family", FAMILIES)
def test_beams_with_tower_scores_and_summary_tokens(family):
    """Beam search expands the batch after the tower ran: every beam of a prompt keeps what the prompt's
    greedy run keeps ([CLS]/received scores and summary tokens mapped onto the copies); found by
    transformers' InternVL beam tests under a pruning wrap."""
    model = _model(family)
    inputs = tiny_inputs(model, family, images_per_row=(1, 1))
    with vtprune.wrapped(model, "fastervlm", keep=0.5, summary=1, size_bias=True):
        _generate(model, inputs, do_sample=False)
        greedy = vtprune.last_kept(model)
        out = _generate(model, inputs, do_sample=False, num_beams=2)
        beams = vtprune.last_kept(model)
    assert out.shape[0] == 2 and len(beams) == 4
    for b, row in enumerate(beams):
        assert [k.tolist() for k in row] == [k.tolist() for k in greedy[b // 2]]


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_to_keep_on_a_pruned_sequence(family):
    """``logits_to_keep=1`` (what ``generate`` asks) gives the stock model's one row on a pruned sequence too."""
    model = _model(family)
    inputs = tiny_inputs(model, family, images_per_row=(1, 2))
    with torch.no_grad():
        stock = model(**inputs, logits_to_keep=1).logits
        with vtprune.wrapped(model, "uniform", keep=0.5):
            pruned = model(**inputs, logits_to_keep=1).logits
            full = model(**inputs).logits
    assert pruned.shape == stock.shape == (2, 1, stock.shape[-1])
    torch.testing.assert_close(pruned[:, -1], full[:, -1], atol=ATOL, rtol=0)
