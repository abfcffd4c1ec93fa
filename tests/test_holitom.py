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
