"""FastVID (Shen et al., NeurIPS 2025, arXiv 2503.11187) — its config and selection.

A clip of T frames of n tokens (the LLM-input features ``X``, a salience ``a`` per token):

1. **Dynamic segmentation.**  ``s_f = cos(g_f, g_{f+1})`` of consecutive frames' global features
   ``g_f`` (the mean of a frame's tokens, as FastVID's Qwen2.5-VL code takes it); a segment ends after
   the ``c - 1`` least similar transitions and after every transition with ``s_f < tau``.
2. **Budgets.**  ``R = int(n r)`` tokens per frame on average, ``S = R - int(R d)`` of them salient and
   ``C = R - S`` context tokens; a segment of L frames shares ``C L`` context tokens among the frames
   at distance ``0, p, 2p, ...`` from its end, ``C L // ceil(L / p)`` each.
3. **Salient tokens**: each frame's top S by ``a``, kept as they are.
4. **Context tokens** among the rest, by density peaks (DPC-kNN): ``d`` = Euclidean distance / sqrt(D),
   ``rho = exp(-mean of the 4 smallest d^2)`` (itself included), ``delta`` = the distance to the
   nearest denser token of the frame (the frame's largest distance for the densest), score
   ``rho delta``.  A one-frame segment takes its frame's top C as anchors and merges each of its
   other remaining tokens into the most cosine-similar anchor; in a longer segment each anchor frame
   takes its top ``C L // ceil(L / p)`` by its own scores and merges the remaining tokens of *every*
   frame of the segment.  An anchor becomes ``w anchor + (1 - w) mean(members)``, ``w = max(1 / (m + 1),
   beta)`` (m members, the anchor among them).
5. Kept tokens keep their positions; anchors carry their merged features.

Differences from the official code: the salience is the tower score vtprune reads for [CLS] methods
(``source``: [CLS] attention where the tower has one, else the attention each token receives; FastVID
reloads SigLIP's attention-pooling head on LLaVA-OneVision and uses the last Qwen ViT block's
frame-mean query on Qwen2.5-VL); density ties go to the earlier token (the code adds 1e-6 uniform
noise); a frame asked for more anchors than it has tokens left gives all of them (the code fails
there); a budget under one token per frame (``int(n r) = 0``, where the code keeps nothing) keeps one
salient token per frame; Qwen2.5-VL's second segmentation threshold (0.95) is not applied.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..scoring import density_peaks
from .base import register
from .cls import SOURCE
from .temporal import MergingClip, clip_share


def segments(globals_: torch.Tensor, c: int, tau: float) -> list:
    """Segment lengths of a clip from its frames' global features [T, D]."""
    t = globals_.shape[0]
    if t == 1:
        return [1]
    g = globals_.float() / globals_.float().norm(dim=1, keepdim=True)
    sim = (g[:-1] * g[1:]).sum(1)
    cuts = set(torch.topk(sim, min(c - 1, t - 1), largest=False).indices.tolist()) if c > 1 else set()
    cuts |= set((sim < tau).nonzero().squeeze(1).tolist())
    bounds = [-1] + sorted(cuts) + [t - 1]
    return [b - a for a, b in zip(bounds, bounds[1:]) if b > a]


def anchor_counts(lengths: list, context: int, p: int) -> list:
    """Context tokens per frame: each segment's ``C L`` shared among its frames at distance 0, p, 2p, ...
    from its end."""
    out = []
    for length in lengths:
        each = context * length // ((length + p - 1) // p)
        out += [each if (length - 1 - i) % p == 0 else 0 for i in range(length)]
    return out


def density_scores(x: torch.Tensor) -> torch.Tensor:
    """DPC-kNN score ``rho delta`` of each row of ``x`` [m, D] among the others (4 nearest neighbours)."""
    if x.shape[0] == 1:
        return torch.ones(1)
    return density_peaks(x, 4)[0]


def merge_into(anchors: torch.Tensor, members: torch.Tensor, beta: float) -> torch.Tensor:
    """Anchors [k, D] each merged with the rows of ``members`` [m, D] most cosine-similar to it."""
    sim = F.normalize(members.float(), dim=-1) @ F.normalize(anchors.float(), dim=-1).T
    assign = F.one_hot(sim.argmax(1), anchors.shape[0]).float()  # [m, k]
    count = assign.sum(0)[:, None]
    mean = assign.T @ members.float() / count.clamp(min=1)
    w = (1 / (count + 1)).clamp(min=beta)
    return w * anchors.float() + (1 - w) * mean


def fastvid(frames: torch.Tensor, salience: torch.Tensor, keep: float, c: int = 8, tau: float = 0.9,
            d: float = 0.4, p: int = 4, beta: float = 0.6) -> tuple:
    """FastVID on a clip: ``frames`` [T, n, D] features, ``salience`` [T, n].  Returns the kept tokens'
    indices into the flattened clip (ascending) and the merged features of its anchors ``(indices, [k, D])``."""
    t, n, dim = frames.shape
    lengths = segments(frames.float().mean(1), c, tau)
    per_frame = max(1, int(n * keep))  # the code keeps nothing below one token per frame
    salient = per_frame - int(per_frame * d)
    context = per_frame - salient
    counts = anchor_counts(lengths, context, p)
    kept, anchor_idx, anchor_feats = [], [], []
    rest, scores = [], []
    for f in range(t):
        top = torch.sort(torch.sort(salience[f].float(), descending=True, stable=True).indices[:salient]).values
        kept.append(top + f * n)
        others = torch.ones(n, dtype=torch.bool)
        others[top] = False
        idx = others.nonzero().squeeze(1)
        rest.append(idx)
        scores.append(density_scores(frames[f, idx]))
    start = 0
    for length in lengths:
        seg = range(start, start + length)
        members = torch.cat([frames[g, rest[g]] for g in seg])
        for f in seg:
            k = min(counts[f], rest[f].numel())
            if k == 0:
                continue
            pick = torch.sort(scores[f], descending=True, stable=True).indices[:k]
            anchors = frames[f, rest[f][pick]]
            alone = counts[f] == context  # a one-frame segment (as the code tells them): its own tokens
            merged = merge_into(anchors, frames[f, rest[f]] if alone else members, beta)
            anchor_idx.append(rest[f][pick] + f * n)
            anchor_feats.append(merged)
        start += length
    anchors = torch.cat(anchor_idx) if anchor_idx else torch.zeros(0, dtype=torch.long)
    feats = torch.cat(anchor_feats) if anchor_feats else frames.new_zeros(0, dim).float()
    return torch.sort(torch.cat(kept + [anchors])).values, (anchors, feats)


@register("fastvid")
@dataclass
class FastVID(MergingClip):
    """FastVID: a clip cut into segments of similar frames, each frame's most salient tokens kept and the
    rest merged into density-peak anchors, spread over each segment's frames (``keep``: the retained
    fraction ``r`` per frame; an int: tokens per clip)."""

    paper: ClassVar[str] = "FastVID: Shen et al., NeurIPS 2025, arXiv 2503.11187"
    ranges: ClassVar[dict] = {
        "segments": "int >= 1: at least this many segments (the c - 1 least similar transitions cut)",
        "tau": "float in [-1, 1]: a transition with frame similarity below it also cuts",
        "context_share": "float in [0, 1): share d of each frame's budget for merged context tokens",
        "spacing": "int >= 1: in a segment, every p-th frame from its end holds its context tokens",
        "beta": "float in [0, 1]: an anchor keeps at least this weight when merged",
        "source": SOURCE}
    segments: int = 8
    tau: float = 0.9
    context_share: float = 0.4
    spacing: int = 4
    beta: float = 0.6
    source: str | None = None

    def validate(self):
        super().validate()
        if not (isinstance(self.segments, int) and self.segments >= 1 and isinstance(self.spacing, int)
                and self.spacing >= 1):
            raise ValueError(f"fastvid segments and spacing must be ints >= 1, got {self.segments!r}, {self.spacing!r}")
        if not 0 <= self.context_share < 1 or not 0 <= self.beta <= 1 or not -1 <= self.tau <= 1:
            raise ValueError("fastvid context_share must lie in [0, 1), beta in [0, 1] and tau in [-1, 1]")

    def count(self, per_slice, slices_):  # the nominal budget; score() sets what the segments give
        keep = clip_share(self.keep, per_slice * slices_)
        return slices_ * max(1, int(per_slice * keep))

    def select(self, frames, salience, keep):
        return fastvid(frames, salience, keep, self.segments, self.tau, self.context_share, self.spacing, self.beta)
