"""FlashVID equals a re-implementation of its official code (``flashvid/utils.py`` and ``token_selection.py``,
batched over slices as they are written) with the differences vtprune documents: a merged chain's mean over
all its tokens, a one-slice segment clustering only its tokens outside ADTS, unique cuts, no density noise.
On the stock model's own clip features the pruned model equals the stock language model fed its tokens."""

import math

import pytest
import torch
import torch.nn.functional as F
from reference import drop_mask, fed_logits, language_model_inputs, video_counts

import vtprune
from vtprune.methods.flashvid import flashvid, segment_lengths
from vtprune.testing import VIDEO_TOKEN, tiny_inputs, tiny_model


def _segments(means, threshold, at_least):
    g = means / means.norm(p=2, dim=-1, keepdim=True)
    sim = torch.sum(g[:-1] * g[1:], dim=-1)
    cut = torch.where(sim < threshold)[0]
    if cut.numel() + 1 < at_least:
        sim = sim.clone()
        sim[sim < threshold] = float("inf")  # (the code sets 1.0, which a similar transition may tie)
        extra = torch.sort(sim, stable=True).indices[:min(at_least - cut.numel() - 1, sim.shape[0] - cut.numel())]
        cut = torch.cat([cut, extra]).sort().values
    padded = F.pad(cut, (1, 1), value=0)
    padded[0], padded[-1] = -1, means.shape[0] - 1
    return torch.diff(padded).tolist()


def _adts(features, attention, k, v2):
    """The code's attention-and-diversity selection, batched over slices [b, n, D]."""
    x = features.float()
    normed = x / x.norm(p=2, dim=-1, keepdim=True)
    dist = (1.0 - torch.bmm(normed, normed.transpose(-1, -2))) * (attention.float() * 1e6).unsqueeze(1)
    if v2:
        dist = dist * torch.einsum("bnd,cd->bcn", x, x.mean(1)).mean(1).unsqueeze(1)
    b, n, _ = x.shape
    keep = torch.zeros(b, k, dtype=torch.long)
    keep[:, 0] = torch.argmax(torch.topk(dist, k=2, dim=1, largest=False).values[:, 1, :], dim=-1)
    for i in range(1, k):
        sub = torch.gather(dist, 1, keep[:, :i].unsqueeze(-1).expand(-1, -1, n))
        low = torch.min(sub, dim=1).values
        low.scatter_(1, keep[:, :i], -1)
        keep[:, i] = torch.argmax(low, dim=-1)
    return keep.sort().values


def _dpc(x, clusters):
    d = torch.cdist(x[None], x[None]) / math.sqrt(x.shape[-1])
    near = torch.topk(d, k=min(clusters, 7), dim=-1, largest=False).values
    density = torch.mean(-(near ** 2), dim=-1).exp()
    mask = density[:, None, :] > density[:, :, None]
    dist, _ = torch.min(torch.where(mask, d, d.view(1, -1).max(-1)[0].view(-1, 1, 1)), dim=-1)
    centres = torch.sort(dist * density, descending=True, stable=True).indices[:, :clusters]
    assign = torch.argmin(torch.gather(d, -1, centres.unsqueeze(1).expand(-1, x.shape[0], -1)), dim=-1)
    assign.scatter_(-1, centres, torch.arange(clusters).unsqueeze(0))
    return assign[0], centres[0]


def _tstm(x, token_mask, threshold, lower_bound):
    """The code's spatiotemporal merging, each link carrying its whole chain's count."""
    t, n, _ = x.shape
    x = x.clone()
    normed = x / x.norm(p=2, dim=-1, keepdim=True)
    sims = torch.einsum("bnd,bmd->bnm", normed[1:], normed[:-1])
    sims[~token_mask[1:].unsqueeze(-1).expand(-1, -1, n)] = -1.0
    sims[~token_mask[:-1].unsqueeze(1).expand(-1, n, -1)] = -1.0
    best, link = torch.max(sims, dim=-1)
    best, link = F.pad(best, (0, 0, 1, 0), value=-1), F.pad(link, (0, 0, 1, 0), value=-1)
    counts = torch.ones(t, n)
    mask = best > threshold
    if (~mask).int().sum() < lower_bound:
        soft = best.view(-1).topk(k=t * n - lower_bound).values[-1]
        mask = best > max(soft, -1.0 + 1e-6)
    for f in range(t - 1, 0, -1):
        one = F.one_hot(link[f][mask[f]], num_classes=n).float()
        x[f - 1] += one.T @ x[f][mask[f]]
        counts[f - 1] += one.T @ counts[f][mask[f]]  # (the code adds one.sum(0): direct links only)
    return [(torch.where(~mask[f] & token_mask[f])[0], (x[f] / counts[f][:, None])[~mask[f] & token_mask[f]])
            for f in range(t)]


def flashvid_reference(x, a, r, expansion=1.25, alpha=0.7, seg_thr=0.9, min_seg=8, temp_thr=0.8, v2=False):
    t, n, dim = x.shape
    x = x.float()
    budget = math.ceil(n * r * expansion)
    chosen_n = math.ceil(budget * alpha)
    other = budget - chosen_n
    kept, merged = [], {}
    offset = 0
    for length in _segments(x.mean(1), seg_thr, min_seg):
        seg = x[offset:offset + length]
        sel = _adts(seg, a[offset:offset + length], chosen_n, v2)
        kept += (sel + (offset + torch.arange(length))[:, None] * n).view(-1).tolist()
        mask = torch.ones(length, n, dtype=torch.bool).scatter(1, sel, False)
        if other > 0:
            if length > 1:
                roots = _tstm(seg, mask, temp_thr, (chosen_n + other) * length)
            else:
                roots = [(torch.where(mask[0])[0], seg[0][mask[0]])]
            ratio = other * length / sum(len(i) for i, _ in roots)
            for f, (idx, feats) in enumerate(roots):
                clusters = math.ceil(len(idx) * ratio)
                if clusters > 0 and ratio < 1.0:
                    assign, centres = _dpc(feats, clusters)
                    one = F.one_hot(assign, num_classes=clusters).float()
                    feats = torch.einsum("nc,nd->cd", one, feats) / one.sum(0).unsqueeze(-1)
                    idx = idx[centres]
                for i, feat in zip(idx.tolist(), feats):
                    merged[(offset + f) * n + i] = feat
        offset += length
    return sorted(kept + list(merged)), merged


def _clip(t, n, dim, seed):
    """Slices in runs (every 3rd a new scene) whose tokens partly stay put, so chains form across slices."""
    gen = torch.Generator().manual_seed(seed)
    frames = [torch.randn(n, dim, generator=gen)]
    for f in range(1, t):
        fresh = torch.randn(n, dim, generator=gen)
        moved = torch.rand(n, generator=gen) < (1.0 if f % 3 == 0 else 0.3)
        frames.append(torch.where(moved[:, None], fresh, frames[-1] + 0.05 * torch.randn(n, dim, generator=gen)))
    return torch.stack(frames)


@pytest.mark.parametrize("t,n,keep", [(9, 36, 0.25), (12, 49, 0.1), (6, 20, 0.4), (1, 25, 0.3)])
@pytest.mark.parametrize("options", [dict(), dict(segments=2, segment_threshold=0.5), dict(selection="attn_div_v2"),
                                     dict(temporal_threshold=0.99, alpha=0.5)])
def test_flashvid_equals_the_official_computation(t, n, keep, options):
    x = _clip(t, n, 16, seed=t * n)
    a = torch.rand(t, n, generator=torch.Generator().manual_seed(n))
    kw = dict(expansion=1.25, alpha=options.get("alpha", 0.7), segment_threshold=options.get("segment_threshold", 0.9),
              segments=options.get("segments", 8), temporal_threshold=options.get("temporal_threshold", 0.8))
    kept, (merged, feats) = flashvid(x, a, keep, selection=options.get("selection", "attn_div"), **kw)
    ref_kept, ref_merged = flashvid_reference(x, a, keep, kw["expansion"], kw["alpha"], kw["segment_threshold"],
                                              kw["segments"], kw["temporal_threshold"],
                                              options.get("selection") == "attn_div_v2")
    assert kept.tolist() == ref_kept and sorted(merged.tolist()) == sorted(ref_merged)
    for i, feat in zip(merged.tolist(), feats):
        torch.testing.assert_close(feat, ref_merged[i], atol=1e-5, rtol=1e-5)
    if (t, options.get("segments")) == (9, 2):  # segments of several slices: chains merge across them
        assert max(segment_lengths(x.mean(1), 0.5, 2)) > 1


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_next_video"])
def test_flashvid_model_equals_the_stock_language_model_fed_its_tokens(family):
    model = tiny_model(family)
    spec = 8 if family == "llava_next_video" else (8, 4, 6)
    inputs = tiny_inputs(model, family, images_per_row=(0,), videos_per_row=(1,), video_specs=[spec])
    fed = language_model_inputs(model, inputs)
    with vtprune.wrapped(model, "fastervlm", keep=0.5):  # the salience flashvid reads (tested against eager)
        with torch.no_grad():
            model(**inputs)
        salience = vtprune.record(model).scores[0]
    options = dict(keep=0.4, alpha=0.5, segments=3, segment_threshold=-1.0, temporal_threshold=0.0)  # chains form
    with vtprune.wrapped(model, "flashvid", **options):
        with torch.no_grad():
            logits = model(**inputs).logits
        (kept,) = vtprune.last_kept(model)[0]
    video = (inputs["input_ids"][0] == VIDEO_TOKEN).nonzero().squeeze(1)
    n = video.numel() // 8
    clip = fed["inputs_embeds"][0, video].view(8, n, -1)
    ref_kept, merged = flashvid_reference(clip, salience.view(8, n), 0.4, alpha=0.5, seg_thr=-1.0, min_seg=3,
                                          temp_thr=0.0)
    assert kept.tolist() == ref_kept and len(merged) > 0
    drop = drop_mask(inputs["input_ids"], [[kept]], video_counts(model, inputs))
    ref = fed_logits(model, fed, drop, {(0, int(video[i])): feat for i, feat in merged.items()})
    torch.testing.assert_close(logits[:, -1], ref, atol=1e-5, rtol=0)
