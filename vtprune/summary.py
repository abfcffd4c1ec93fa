"""Summary tokens and token sizes: what a kept visual token stands for (issue 23).

A selector's ``summary=k`` spends k of an image's budget on summary tokens: the tokens the selector
dropped are split into k groups, and each group enters the LLM as one token at the original
position of one of its members.  ``size`` is how many of the image's tokens a kept token stands
for (a summary token: its group; a ``pool`` window: its cells; a VisionZip contextual token: its
target and the tokens merged into it; with ``size_bias=True`` on other selectors: itself and the
dropped tokens whose features are closest to it; with both ``summary`` and ``size_bias``, every
dropped token joins the kept or summary token whose feature is closest to it, so kept tokens
also stand for the dropped parts of their objects).  The attention runtime (``vtprune.runtime.size_bias``) adds
``log(size)`` to that key's logit for every query, so that the softmax weighs the token as
``size`` copies of itself (proportional attention, Bolya et al. 2023, ToMe).

Groups (``summary_group``): ``"similarity"`` — cosine k-means on the LLM-input features (seeded
by the max-min order, 10 rounds); ``"space"`` — cells of an r x c lattice laid over each grid's
normalised coordinates (the grids of one image overlaid).  A group's token (``summary_feature``):
``"mean"`` — the group's mean feature at its medoid's position; ``"medoid"`` — the member closest
to the mean (cosine), as it is; ``"first"`` — the group's first token, as it is.  Similarity groups
are never empty (an empty one takes the member that fits its group worst), so an image gets
exactly k summary tokens when k tokens are dropped; empty lattice cells (``"space"``) are skipped,
so there an image may get fewer.
"""

from __future__ import annotations

import math

import torch

from .scoring import divprune_order

GROUPS = ("similarity", "space")
FEATURES = ("mean", "medoid", "first")


def _normalise(x):
    return torch.nn.functional.normalize(x.float(), dim=-1)


def by_similarity(features: torch.Tensor, k: int, rounds: int = 10) -> torch.Tensor:
    """Group id (0 .. k-1) of every row of ``features`` [m, D]: cosine k-means, seeded by the max-min order."""
    m = features.shape[0]
    if k <= 1 or m <= 1:
        return torch.zeros(m, dtype=torch.long)
    x = _normalise(features)
    centres = x[divprune_order(features, min(k, m))]
    assign = torch.zeros(m, dtype=torch.long)
    for step in range(rounds):
        new = _fill_empty((x @ centres.T).argmax(1), x, centres)
        if step and torch.equal(new, assign):
            break
        assign = new
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        filled = torch.bincount(assign, minlength=centres.shape[0]) > 0
        centres = torch.where(filled[:, None], _normalise(sums), centres)
    return assign


def _fill_empty(assign, x, centres):
    """``assign`` with no empty group: an empty group takes the member least similar to its own centre among
    groups of two or more (so that k groups come out of m >= k tokens: a served prompt's length is fixed
    before the image is encoded)."""
    k = centres.shape[0]
    counts = torch.bincount(assign, minlength=k)
    if bool((counts > 0).all()):
        return assign
    assign = assign.clone()
    fit = (x * centres[assign]).sum(1)
    for g in (counts == 0).nonzero().squeeze(1).tolist():
        movable = counts[assign] > 1
        if not bool(movable.any()):
            break
        i = int(torch.where(movable, fit, torch.full_like(fit, float("inf"))).argmin())
        counts[assign[i]] -= 1
        counts[g] += 1
        assign[i] = g
        fit[i] = float("inf")  # it sits alone now
    return assign


def by_space(layout, members: torch.Tensor, k: int) -> torch.Tensor:
    """Group id of each token ``members`` of an image: its cell in an r x c lattice (r*c <= k, r <= c) over
    its grid's normalised coordinates."""
    if k <= 1:
        return torch.zeros(members.numel(), dtype=torch.long)
    r = max(1, math.isqrt(k))
    c = k // r
    heights = torch.tensor([h for h, _ in layout.shapes] or [1])
    widths = torch.tensor([w for _, w in layout.shapes] or [1])
    grid = layout.grid[members].clamp(min=0)
    y = (layout.row[members].clamp(min=0).float() + 0.5) / heights[grid]
    x = (layout.col[members].clamp(min=0).float() + 0.5) / widths[grid]
    return (y * r).long().clamp(max=r - 1) * c + (x * c).long().clamp(max=c - 1)


def summarise(features, layout, dropped: torch.Tensor, k: int, group: str, feature: str) -> list:
    """The summary tokens of one image: ``[(position, members, feature or None)]``.

    ``dropped`` are the image's dropped content tokens (ascending); ``position`` is the member whose
    place the token takes; ``feature`` replaces that member's feature (None: its own)."""
    if k <= 0 or dropped.numel() == 0:
        return []
    feats = features[dropped].float()
    ids = by_similarity(feats, k) if group == "similarity" else by_space(layout, dropped, k)
    out = []
    for g in ids.unique():
        inside = (ids == g).nonzero().squeeze(1)
        members = dropped[inside]
        if feature == "first":
            out.append((int(members[0]), members, None))
            continue
        mean = feats[inside].mean(0)
        medoid = int(inside[(_normalise(feats[inside]) @ _normalise(mean)).argmax()])
        out.append((int(dropped[medoid]), members, mean if feature == "mean" else None))
    return sorted(out, key=lambda s: s[0])


def nearest_sizes(features, kept: torch.Tensor, dropped: torch.Tensor, n: int) -> torch.Tensor:
    """Sizes [n] when every dropped token joins the kept token whose feature is closest (cosine)."""
    sizes = torch.ones(n)
    if kept.numel() and dropped.numel():
        assign = (_normalise(features[dropped]) @ _normalise(features[kept]).T).argmax(1)
        sizes[kept] += torch.bincount(assign, minlength=kept.numel()).float()
    return sizes
