"""FlashVID (Fan et al., ICLR 2026, arXiv 2602.08024) — its config and the selection before the LLM.

A clip of T temporal slices of n tokens (LLM-input features ``x``, a salience ``a`` per token):

1. **Segments.**  Consecutive slices whose mean features have cosine similarity below
   ``segment_threshold`` (0.9) start a new segment; with fewer than ``segments`` (8) segments, the
   least similar remaining transitions cut too.
2. **Budgets.**  ``B = ceil(n r expansion)`` tokens per slice (``r`` = ``keep``, ``expansion`` 1.25: the
   LLM-side FastV stage, ``fastv``, takes the rest), ``A = ceil(B alpha)`` of them chosen per slice and
   ``B - A`` per slice merged.
3. **Attention-and-diversity selection (ADTS)**, per slice: distances ``D_ij = (1 - cos(x_i, x_j)) a_j``
   (``a`` scaled by 1e6; ``selection="attn_div_v2"`` multiplies in the token's event relevance, its mean
   inner product with the segment's slice means); the first token maximises its second-smallest
   column entry, each next one the smallest distance to those chosen (max-min), A in all.
4. **Spatiotemporal merging (TSTM)**, per segment of several slices: every other token links to its most
   similar other token of the previous slice; links above ``temporal_threshold`` (0.8) merge (lowered
   to keep at least ``(A + B - A)`` per slice); a chain of links becomes its root token, the mean of the
   chain.  Then per slice the remaining tokens are clustered by density peaks (DPC-kNN, k = min(c, 7)) to
   ``ceil(count (B - A) T_seg / total)`` clusters, each the mean of its members at its centre's place.
5. Kept: the ADTS tokens as they are, and the cluster means; positions original.

Differences from the official code (``flashvid/utils.py``, ``token_selection.py``): a merged chain's mean
counts every token of it (the code counts only direct links, over-weighting long chains); ADTS v2 does not
choose a token twice (the code may); a one-slice segment clusters only its tokens outside ADTS (the code
clusters all of them, so a kept position can repeat); cuts are unique (the code's complement may repeat a
cut, giving an empty segment); density ties go to the earlier token (the code adds 1e-6 noise); the
salience is the tower score vtprune reads for [CLS] methods (``source``).  FlashVID's LLM-side stage is
``fastv`` (``["flashvid", "fastv"]``; the paper prunes to 30% at layer 20 of 28).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..scoring import density_peaks
from .base import register
from .cls import SOURCE
from .temporal import MergingClip, clip_share


def segment_lengths(means: torch.Tensor, threshold: float, at_least: int) -> list:
    """Segment lengths from the slices' mean features [T, D]."""
    t = means.shape[0]
    if t == 1:
        return [1]
    g = means.float() / means.float().norm(dim=-1, keepdim=True)
    sim = (g[:-1] * g[1:]).sum(-1)
    cuts = set((sim < threshold).nonzero().squeeze(1).tolist())
    missing = at_least - (len(cuts) + 1)
    if missing > 0:
        rest = sim.masked_fill(sim < threshold, float("inf"))
        order = torch.sort(rest, stable=True).indices.tolist()
        cuts |= set([i for i in order if i not in cuts][:missing])
    bounds = [-1] + sorted(cuts) + [t - 1]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def adts(x: torch.Tensor, a: torch.Tensor, k: int, relevance: torch.Tensor | None = None) -> torch.Tensor:
    """Attention-and-diversity selection on one slice: ``k`` indices (ascending) of ``x`` [n, D]."""
    n = x.shape[0]
    k = min(k, n)
    if k <= 0:
        return torch.zeros(0, dtype=torch.long)
    f = F.normalize(x.float(), dim=-1)
    dist = (1 - f @ f.T) * (a.float() * 1e6)[None, :]
    if relevance is not None:
        dist = dist * relevance[None, :]
    first = torch.topk(dist, k=min(2, n), dim=0, largest=False).values[-1]
    chosen = [int(torch.argmax(first))]
    nearest = dist[chosen[0]].clone()
    for _ in range(1, k):
        gap = nearest.clone()
        gap[chosen] = -float("inf")
        nxt = int(torch.argmax(gap))
        chosen.append(nxt)
        nearest = torch.minimum(nearest, dist[nxt])
    return torch.sort(torch.tensor(chosen)).values


def dpc_clusters(x: torch.Tensor, count: int) -> tuple:
    """Density-peak clustering of ``x`` [m, D] into ``count`` clusters: ``(centres [count], assignment [m])``."""
    score, d = density_peaks(x, min(count, 7))
    centres = torch.sort(score, descending=True, stable=True).indices[:count]
    assign = d[:, centres].argmin(-1)
    assign[centres] = torch.arange(centres.numel())
    return centres, assign


def tstm(x: torch.Tensor, chosen: torch.Tensor, threshold: float, floor: int) -> tuple:
    """Spatiotemporal merging of a segment ``x`` [T, n, D] (``chosen`` [T, n]: ADTS tokens, left alone):
    per slice, the indices of its remaining roots and their features (chain means)."""
    t, n, dim = x.shape
    f = F.normalize(x.float(), dim=-1)
    best = torch.full((t, n), -1.0)
    link = torch.full((t, n), -1, dtype=torch.long)
    for s in range(1, t):
        sim = f[s] @ f[s - 1].T
        sim[chosen[s]] = -1.0
        sim[:, chosen[s - 1]] = -1.0
        best[s], link[s] = sim.max(-1)
    merged = best > threshold
    if int((~merged).sum()) < floor and t * n > floor:
        soft = torch.topk(best.flatten(), k=t * n - floor).values[-1].item()
        merged = best > max(soft, -1.0 + 1e-6)
    total = x.float().clone()
    count = torch.ones(t, n)
    for s in range(t - 1, 0, -1):  # children into their parents, from the last slice back
        for i in merged[s].nonzero().squeeze(1).tolist():
            total[s - 1, link[s, i]] += total[s, i]
            count[s - 1, link[s, i]] += count[s, i]
    out = []
    for s in range(t):
        keep = (~merged[s] & ~chosen[s]).nonzero().squeeze(1)
        out.append((keep, total[s, keep] / count[s, keep, None]))
    return out


def flashvid(frames: torch.Tensor, salience: torch.Tensor, keep: float, expansion: float = 1.25, alpha: float = 0.7,
             segment_threshold: float = 0.9, segments: int = 8, temporal_threshold: float = 0.8,
             selection: str = "attn_div") -> tuple:
    """FlashVID on a clip: ``frames`` [T, n, D], ``salience`` [T, n].  Returns the kept indices into the
    flattened clip (ascending) and ``(indices, features)`` of its merged tokens."""
    t, n, dim = frames.shape
    budget = min(n, math.ceil(n * keep * expansion))
    chosen_count = math.ceil(budget * alpha)
    merge_count = budget - chosen_count
    kept, merged_idx, merged_feats = [], [], []
    start = 0
    for length in segment_lengths(frames.float().mean(1), segment_threshold, segments):
        seg = frames[start:start + length].float()
        relevance = None
        if selection == "attn_div_v2":
            relevance = torch.einsum("snd,cd->snc", seg, seg.mean(1)).mean(-1)
        chosen = torch.zeros(length, n, dtype=torch.bool)
        for s in range(length):
            idx = adts(seg[s], salience[start + s], chosen_count, None if relevance is None else relevance[s])
            chosen[s, idx] = True
            kept.append(idx + (start + s) * n)
        if merge_count > 0:
            if length > 1 and temporal_threshold < 1.0:
                roots = tstm(seg, chosen, temporal_threshold, (chosen_count + merge_count) * length)
            else:
                roots = [((~chosen[s]).nonzero().squeeze(1), seg[s, ~chosen[s]]) for s in range(length)]
            have = sum(int(r[0].numel()) for r in roots)
            ratio = merge_count * length / max(have, 1)
            for s, (idx, feats) in enumerate(roots):
                clusters = math.ceil(idx.numel() * ratio)
                if clusters > 0 and ratio < 1.0:
                    centres, assign = dpc_clusters(feats, clusters)
                    one = F.one_hot(assign, clusters).float()
                    feats = one.T @ feats / one.sum(0)[:, None]
                    idx = idx[centres]
                merged_idx.append(idx + (start + s) * n)
                merged_feats.append(feats)
        start += length
    merged = torch.cat(merged_idx) if merged_idx else torch.zeros(0, dtype=torch.long)
    feats = torch.cat(merged_feats) if merged_feats else frames.new_zeros(0, dim).float()
    return torch.sort(torch.cat(kept + [merged])).values, (merged, feats)


@register("flashvid")
@dataclass
class FlashVID(MergingClip):
    """FlashVID: per segment of similar slices, tokens chosen by attention and diversity, the rest merged along
    temporal chains and clustered by density peaks (``keep``: the retention ratio r, per slice ``ceil(n r
    expansion)`` before the LLM; its LLM-side stage is ``fastv``)."""

    paper: ClassVar[str] = "FlashVID: Fan et al., ICLR 2026, arXiv 2602.08024"
    ranges: ClassVar[dict] = {
        "expansion": "float >= 1: the pre-LLM budget is keep x expansion (the LLM-side stage prunes the rest)",
        "alpha": "float in [0, 1]: share of each slice's budget chosen by attention and diversity",
        "segment_threshold": "float in [-1, 1]: slices whose mean features are less similar start a segment",
        "segments": "int >= 1: at least this many segments",
        "temporal_threshold": "float in [-1, 1]: a token merges into the previous slice's most similar above it",
        "selection": "'attn_div' (attention-weighted max-min diversity) or 'attn_div_v2' (also event relevance)",
        "source": SOURCE}
    expansion: float = 1.25
    alpha: float = 0.7
    segment_threshold: float = 0.9
    segments: int = 8
    temporal_threshold: float = 0.8
    selection: str = "attn_div"
    source: str | None = None

    def validate(self):
        super().validate()
        if not self.expansion >= 1 or not 0 <= self.alpha <= 1:
            raise ValueError(f"flashvid expansion must be >= 1 and alpha in [0, 1], got {self.expansion}, {self.alpha}")
        if isinstance(self.segments, bool) or not isinstance(self.segments, int) or self.segments < 1:
            raise ValueError(f"flashvid segments must be an int >= 1, got {self.segments!r}")
        if self.selection not in ("attn_div", "attn_div_v2"):
            raise ValueError(f"flashvid selection must be 'attn_div' or 'attn_div_v2', got {self.selection!r}")

    def count(self, per_slice, slices_):  # the nominal budget; score() sets what the merging gives
        keep = clip_share(self.keep, per_slice * slices_)
        return slices_ * min(per_slice, math.ceil(per_slice * keep * self.expansion))

    def select(self, frames, salience, keep):
        return flashvid(frames, salience, keep, self.expansion, self.alpha, self.segment_threshold, self.segments,
                        self.temporal_threshold, self.selection)
