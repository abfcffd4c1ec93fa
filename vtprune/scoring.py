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


def share_budget(sizes: list, k: int) -> list:
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
    for g, kg in enumerate(share_budget(sizes, k)):
        h, w = layout.shapes[g]
        members = (in_grid & (layout.grid == g)).nonzero().squeeze(1)
        cell = layout.row[members] * w + layout.col[members]
        chosen = torch.isin(cell, lattice(h, w, kg))
        scores[members[chosen]] = 1.0
    return scores


def total_budget(k) -> int:
    """An image's budget as one number (``scope="tile"`` budgets are per-tile dicts)."""
    return sum(k.values()) if isinstance(k, dict) else k


ASPECT = 2.0  # a pooling window may be at most this much taller than wide, or wider than tall


def pool_grid(h: int, w: int, k: int) -> tuple:
    """The r x c window grid for pooling an h x w grid to at most k tokens.

    The windows stay compact: among r x c <= k whose window, (h/r) x (w/c) cells, is at most ``ASPECT``
    (2) times taller than wide or wider than tall, the most windows; ties go to the squarest. A grid
    so elongated that no window shape qualifies takes the squarest windows there are, then the most.
    (Counting alone would pool 16 x 16 to 26 tokens as 2 x 13 windows of 8 x 1.2 cells; this gives 5 x 5.)
    """
    k = max(1, min(k, h * w))
    best = None
    for r in range(1, h + 1):
        for c in range(1, min(w, k // r) + 1):
            skew = abs(math.log((h / r) / (w / c)))
            fits = skew <= math.log(ASPECT) + 1e-9
            key = (fits, r * c if fits else -skew, -skew if fits else r * c)
            if best is None or key > best[0]:
                best = (key, (r, c))
    return best[1]


def pool_windows(layout: ImageLayout, k: int) -> tuple:
    """Anchor token (top-left cell) and member tokens of every pooling window of an image.

    Returns ``(anchors LongTensor [m], members list of LongTensor)``; windows follow
    ``adaptive_avg_pool2d``: rows ``floor(i*h/r) .. ceil((i+1)*h/r)``, columns likewise.
    """
    anchors, members = [], []
    sizes = [h * w for h, w in layout.shapes]
    in_grid = (layout.grid >= 0) & ~layout.newline
    for g, kg in enumerate(share_budget(sizes, k)):
        if kg == 0:
            continue
        h, w = layout.shapes[g]
        r, c = pool_grid(h, w, kg)
        tokens = (in_grid & (layout.grid == g)).nonzero().squeeze(1)
        rows, cols = layout.row[tokens], layout.col[tokens]
        for i in range(r):
            r0, r1 = (i * h) // r, -((-(i + 1) * h) // r)
            for j in range(c):
                c0, c1 = (j * w) // c, -((-(j + 1) * w) // c)
                inside = tokens[(rows >= r0) & (rows < r1) & (cols >= c0) & (cols < c1)]
                if inside.numel():
                    anchors.append(int(inside.min()))
                    members.append(inside)
    return torch.tensor(anchors, dtype=torch.long), members


def divprune_order(features: torch.Tensor, k: int) -> torch.Tensor:
    """DivPrune's greedy max-min order of ``k`` rows of ``features`` [n, D] (cosine distance)."""
    n = features.shape[0]
    if k <= 0 or n == 0:
        return torch.zeros(0, dtype=torch.long)
    x = torch.nn.functional.normalize(features.float(), dim=-1)
    dist = 1.0 - x @ x.T
    if n == 1:
        return torch.zeros(1, dtype=torch.long)
    first = int(torch.topk(dist, 2, dim=0, largest=False).values[1].argmax())
    order = [first]
    nearest = dist[first].clone()
    for _ in range(1, k):
        nxt = int(nearest.argmax())
        order.append(nxt)
        nearest = torch.minimum(nearest, dist[nxt])
    return torch.tensor(order, dtype=torch.long)


def density_peaks(x: torch.Tensor, k: int) -> tuple:
    """DPC-kNN (density peaks with k nearest neighbours) on the rows of ``x`` [m, D]: ``(score [m], d [m, m])``
    with ``d`` the Euclidean distances / sqrt(D), ``rho = exp(-mean of the k smallest d^2)`` (a row is its own
    nearest), ``delta`` the distance to the nearest denser row (the largest distance for the densest) and
    ``score = rho delta``; cluster centres are the highest scores (FastVID, FlashVID, HoliTom)."""
    m, dim = x.shape
    d = torch.cdist(x.float()[None], x.float()[None])[0] / math.sqrt(dim)
    rho = (-(torch.topk(d, k=max(1, min(k, m)), dim=-1, largest=False).values ** 2).mean(-1)).exp()
    denser = rho[None, :] > rho[:, None]
    delta = torch.where(denser, d, d.max()).min(-1).values
    return delta * rho, d
