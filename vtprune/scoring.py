"""Per-image token scores that need no model internals: the `random` and `uniform` controls."""

from __future__ import annotations

import math

import torch

from .layout import ImageLayout


def lattice(h: int, w: int, k: int) -> torch.Tensor:
    """``k`` raster indices spread evenly over an ``h`` x ``w`` grid (k <= h*w)."""
    k = max(0, min(k, h * w))
    if k == 0:
        return torch.zeros(0, dtype=torch.long)
    r = max(1, min(h, round(math.sqrt(k * h / w))))
    c = max(1, min(w, math.ceil(k / r)))
    if r * c < k:
        r = min(h, math.ceil(k / c))
    rows = ((torch.arange(r) + 0.5) * h / r).floor().long()
    cols = ((torch.arange(c) + 0.5) * w / c).floor().long()
    points = (rows[:, None] * w + cols[None, :]).flatten()
    pick = ((torch.arange(k) + 0.5) * points.numel() / k).floor().long()
    return points[pick]


def split_budget(sizes: list, k: int) -> list:
    """Share ``k`` tokens among grids of ``sizes`` in proportion (largest remainder), capped by size."""
    total = sum(sizes)
    if total == 0:
        return [0] * len(sizes)
    exact = [k * s / total for s in sizes]
    alloc = [min(s, math.floor(e)) for s, e in zip(sizes, exact)]
    order = sorted(range(len(sizes)), key=lambda g: exact[g] - math.floor(exact[g]), reverse=True)
    left = k - sum(alloc)
    while left > 0:
        progressed = False
        for g in order:
            if left and alloc[g] < sizes[g]:
                alloc[g] += 1
                left -= 1
                progressed = True
        if not progressed:
            break
    return alloc


def uniform_scores(layout: ImageLayout, k: int) -> torch.Tensor:
    """Score 1 on ``k`` tokens spread evenly over the image's grids, 0 elsewhere."""
    scores = torch.zeros(layout.n)
    in_grid = (layout.grid >= 0) & ~layout.newline
    sizes = [h * w for h, w in layout.shapes]
    for g, kg in enumerate(split_budget(sizes, k)):
        h, w = layout.shapes[g]
        members = (in_grid & (layout.grid == g)).nonzero().squeeze(1)
        cell = layout.row[members] * w + layout.col[members]
        chosen = torch.isin(cell, lattice(h, w, kg))
        scores[members[chosen]] = 1.0
    return scores
