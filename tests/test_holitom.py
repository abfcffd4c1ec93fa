"""HoliTom's pre-LLM stage equals a re-implementation of its official code (``holitom/llava_arch.py``: static
windows by dynamic programming, static cells averaged and clustered, dynamic tokens by salience and density
peaks) with the differences vtprune documents (a static token at its window's first slice, no density noise);
on the stock model's own clip features the pruned model equals the stock language model fed its tokens."""

import math

import pytest
import torch
import torch.nn.functional as F
from reference import drop_mask, fed_logits, language_model_inputs, video_counts

import vtprune
from vtprune.methods.holitom import holitom, static_windows
from vtprune.testing import VIDEO_TOKEN, tiny_inputs, tiny_model


def _windows(sim, tau, longest=1024):
    t = sim.shape[0] + 1
    table = torch.ones((t, t, sim.shape[1]))
    for start in range(t - 1):
        cum = torch.cumprod(sim[start:] > tau, dim=0)
        table[start, start + 1:start + 1 + len(cum)] = cum.float()
    lengths = (torch.arange(t).unsqueeze(0) - torch.arange(t).unsqueeze(1)).clamp(min=0)
    gain = table.sum(-1) * lengths
    dp, prev = torch.zeros(t), torch.zeros(t, dtype=torch.long)
    for i in range(t):
        best, first = (dp[i - 1] if i > 0 else 0), i
        for size in range(2, min(i + 1, longest) + 1):
            j = i - size
            value = (dp[j] if j >= 0 else 0) + gain[j + 1, i]
            if value > best:
                best, first = value, j + 1
        dp[i], prev[i] = best, first
    out, i = [], t - 1
    while i >= 0:
        out.append((int(prev[i]), i))
        i = int(prev[i]) - 1
    return out[::-1], float(dp[-1])


def _centres(x, count, k):
    d = torch.cdist(x[None].float(), x[None].float()) / (x.shape[-1] ** 0.5)
    near = torch.topk(d, min(k, count), dim=-1, largest=False).values
    density = (-(near ** 2).mean(dim=-1)).exp()
    mask = (density[:, None, :] > density[:, :, None]).float()
    dist = (d * mask + d.flatten(1).max(-1).values[:, None, None] * (1 - mask)).min(-1).values
    return torch.sort(torch.sort(dist * density, descending=True, stable=True).indices[0, :count]).values, d[0]


def _merge(x, centres, d, beta):
    others = ~torch.isin(torch.arange(x.shape[0]), centres)
    assign = torch.argmin(d[others][:, centres], dim=-1)
    out = []
    for i in range(centres.numel()):
        members = x[others][assign == i]
        out.append(beta * x[centres[i]] + (1 - beta) * members.mean(0) if members.numel() else x[centres[i]])
    return torch.stack(out)


def holitom_reference(x, a, r, tau=0.8, beta=0.6, dshare=0.0, k=7):
    """Kept indices into the flattened clip and {index: feature} of the merged tokens."""
    t, n, _ = x.shape
    x = x.float()
    sim = F.cosine_similarity(F.normalize(x[:-1], p=2, dim=-1), F.normalize(x[1:], p=2, dim=-1), dim=-1)
    windows, reduced = _windows(sim, tau) if t > 1 else ([(0, 0)], 0.0)
    r = min(r / ((t * n - reduced) / (t * n)), 1)
    kept, merged = [], {}
    for start, end in windows:
        static = torch.all(sim[start:end] > tau, dim=0) if end > start else torch.zeros(n, dtype=torch.bool)
        cells = torch.where(static)[0]
        count = round(cells.numel() * r)
        if count > 0:
            feats = x[start:end + 1, static].mean(0)
            centres, d = _centres(feats, count, k)
            for c, feat in zip(cells[centres].tolist(), _merge(feats, centres, d, beta)):
                merged[start * n + c] = feat
                kept.append(start * n + c)
        dyn = torch.where(~static)[0]
        total = math.ceil(dyn.numel() * r)
        dominant = round(total * (1 - dshare))
        for f in range(start, end + 1):
            top = torch.sort(a[f, dyn], descending=True, stable=True).indices[:dominant]
            kept += (dyn[top] + f * n).tolist()
            rest = dyn[~torch.isin(torch.arange(dyn.numel()), top)]
            if total - dominant > 0:
                centres, d = _centres(x[f, rest], total - dominant, k)
                for c, feat in zip(rest[centres].tolist(), _merge(x[f, rest], centres, d, beta)):
                    merged[f * n + c] = feat
                    kept.append(f * n + c)
    return sorted(kept), merged


def _clip(t, n, dim, seed):
    """Slices in which most cells stay put for a while (a new scene every 4th slice)."""
    gen = torch.Generator().manual_seed(seed)
    frames = [torch.randn(n, dim, generator=gen)]
    for f in range(1, t):
        moved = torch.rand(n, generator=gen) < (1.0 if f % 4 == 0 else 0.25)
        frames.append(torch.where(moved[:, None], torch.randn(n, dim, generator=gen),
                                  frames[-1] + 0.05 * torch.randn(n, dim, generator=gen)))
    return torch.stack(frames)


@pytest.mark.parametrize("t,n,keep", [(9, 36, 0.15), (12, 49, 0.1), (6, 20, 0.4), (1, 25, 0.3)])
@pytest.mark.parametrize("options", [dict(), dict(tau=0.65), dict(contextual_share=0.4, beta=0.3)])
def test_holitom_equals_the_official_computation(t, n, keep, options):
    x = _clip(t, n, 16, seed=t * n)
    a = torch.rand(t, n, generator=torch.Generator().manual_seed(n))
    tau, beta, dshare = options.get("tau", 0.8), options.get("beta", 0.6), options.get("contextual_share", 0.0)
    kept, (merged, feats) = holitom(x, a, keep, tau, beta, dshare)
    ref_kept, ref_merged = holitom_reference(x, a, keep, tau, beta, dshare)
    assert kept.tolist() == ref_kept and sorted(merged.tolist()) == sorted(ref_merged)
    for i, feat in zip(merged.tolist(), feats):
        torch.testing.assert_close(feat, ref_merged[i], atol=1e-5, rtol=1e-5)
    if t > 4:  # windows of several slices form, and their still cells merge
        assert max(e - s for s, e in static_windows(F.cosine_similarity(x[:-1], x[1:], dim=-1), tau)[0]) > 0
        assert merged.numel() > 0


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_next_video"])
def test_holitom_model_equals_the_stock_language_model_fed_its_tokens(family):
    model = tiny_model(family)
    spec = 8 if family == "llava_next_video" else (8, 4, 6)
    inputs = tiny_inputs(model, family, images_per_row=(0,), videos_per_row=(1,), video_specs=[spec])
    pixels = inputs["pixel_values_videos"]  # slices 1-3 repeat slice 0: a still window
    if pixels.dim() == 5:
        pixels[:, 1:4] = pixels[:, :1]
    else:
        pixels[24:96] = pixels[:24].repeat(3, 1)
    fed = language_model_inputs(model, inputs)
    with vtprune.wrapped(model, "fastervlm", keep=0.5):
        with torch.no_grad():
            model(**inputs)
        salience = vtprune.record(model).scores[0]
    with vtprune.wrapped(model, "holitom", keep=0.3):
        with torch.no_grad():
            logits = model(**inputs).logits
        (kept,) = vtprune.last_kept(model)[0]
    video = (inputs["input_ids"][0] == VIDEO_TOKEN).nonzero().squeeze(1)
    n = video.numel() // 8
    ref_kept, merged = holitom_reference(fed["inputs_embeds"][0, video].view(8, n, -1), salience.view(8, n), 0.3)
    assert kept.tolist() == ref_kept and len(merged) > 0
    drop = drop_mask(inputs["input_ids"], [[kept]], video_counts(model, inputs))
    ref = fed_logits(model, fed, drop, {(0, int(video[i])): feat for i, feat in merged.items()})
    torch.testing.assert_close(logits[:, -1], ref, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- the LLM-side merge (holitom_merge)

@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision", "qwen3_vl"])
@pytest.mark.parametrize("images,videos,with_mask", [((0,), (1,), False), ((1, 0), (1, 2), True)])
def test_holitom_merge_equals_the_halved_and_masked_reference(family, images, videos, with_mask):
    """The stock model with each kept slot's state at the merge layer the running halving ``h <- (h + x) / 2`` over
    the tokens merged into it (in their order), and every merged token masked from that layer on; batch 1 without
    a mask and batch 2 left padded with an image beside clips; logits and greedy tokens with the cache."""
    from reference import assert_merged_and_masked, halving, recorded_runs

    model = tiny_model(family, llm_layers=4)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = None, 0
    inputs = tiny_inputs(model, family, images_per_row=images, videos_per_row=videos, with_mask=with_mask)
    logits, record, tokens, after_generate = recorded_runs(model, inputs, "holitom_merge", layer=2, ratio=0.5)
    assert record.exit.merged and any(len(members) > 2 for *_, members in record.exit.merged)
    assert {k for k, *_ in record.exit.merged} == {k for k, _, _ in record.exit.stages} == {2}
    assert_merged_and_masked(model, inputs, logits, tokens, record, after_generate, combine=halving)


def _merge_by_loop(states, attention, visual, ratio):
    """HoliTom's merge written out as its code runs it (``holitom/modeling_qwen2.py``), for one sample: the top
    ``round(N (1 - r))`` visual tokens by attention stay; each other, in order, halves into its most similar."""
    n = len(visual)
    count = math.floor(n * (1 - ratio) + 0.5)
    order = sorted(range(n), key=lambda i: (-float(attention[visual[i]]), i))[:count]
    kept = sorted(visual[i] for i in order)
    others = [p for p in visual if p not in kept]
    target = {}
    for p in others:
        sims = [float(F.cosine_similarity(states[p].double(), states[q].double(), dim=0)) for q in kept]
        target[p] = kept[max(range(len(kept)), key=lambda j: (sims[j], -j))]
    merged = {}
    for p in others:
        q = target[p]
        merged[q] = (merged.get(q, states[q].double()) + states[p].double()) / 2
    return kept, {q: [p for p in others if target[p] == q] for q in merged}, merged


@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_holitom_merge_chooses_as_its_definition(ratio):
    """Which tokens stay and what each kept one becomes, against the definition written out with the stock model's
    own layer-1 attention (eager, ``output_attentions``) and layer-2 input states: a clip and an image."""
    model = tiny_model("qwen2_5_vl", llm_layers=4, attn_implementation="eager")
    inputs = tiny_inputs(model, "qwen2_5_vl", images_per_row=(1,), videos_per_row=(1,), with_mask=False)
    with torch.no_grad():
        out = model(**inputs, output_attentions=True, output_hidden_states=True)
    attention = out.attentions[1][0].mean(0)[-1]  # layer 1, last prompt token, mean over heads
    states = out.hidden_states[2][0]  # the input of layer 2
    ids = inputs["input_ids"][0]
    visual = ((ids == VIDEO_TOKEN) | (ids == vtprune.testing.IMAGE_TOKEN)).nonzero().squeeze(1).tolist()
    kept, members, merged = _merge_by_loop(states, attention, visual, ratio)
    with vtprune.wrapped(model, "holitom_merge", layer=2, ratio=ratio):
        with torch.no_grad():
            model(**inputs)
        record = vtprune.record(model)
    ((_, _, drop),) = record.exit.stages
    assert sorted(set(visual) - set(drop[0].nonzero().squeeze(1).tolist())) == kept
    got = {slot: members_[1:] for _, _, slot, members_ in record.exit.merged}
    assert got == members and len(got) > 1
    assert any(len(m) > 1 for m in members.values())  # a kept token that takes several: the halving order counts
    for k, row, slot, _ in record.exit.merged:
        assert (k, row) == (2, 0)


def test_holitom_merge_options_and_composition():
    model = tiny_model("qwen2_vl", llm_layers=3)
    with pytest.raises(ValueError, match=r"ratio must be a number in \[0, 1\)"):
        vtprune.wrap(model, "holitom_merge", layer=1, ratio=1.0)
    with pytest.raises(ValueError, match=r"layer=18 must lie in \[1, 2\]"):
        vtprune.wrap(model, "holitom_merge")
    assert not vtprune.is_wrapped(model)
    inputs = tiny_inputs(model, "qwen2_vl", images_per_row=(0,), videos_per_row=(1,), video_specs=[(8, 4, 6)])
    with vtprune.wrapped(model, ["holitom", "holitom_merge"], keep=0.5, layer=1):
        with torch.no_grad():
            model(**inputs)
        totals = vtprune.stats(model)["totals"]
    video = int((inputs["input_ids"] == VIDEO_TOKEN).sum())
    assert totals["visual_tokens_in"] == video and totals["visual_tokens_out"] < video
    assert totals["visual_tokens_llm"] < totals["visual_tokens_out"]  # half of what holitom kept leave at layer 1
