"""HoloV (Zou et al., NeurIPS 2025, arXiv 2510.02912) — its config and selection.

An image's tokens (raster order, LLaVA-NeXT newlines left out) are cut into ``crops`` contiguous
chunks; the budget is shared among the chunks in proportion to a chunk score, and each chunk keeps
its tokens with the highest [CLS] attention.  As the HoloV code computes it: a token's score is
``1000 a + alpha * v'``, where ``a`` is its [CLS] attention and ``v'`` the variance of its cosine
similarities to the chunk's other tokens (LLM-input features), rescaled so that its chunk mean
equals the chunk mean of ``1000 a``; a chunk's score is the mean over its tokens (a chunk of one
token: its attention); allocations are ``floor(w K)`` with the remainder one each to the chunks of
largest weight ``w``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Selector, budget_groups, register
from .cls import SOURCE, _check_source


def chunk_scores(attention: torch.Tensor, features: torch.Tensor, chunks: list, alpha: float) -> torch.Tensor:
    """HoloV's score of every chunk (index tensors into ``attention`` [n] / ``features`` [n, D])."""
    out = []
    for members in chunks:
        a = attention[members].double()
        n = members.numel()
        if n <= 1:
            out.append(a.mean())
            continue
        big = 1000.0 * a
        f = features[members].double()
        f = f / (f.norm(dim=-1, keepdim=True) + 1e-6)
        sim = f @ f.T
        sim.fill_diagonal_(0.0)
        mean = sim.sum(1) / (n - 1)
        var = ((sim - mean[:, None]) ** 2).sum(1) / (n - 1)
        var = var * big.abs().mean() / (var.abs().mean() + 1e-6)
        out.append((big + alpha * var).mean())
    return torch.stack(out)


def allocate(weights: torch.Tensor, sizes: list, budget: int) -> list:
    """Tokens per chunk: ``floor(w * budget)``, the remainder one each to the largest weights; what a chunk
    cannot hold goes on to the next largest weights that can (HoloV's code drops it)."""
    order = torch.sort(weights, descending=True, stable=True).indices.tolist()
    alloc = [int(w) for w in torch.floor(weights * budget).tolist()]
    for p in order[:budget - sum(alloc)]:
        alloc[p] += 1
    spare = sum(max(0, a - s) for a, s in zip(alloc, sizes))
    alloc = [min(a, s) for a, s in zip(alloc, sizes)]
    while spare > 0 and any(a < s for a, s in zip(alloc, sizes)):
        for p in order:
            if spare and alloc[p] < sizes[p]:
                alloc[p] += 1
                spare -= 1
    return alloc


@register("holov")
@dataclass
class HoloV(Selector):
    """Holistic budget: chunks of the image share the budget by their attention, then keep their top tokens (HoloV).

    ``crops`` contiguous chunks of each image's (``scope="tile"``: each tile's) tokens in raster order
    (None: the code's rule, ``int(16/9 * n / budget)`` — 16 chunks of 36 tokens for 64 of LLaVA-1.5's
    576); a chunk's share follows its score (the mean of ``1000 a + alpha * v'``, ``a`` the [CLS]
    attention of the layer the projector reads, ``v'`` the rescaled variance of the token's feature
    similarities in the chunk — as rescaled, the shares come out nearly proportional to the chunk's
    mean attention); a chunk keeps its highest-attention tokens.  Differences from the HoloV code:
    kept tokens enter in original order (the code feeds each chunk's in attention order); budget a
    chunk cannot hold moves to the next chunks instead of zero-padding the sequence; LLaVA-NeXT's
    newline tokens follow their rows as for every selector.
    """

    paper: ClassVar[str] = "HoloV: Zou et al., NeurIPS 2025, arXiv 2510.02912"
    ranges: ClassVar[dict] = {"crops": "int >= 1 or None (the code's rule from the budget)",
                              "alpha": "float >= 0: weight of the similarity-variance term", "source": SOURCE}
    needs_cls: ClassVar[bool] = True
    crops: int | None = None
    alpha: float = 0.09
    source: str | None = None

    def validate(self):
        super().validate()
        _check_source(self.source)
        if self.crops is not None and (isinstance(self.crops, bool) or not isinstance(self.crops, int) or self.crops < 1):
            raise ValueError(f"holov crops must be an int >= 1 or None, got {self.crops!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or self.alpha < 0:
            raise ValueError(f"holov alpha must be a float >= 0, got {self.alpha!r}")

    def tower_layers(self, n_layers, feature_layer):
        return [feature_layer]

    def choose(self, attention, features, members, budget) -> torch.Tensor:
        """Kept indices among ``members`` (an image's or tile's content tokens in raster order)."""
        n = members.numel()
        budget = min(budget, n)
        if budget <= 0:
            return members[:0]
        crops = self.crops if self.crops is not None else max(1, int((1024 / 576) * n / budget))
        crops = min(crops, n)
        base, extra = divmod(n, crops)
        chunks = list(torch.split(members, [base + (p < extra) for p in range(crops)]))
        scores = chunk_scores(attention, features, chunks, self.alpha)
        alloc = allocate(scores / (scores.sum() + 1e-6), [c.numel() for c in chunks], budget)
        kept = [c[torch.sort(attention[c], descending=True, stable=True).indices[:k]] for c, k in zip(chunks, alloc)]
        return torch.cat(kept)

    def score(self, ctx):
        (layer,) = ctx.cls_attention
        scores = []
        for i, (layout, k) in enumerate(zip(ctx.layouts, ctx.budgets)):
            attention = ctx.cls_attention[layer][i].float().cpu()
            s = torch.zeros(layout.n)
            for members, budget in budget_groups(layout, k):
                s[self.choose(attention, ctx.features[i].cpu(), members, budget)] = 1.0
            scores.append(s)
        return scores
