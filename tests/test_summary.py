"""Summary tokens and the size bias (``summary=``, ``size_bias=``) against an independent reference:
the stock language model (eager) fed the kept tokens and the summary tokens' features, with a 4-D
additive mask that masks the dropped tokens and adds log(size) to each weighted key's logit."""

import math

import pytest
import torch
from reference import BiasedReference, drop_mask, image_runs, staged_masks, video_counts

import vtprune
from vtprune.compat import enable_checkpointing
from vtprune.errors import NotApplicable
from vtprune.testing import FAMILIES, VIDEO_FAMILIES, tiny_inputs, tiny_model

ATOL = 1e-5


def _model(family, seed=0, attn="sdpa"):
    model = tiny_model(family, seed=seed, attn_implementation=attn)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def _expected(inputs, record, ref, feature="mean", joins=False, clips=()):
    """(drop, sizes, features) of the reference from the wrapped model's record: which tokens it kept,
    the groups its summary tokens stand for, the sizes it gave; the features are computed here
    (``clips``: each video's token count)."""
    drop = drop_mask(inputs["input_ids"], record.kept, clips)
    sizes, features = {}, {}
    for b, runs in enumerate(image_runs(inputs["input_ids"], clips)):
        for i, run in enumerate(runs):
            if record.sizes is not None:
                for idx, size in zip(record.kept[b][i].tolist(), record.sizes[b][i].tolist()):
                    if size != 1:
                        sizes[(b, int(run[idx]))] = size
            for pos, members in record.summaries[b][i]:
                assert pos in members.tolist() and pos in record.kept[b][i].tolist()
                if not joins:  # with size_bias, dropped tokens join the nearest kept or summary token instead
                    assert sizes.get((b, int(run[pos])), members.numel()) == members.numel()
                if feature == "mean":
                    features[(b, int(run[pos]))] = ref.embeds[b, run[members]].mean(0)
            if feature == "pool":  # LLaVA's 4 x 4 grid pooled to 2 x 2 windows at their top-left cells
                grid = ref.embeds[b, run].T.reshape(1, -1, 4, 4)
                pooled = torch.nn.functional.adaptive_avg_pool2d(grid, (2, 2))[0].reshape(grid.shape[1], -1).T
                for cell, pos in enumerate((0, 2, 8, 10)):
                    features[(b, int(run[pos]))] = pooled[cell]
    return drop, sizes, features


def _run(model, inputs, method, steps=6, **options):
    vtprune.wrap(model, method, **options)
    with torch.no_grad():
        logits = model(**inputs).logits
        record = vtprune.record(model)
        stats = vtprune.stats(model)
        tokens = model.generate(**inputs, max_new_tokens=steps, do_sample=False)[:, inputs["input_ids"].shape[1]:]
        generated = vtprune.record(model)
    vtprune.unwrap(model)
    return logits, record, stats, tokens, generated


def _merged_embeds(model, inputs, method, options):
    """The language model's full-length input of a run without the bias (VisionZip merges before the
    projector: the stock model never sees those features)."""
    seen = {}
    handle = model.model.language_model.register_forward_pre_hook(  # runs before the wrap's own hook
        lambda m, a, k: seen.update(embeds=k["inputs_embeds"].clone()), with_kwargs=True)
    with vtprune.wrapped(model, method, **{k: v for k, v in options.items() if k != "size_bias"}):
        with torch.no_grad():
            model(**inputs)
    handle.remove()
    return seen["embeds"]


def _check(model, inputs, method, feature="mean", **options):
    ref = BiasedReference(model, inputs)
    if method == "visionzip":
        ref.embeds = _merged_embeds(model, inputs, method, options)
    logits, record, stats, tokens, generated = _run(model, inputs, method, **options)
    joins = bool(options.get("summary")) and options.get("size_bias", False)
    clips = video_counts(model, inputs)
    drop, sizes, features = _expected(inputs, record, ref, feature, joins, clips)
    assert sizes, "the run weighed no token"
    torch.testing.assert_close(logits[:, -1], ref.logits(drop, sizes, features)[:, -1], atol=ATOL, rtol=0)
    drop, sizes, features = _expected(inputs, generated, ref, feature, joins, clips)
    assert torch.equal(tokens, ref.greedy(drop, sizes, features))
    return record, stats


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("rows,with_mask", [((1,), False), ((1, 2), True)])
def test_summary_equals_biased_reference(family, rows, with_mask):
    model = _model(family)
    inputs = tiny_inputs(model, family, images_per_row=rows, with_mask=with_mask)
    record, stats = _check(model, inputs, "fastervlm", keep=0.5, summary=1)
    assert stats["summary_tokens_out"] == sum(rows) > 0
    assert stats["size_bias"]["biased_calls"] >= 1
    for b, images in enumerate(record.summaries):
        for groups, kept, img in zip(images, record.kept[b], [i for i in stats["samples"][b]["images"]]):
            assert len(groups) == img["summary_tokens"] == 1
            assert kept.numel() == img["tokens_out"]


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
@pytest.mark.parametrize("options", [dict(summary=2), dict(summary=1, scope="frame"), dict(size_bias=True)])
def test_summary_and_size_bias_over_clips_equal_biased_reference(family, options):
    """Summary tokens stand for a clip's dropped tokens across its frames (or each frame's), weighted by
    log(size): a token seen in many frames merges into one; batch 2 left padded, an image beside clips."""
    model = _model(family)
    inputs = tiny_inputs(model, family, images_per_row=(1, 0), videos_per_row=(1, 2))
    record, stats = _check(model, inputs, "random", keep=0.5, **options)
    clips = [v for s in stats["samples"] for v in s.get("videos", [])]
    assert len(clips) == 3
    if options.get("summary"):
        frames = len(clips[0]["frames"]) if options.get("scope") == "frame" else 1
        assert all(v["summary_tokens"] == options["summary"] * frames for v in clips)


@pytest.mark.parametrize("family", ["llava", "qwen3_vl"])
def test_summary_on_eager_attention(family):
    model = _model(family, attn="eager")
    inputs = tiny_inputs(model, family, images_per_row=(1, 2))
    _, stats = _check(model, inputs, "divprune", keep=0.5, summary=2, size_bias=True)
    assert stats["summary_tokens_out"] == 6


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_5_vl"])
@pytest.mark.parametrize("options", [
    {"summary": 2, "summary_group": "space", "summary_feature": "medoid"},
    {"summary": 3, "summary_feature": "first"},
    {"summary": 2, "scope": "tile"},
    {"summary": 2, "size_bias": True},
])
def test_summary_variants_equal_biased_reference(family, options):
    model = _model(family, seed=1)
    inputs = tiny_inputs(model, family, images_per_row=(1, 2))
    record, _ = _check(model, inputs, "random", keep=0.5, seed=2, feature=options.get("summary_feature", "mean"),
                       **options)
    counts = [len(g) for row in record.summaries for g in row]
    assert max(counts) > 1 and max(counts) <= options["summary"] * (5 if options.get("scope") == "tile" else 1)


@pytest.mark.parametrize("family,method", [("llava", "uniform"), ("internvl", "divprune"), ("llava", "pool"),
                                           ("llava", "visionzip"), ("internvl", "visionzip")])
def test_size_bias_equals_biased_reference(family, method):
    """size_bias without summary tokens: pool windows, VisionZip's contextual tokens, nearest-feature
    assignment of the dropped tokens for the other selectors."""
    model = _model(family)
    inputs = tiny_inputs(model, family, images_per_row=(1, 2))
    keep, feature = (4, "pool") if method == "pool" else (0.5, None)
    record, _ = _check(model, inputs, method, keep=keep, size_bias=True, feature=feature)
    n_in = sum(n for _, n, _ in record.images)
    weight = sum(float(s.sum()) for row in record.sizes for s in row)
    if method in ("pool", "uniform", "divprune"):  # every token of the image is stood for exactly once
        assert weight == n_in
    else:
        assert n_in / 2 < weight <= n_in


def test_summary_without_bias_and_summary_zero():
    """``bias_layers=[]`` (a summary token without the bias) is the plain masked reference with the
    summary features; ``summary=0`` is today's pruning bit for bit, without routing the attention."""
    model = _model("llava")
    inputs = tiny_inputs(model, "llava", images_per_row=(1, 2))
    ref = BiasedReference(model, inputs)
    logits, record, stats, _, _ = _run(model, inputs, "fastervlm", keep=0.5, summary=2, bias_layers=[])
    drop, sizes, features = _expected(inputs, record, ref)
    assert record.sizes is None and sizes == {} and len(features) == 6 and "size_bias" not in stats
    torch.testing.assert_close(logits[:, -1], ref.logits(drop, {}, features)[:, -1], atol=ATOL, rtol=0)
    with torch.no_grad():
        stock = model(**inputs).logits
    with vtprune.wrapped(model, "fastervlm", keep=1.0, summary=2, size_bias=True):  # nothing dropped: drop-in
        assert model.config.get_text_config()._attn_implementation == "sdpa"
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, stock)
    plain = _run(model, inputs, "fastervlm", keep=0.5)
    with vtprune.wrapped(model, "fastervlm", keep=0.5, summary=0, size_bias=False):
        assert model.config.get_text_config()._attn_implementation == "sdpa"
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, plain[0])


def test_bias_decodes_with_static_cache_and_stays_in_the_cache():
    model = _model("llava")
    inputs = tiny_inputs(model, "llava", images_per_row=(1, 2))
    with vtprune.wrapped(model, "fastervlm", keep=0.25, summary=1):
        with torch.no_grad():
            dynamic = model.generate(**inputs, max_new_tokens=5, do_sample=False)
            static = model.generate(**inputs, max_new_tokens=5, do_sample=False, cache_implementation="static")
            out = model(**inputs, use_cache=True)
            state = vtprune.api._session(model).sequences.get(out.past_key_values)
    assert torch.equal(dynamic, static)
    assert state.bias.shape == (2, out.past_key_values.get_seq_length())
    assert math.isclose(float(state.bias.max()), math.log(13), rel_tol=1e-6)  # of 16 tokens 3 kept, 13 in the group


def test_summary_composes_with_zerotuning_and_sizes_the_budget():
    model = _model("qwen2_vl")
    inputs = tiny_inputs(model, "qwen2_vl", images_per_row=(1,))
    with vtprune.wrapped(model, ["fastervlm", "zerotuning"], keep=4, summary=1, gamma=0.5):
        with torch.no_grad():
            model(**inputs)
        stats = vtprune.stats(model)
    image = stats["samples"][0]["images"][0]
    assert image["tokens_out"] == 4 and image["summary_tokens"] == 1
    with vtprune.wrapped(model, "random", keep=1, summary=1):  # a budget of 1 leaves no room for a summary
        with torch.no_grad():
            model(**inputs)
        assert vtprune.stats(model)["summary_tokens_out"] == 0


@pytest.mark.parametrize("family", ["llava", "internvl", "qwen2_vl", "qwen3_vl"])
def test_size_bias_follows_an_in_llm_exit(family):
    """``fastervlm`` with summary tokens, then ``fastv`` at layer 1: layers >= 1 hold fewer keys; their biases
    follow that cut (reference: the biased stock model with the exit's tokens masked from layer 1 on)."""
    model = _model(family)
    inputs = tiny_inputs(model, family, images_per_row=(1, 2))
    ref = BiasedReference(model, inputs)
    options = {"keep": 0.5, "summary": 2, "size_bias": True, "fastv.layer": 1, "fastv.keep": 0.5}
    logits, record, stats, tokens, generated = _run(model, inputs, ["fastervlm", "fastv"], **options)
    assert stats["exit"]["layer"] == 1 and min(stats["exit"]["visual_tokens_dropped"]) > 0
    drop, sizes, features = _expected(inputs, record, ref, joins=True)
    with staged_masks(model, record.exit.stages, record.cut):
        expected = ref.logits(drop, sizes, features)
    torch.testing.assert_close(logits[:, -1], expected[:, -1], atol=ATOL, rtol=0)
    drop, sizes, features = _expected(inputs, generated, ref, joins=True)
    with staged_masks(model, generated.exit.stages, generated.cut):
        assert torch.equal(tokens, ref.greedy(drop, sizes, features))


def test_summary_errors_leave_the_model_as_it_was():
    model = _model("llava")
    cases = [
        (("pool",), {"summary": 1}, ValueError, "size_bias"),
        (("visionzip",), {"summary": 2}, ValueError, "nothing left"),
        (("fastervlm",), {"summary": -1}, ValueError, "summary must be an int"),
        (("fastervlm",), {"summary": 1.5}, ValueError, "summary must be an int"),
        (("random",), {"summary": 1, "summary_group": "kmeans"}, ValueError, "summary_group"),
        (("random",), {"summary": 1, "summary_feature": "max"}, ValueError, "summary_feature"),
        (("random",), {"size_bias": "yes"}, TypeError, "size_bias"),
        ((["random", "vhr"],), {"size_bias": True}, ValueError, "does not compose with vhr"),
        (("random",), {"summary": 1, "bias_layers": [7]}, NotApplicable, "layers"),
    ]
    for args, options, error, words in cases:
        with pytest.raises(error, match=words):
            vtprune.wrap(model, *args, **options)
        assert not vtprune.is_wrapped(model)
        assert model.config.get_text_config()._attn_implementation == "sdpa"
    model.config.get_text_config()._attn_implementation = "flash_attention_2"  # never runs: wrap refuses first
    with pytest.raises(NotApplicable, match="flash"):
        vtprune.wrap(model, "random", summary=1)
    assert not vtprune.is_wrapped(model)


def test_size_bias_follows_every_pdrop_stage():
    """Three stages on a 4-layer model: each stage's layers see the biases of the keys that reached it."""
    model = tiny_model("llava", llm_layers=4)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    inputs = tiny_inputs(model, "llava", images_per_row=(1, 2))
    ref = BiasedReference(model, inputs)
    logits, record, stats, tokens, generated = _run(model, inputs, ["fastervlm", "pdrop"], keep=0.75, summary=2,
                                                    size_bias=True)
    assert [k for k, _, _ in record.exit.stages] == [1, 2, 3]

    drop, sizes, features = _expected(inputs, record, ref, joins=True)
    with staged_masks(model, record.exit.stages, record.cut):
        expected = ref.logits(drop, sizes, features)
    torch.testing.assert_close(logits[:, -1], expected[:, -1], atol=ATOL, rtol=0)
    drop, sizes, features = _expected(inputs, generated, ref, joins=True)
    with staged_masks(model, generated.exit.stages, generated.cut):
        assert torch.equal(tokens, ref.greedy(drop, sizes, features))


def test_size_bias_under_gradient_checkpointing():
    """The backward pass recomputes the layers after the forward ended: the biases still apply (the
    gradients equal those of a run without checkpointing)."""
    grads = []
    for checkpoint in (False, True):
        model = tiny_model("llava")
        inputs = tiny_inputs(model, "llava", images_per_row=(1, 2))
        labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
        model.train()
        if checkpoint:
            enable_checkpointing(model)
        with vtprune.wrapped(model, "fastervlm", keep=0.5, summary=2, size_bias=True):
            model(**inputs, labels=labels).loss.backward()
        grads.append(model.lm_head.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_similarity_groups_are_never_empty():
    """k-means over tokens with repeated features (flat image regions) still gives k groups of m >= k tokens —
    an empty group takes the member that fits its own group worst — so that a served prompt's summary count
    is fixed before the image is encoded; a lattice (``"space"``) may leave cells empty."""
    from vtprune.layout import ImageLayout
    from vtprune.summary import by_space, by_similarity, summarise

    generator = torch.Generator().manual_seed(0)
    base = torch.randn(3, 8, generator=generator)
    features = base[torch.tensor([0] * 30 + [1] * 5 + [2] * 2)]  # three distinct features among 37 tokens
    for k in (2, 4, 6, 37):
        groups = by_similarity(features, k)
        assert torch.bincount(groups, minlength=k).min() >= 1 and int(groups.max()) == k - 1
    layout = ImageLayout.from_grids([(6, 6)])
    dropped = torch.arange(6)  # the first row only: most lattice cells get no token
    assert len(summarise(torch.randn(36, 8), layout, dropped, 4, "similarity", "mean")) == 4
    assert by_space(layout, dropped, 4).unique().numel() < 4
