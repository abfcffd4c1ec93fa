"""DyCoke's two stages against references that do not use vtprune: its temporal token merging (``dycoke``) on
the stock model's clip features, and its decode-time KV pruning (``pdkv``) against the stock model run without
a cache, each decode step's query row blocked from the visual tokens its step did not choose in the layers
from ``layer`` on, the choice made from that step's eager attention in layer ``layer - 1``."""

import pytest
import torch
import torch.nn.functional as F
from reference import drop_mask, greedy_model, masked_forward, positions, video_counts

import vtprune
from vtprune.testing import IMAGE_TOKEN, VIDEO_TOKEN, tiny_inputs, tiny_model


def _clip_features(model, inputs):
    with torch.no_grad():
        extra = (inputs["video_grid_thw"],) if "video_grid_thw" in inputs else ()
        return model.model.get_video_features(inputs["pixel_values_videos"], *extra).pooler_output[0]


def ttm_reference(features, t, n, keep):
    """Kept token indices: slice f with f % 4 == 0 (a window's first) whole; f % 4 in (1, 2) the int(keep n)
    tokens least similar to slice f - f % 4; f % 4 == 3 those least similar to slice f - 1."""
    x = features.float().view(t, n, -1)
    kept = []
    for f in range(t):
        r = f % 4
        if r == 0:
            kept += [f * n + i for i in range(n)]
            continue
        ref = f - r if r in (1, 2) else f - 1
        sims = [float(F.cosine_similarity(x[f, i], x[ref, i], dim=0)) for i in range(n)]
        order = sorted(range(n), key=lambda i: (sims[i], i))
        kept += [f * n + i for i in order[:int(n * keep)]]
    return sorted(kept)


@pytest.mark.parametrize("family,spec,n", [("qwen2_vl", (7, 4, 6), 6), ("qwen3_vl", (8, 4, 6), 6),
                                           ("llava_next_video", 9, 4)])
@pytest.mark.parametrize("keep", [0.3, 0.5])
def test_ttm_keeps_the_tokens_least_like_their_window_reference(family, spec, n, keep):
    model = greedy_model(family)
    inputs = tiny_inputs(model, family, images_per_row=(1, 0), videos_per_row=(1, 1), video_specs=[spec, spec])
    t = spec if isinstance(spec, int) else spec[0]
    features = _clip_features(model, inputs)
    vtprune.wrap(model, "dycoke", keep=keep)
    with torch.no_grad():
        logits = model(**inputs).logits
    kept = vtprune.last_kept(model)
    vtprune.unwrap(model)
    assert kept[0][0].numel() == 16 if family != "llava_next_video" else True  # an image is one slice: whole
    assert kept[0][1].tolist() == ttm_reference(features, t, n, keep)
    ref = masked_forward(model, inputs, drop_mask(inputs["input_ids"], kept, video_counts(model, inputs)))
    torch.testing.assert_close(logits[:, -1], ref[:, -1], atol=1e-5, rtol=0)


class RowMasks:
    """Pre-hooks on the decoder layers from ``k`` on: query row ``r`` of batch row ``b`` is blocked from the
    keys in ``blocked[r][b]`` (bool over the prompt's positions)."""

    def __init__(self, model, k):
        self.layers = model.model.language_model.layers[k:]
        self.blocked = {}

    def __enter__(self):
        self.handles = [layer.register_forward_pre_hook(self._hook, with_kwargs=True) for layer in self.layers]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()

    def _hook(self, module, args, kwargs):
        mask = kwargs["attention_mask"]
        mask = mask.clone() if mask.shape[0] > 1 else mask.expand(len(next(iter(self.blocked.values()))), -1, -1, -1).clone()
        low = torch.finfo(mask.dtype).min
        for row, per_batch in self.blocked.items():
            for b, cols in enumerate(per_batch):
                mask[b, :, row, :cols.numel()] = mask[b, :, row, :cols.numel()].masked_fill(cols, low)
        kwargs["attention_mask"] = mask
        return args, kwargs


def pdkv_reference(model, inputs, layer, keep, steps, threshold=0.9, similar="reuse"):
    """Greedy tokens and each step's last logits of the stock model (eager, no cache) with DyCoke's decode-time
    choice, step by step."""
    model.set_attn_implementation("eager")
    ids, pad = inputs["input_ids"], inputs["attention_mask"]
    visual = (ids == IMAGE_TOKEN) | (ids == VIDEO_TOKEN)
    pos = positions(model, inputs, for_generate=True)
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    tokens, logits, previous, chosen = [], [], None, None
    with torch.no_grad(), RowMasks(model, layer) as rows:
        def run(seq, mask, p):
            return model(input_ids=seq, attention_mask=mask, position_ids=p, output_attentions=True, **extra)

        seq, mask, p = ids, pad, pos
        for step in range(steps):
            out = run(seq, mask, p)
            if step:  # a decode step: its row's choice from layer - 1, then the step again with it
                probs = out.attentions[layer - 1][:, :, -1, :ids.shape[1]].float().mean(1) * visual
                moved = [True] * ids.shape[0] if previous is None else \
                    (F.cosine_similarity(probs, previous, dim=-1) < threshold).tolist()
                previous = probs
                new = visual.clone() if chosen is None or similar == "full" else chosen.clone()
                for b, m in enumerate(moved):
                    if m:
                        top = torch.sort(probs[b].masked_fill(~visual[b], -1.0), descending=True, stable=True).indices
                        new[b] = False
                        new[b, top[:int(int(visual[b].sum()) * keep)]] = True
                chosen = new
                rows.blocked[seq.shape[1] - 1] = visual & ~chosen
                out = run(seq, mask, p)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(tok)
            logits.append(out.logits[:, -1])
            seq = torch.cat([seq, tok], 1)
            mask = torch.cat([mask, torch.ones_like(tok)], 1)
            p = torch.cat([p, p[..., -1:] + 1], -1)
    model.set_attn_implementation("sdpa")
    return torch.cat(tokens, 1), logits


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_next_video"])
@pytest.mark.parametrize("options", [dict(), dict(similar="full", keep=0.5), dict(threshold=1.1, layer=2)])
def test_pdkv_equals_the_stock_model_blocked_from_the_unchosen_visual_tokens(family, options):
    model = tiny_model(family, llm_layers=4)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    spec = 6 if family == "llava_next_video" else (6, 4, 6)
    inputs = tiny_inputs(model, family, images_per_row=(1, 0), videos_per_row=(1, 1), video_specs=[spec, spec])
    kw = dict(max_new_tokens=7, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        stock = model.generate(**inputs, **kw).logits
    with vtprune.wrapped(model, "pdkv", **options):
        with torch.no_grad():
            out = model.generate(**inputs, **kw)
        stats = vtprune.stats(model)["pdkv"]
    method = vtprune.methods.get("pdkv")(**options)
    ref, ref_logits = pdkv_reference(model, inputs, stats["layer"], method.keep, 7, method.threshold, method.similar)
    assert torch.equal(out.sequences[:, inputs["input_ids"].shape[1]:], ref)
    for ours, theirs, plain in zip(out.logits, ref_logits, stock):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert max(float((a - b).abs().max()) for a, b in zip(out.logits, stock)) > 1e-3  # the blocked keys mattered
    assert stats["decode_steps"] == 6 and stats["choices"] >= 2
    if options.get("threshold", 0.9) > 1:  # every step re-chooses
        assert stats["choices"] == 12


def test_pdkv_errors_leave_the_model_unwrapped():
    model = tiny_model("qwen2_vl")
    for options, match in ((dict(layer=0), "layer"), (dict(keep=2), "keep"), (dict(similar="x"), "similar"),
                           (dict(layer=2), "must lie in")):  # the tiny model has 2 decoder layers
        with pytest.raises((ValueError, vtprune.NotApplicable), match=match):
            vtprune.wrap(model, "pdkv", **options)
        assert not vtprune.is_wrapped(model)


def test_dycoke_with_pdkv_decodes_alike_on_a_static_cache():
    """The published pair: the pre-LLM merging and the decode-time choice, on a dynamic and a static cache."""
    model = tiny_model("qwen2_vl", llm_layers=4)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    inputs = tiny_inputs(model, "qwen2_vl", images_per_row=(1, 0), videos_per_row=(1, 1))
    outs = []
    for cache in ({}, {"cache_implementation": "static"}):
        with vtprune.wrapped(model, ["dycoke", "pdkv"]):
            with torch.no_grad():
                outs.append(model.generate(**inputs, max_new_tokens=6, do_sample=False, output_logits=True,
                                           return_dict_in_generate=True, **cache))
            stats = vtprune.stats(model)
        assert stats["visual_tokens_out"] < stats["visual_tokens_in"] and stats["pdkv"]["decode_steps"] == 5
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    for a, b in zip(outs[0].logits, outs[1].logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_pdkv_follows_beam_search():
    """Beam search reorders the cache's rows at every step; pdkv's per-row state (the last step's attention,
    the chosen tokens) follows: each returned beam scores as that sequence decoded alone with pdkv (its log
    probabilities summed: ``length_penalty=0``)."""
    model = tiny_model("qwen2_vl", llm_layers=4)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    inputs = tiny_inputs(model, "qwen2_vl", images_per_row=(0,), videos_per_row=(1,), video_specs=[(6, 4, 6)])
    start = inputs["input_ids"].shape[1]
    with vtprune.wrapped(model, "pdkv", keep=0.5, threshold=0.999):
        with torch.no_grad():
            beams = model.generate(**inputs, num_beams=3, num_return_sequences=3, max_new_tokens=6, do_sample=False,
                                   length_penalty=0.0, early_stopping=True, output_scores=True,
                                   return_dict_in_generate=True)
            alone = []
            for seq in beams.sequences[:, start:]:
                forced = model.generate(**inputs, max_new_tokens=6, do_sample=False, output_logits=True,
                                        return_dict_in_generate=True,
                                        prefix_allowed_tokens_fn=lambda b, ids, seq=seq: [int(seq[ids.shape[0] - start])])
                assert torch.equal(forced.sequences[0, start:], seq)
                alone.append(sum(float(torch.log_softmax(step[0].float(), -1)[int(t)])
                                 for step, t in zip(forced.logits, seq)))
        stats = vtprune.stats(model)["pdkv"]
    assert stats["decode_steps"] > 0
    torch.testing.assert_close(beams.sequences_scores.float(), torch.tensor(alone), atol=1e-4, rtol=0)
