"""FastVID equals a re-implementation of its official code (the LLaVA-OneVision version, batched over frames
as it is written, without its density noise) on random clips, and on the stock model's own clip features
the pruned model equals the stock language model fed the kept tokens with the anchors' merged features."""

import pytest
import torch
import torch.nn.functional as F
from reference import drop_mask, fed_logits, language_model_inputs, video_counts

import vtprune
from vtprune.methods.fastvid import fastvid, segments
from vtprune.testing import VIDEO_TOKEN, tiny_inputs, tiny_model


def fastvid_reference(x, a, r, c=8, tau=0.9, d=0.4, p=4, beta=0.6):
    """FastVID as its official code computes it: kept indices into the flattened clip, and
    ``{index: merged feature}`` of its anchors."""
    T, n, D = x.shape
    g = x.float().mean(1)
    g = g / g.norm(dim=1, keepdim=True)
    sim = (g[:-1] * g[1:]).sum(1)
    cuts = torch.zeros(0, dtype=torch.long)
    if T > 1:
        cuts = torch.unique(torch.cat([torch.topk(sim, min(c - 1, T - 1), largest=False).indices,
                                       torch.nonzero(sim < tau).squeeze(1)])).sort().values
    padded = F.pad(cuts, (1, 1), value=-1)
    padded[-1] = T - 1
    sizes = padded.diff().tolist()
    R = int(n * r)
    S = R - int(R * d)
    C = R - S
    counts = torch.zeros(T, dtype=torch.long)
    off = 0
    for L in sizes:
        idx = torch.arange(L - 1, -1, -1)
        counts[off:off + L][idx % p == 0] = C * L // ((L + p - 1) // p)
        off += L
    sal = torch.stack([torch.sort(a[f].float(), descending=True, stable=True).indices[:S] for f in range(T)])
    kept = {int(f * n + j) for f in range(T) for j in sal[f].tolist()}
    mask = torch.ones(T, n, dtype=torch.bool)
    for f in range(T):
        mask[f, sal[f]] = False
    filt = torch.stack([mask[f].nonzero().squeeze(1) for f in range(T)])  # [T, n - S]
    tok = torch.stack([x[f, filt[f]] for f in range(T)]).float()
    dist = torch.cdist(tok, tok) / D ** 0.5
    dens = (-(torch.topk(dist, k=min(4, n - S), dim=-1, largest=False).values ** 2).mean(-1)).exp()
    dmask = (dens[:, None, :] > dens[:, :, None]).float()
    dmax = dist.flatten(1).max(-1)[0][:, None, None]
    score = (dist * dmask + dmax * (1 - dmask)).min(-1)[0] * dens
    merged = {}
    off = 0
    for L in sizes:
        for f in range(off, off + L):
            k = min(int(counts[f]), n - S)  # more anchors than tokens left: the code's topk fails, vtprune takes all
            if k == 0:
                continue
            pick = torch.sort(score[f], descending=True, stable=True).indices[:k]
            members = tok[f] if counts[f] == C else tok[off:off + L].reshape(-1, D)
            s = F.normalize(members, dim=-1) @ F.normalize(tok[f, pick], dim=-1).T
            one = torch.zeros(members.shape[0], k).scatter_(1, s.argmax(1, keepdim=True), 1)
            w = (1 / (one.sum(0)[:, None] + 1)).clamp(min=beta)
            feats = w * tok[f, pick] + (1 - w) * (one.T @ members / one.sum(0)[:, None].clamp(min=1))
            for j, feat in zip(pick.tolist(), feats):
                merged[int(f * n + filt[f, j])] = feat
                kept.add(int(f * n + filt[f, j]))
        off += L
    return sorted(kept), merged


def _clip(t, n, dim, seed):
    """A clip whose frames come in runs (every 4th frame a new scene), so segments of several frames form."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, dim, generator=gen)
    return torch.stack([base + (2.0 if f % 4 == 0 else 0.3) * torch.randn(n, dim, generator=gen) for f in range(t)])


@pytest.mark.parametrize("t,n,keep", [(10, 36, 0.25), (12, 49, 0.1), (16, 20, 0.4), (9, 36, 0.5), (1, 25, 0.3)])
@pytest.mark.parametrize("c,tau", [(8, 0.9), (3, 0.5)])
def test_fastvid_equals_the_official_computation(t, n, keep, c, tau):
    x = _clip(t, n, 16, seed=t * n)
    a = torch.rand(t, n, generator=torch.Generator().manual_seed(n))
    kept, (anchors, merged) = fastvid(x, a, keep, c, tau)
    ref_kept, ref_merged = fastvid_reference(x, a, keep, c, tau)
    assert kept.tolist() == ref_kept and sorted(anchors.tolist()) == sorted(ref_merged)
    for i, feat in zip(anchors.tolist(), merged):
        torch.testing.assert_close(feat, ref_merged[i], atol=1e-6, rtol=0)
    if (t, c) == (12, 3):  # segments of several frames happen here: their anchors merge across frames
        assert max(segments(x.mean(1), c, tau)) > 1


def test_a_budget_under_one_token_per_frame_keeps_one_salient_token_each():
    """``int(n keep) = 0`` (16 tokens a frame at keep 0.05): the code keeps nothing; we keep each frame's
    most salient token."""
    x = _clip(8, 16, 16, seed=3)
    a = torch.rand(8, 16, generator=torch.Generator().manual_seed(4))
    kept, (anchors, _) = fastvid(x, a, 0.05)
    assert kept.tolist() == [f * 16 + int(a[f].argmax()) for f in range(8)] and anchors.numel() == 0


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_next_video"])
def test_fastvid_model_equals_the_stock_language_model_fed_its_tokens(family):
    model = tiny_model(family)
    spec = 8 if family == "llava_next_video" else (8, 4, 6)
    inputs = tiny_inputs(model, family, images_per_row=(0,), videos_per_row=(1,), video_specs=[spec])
    fed = language_model_inputs(model, inputs)
    with vtprune.wrapped(model, "fastervlm", keep=0.5):  # the salience fastvid reads (tested against eager)
        with torch.no_grad():
            model(**inputs)
        salience = vtprune.record(model).scores[0]
    with vtprune.wrapped(model, "fastvid", keep=0.5, segments=3, tau=-1.0):  # 3 segments of several frames
        with torch.no_grad():
            logits = model(**inputs).logits
        (kept,) = vtprune.last_kept(model)[0]
    video = (inputs["input_ids"][0] == VIDEO_TOKEN).nonzero().squeeze(1)
    n = video.numel() // 8
    clip = fed["inputs_embeds"][0, video].view(8, n, -1)
    ref_kept, merged = fastvid_reference(clip, salience.view(8, n), 0.5, 3, -1.0)
    assert kept.tolist() == ref_kept and max(segments(clip.mean(1), 3, -1.0)) > 1  # anchors merged across frames
    drop = drop_mask(inputs["input_ids"], [[kept]], video_counts(model, inputs))
    ref = fed_logits(model, fed, drop, {(0, int(video[i])): feat for i, feat in merged.items()})
    torch.testing.assert_close(logits[:, -1], ref, atol=1e-5, rtol=0)
