"""Controls and baselines that need no model internals: random, uniform, pool, divprune."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..budget import check_keep
from ..scoring import divprune_order, pool_windows, total_budget, uniform_scores
from .base import Method, Selector, budget_groups, budget_of, register

@register("random")
@dataclass
class Random(Selector):
    """Keep a random subset of each image's tokens: the control every method must beat.

    Draws come from a generator seeded with ``seed`` when the model is wrapped, so a run is
    reproducible; successive forward passes draw new subsets.
    """

    ranges: ClassVar[dict] = {"seed": "int: the generator's seed at wrap time"}
    seed: int = 0

    def score(self, ctx):
        return [torch.rand(layout.n, generator=ctx.generator) for layout in ctx.layouts]


@register("uniform")
@dataclass
class Uniform(Selector):
    """Keep tokens spread evenly over each image's token grid (a strided lattice per grid)."""

    def score(self, ctx):
        return [uniform_scores(layout, total_budget(k)) for layout, k in zip(ctx.layouts, ctx.budgets)]


@register("pool")
@dataclass
class Pool(Selector):
    """Average-pool each image's token grids down to the budget (a control, like ``uniform``).

    Each grid (LLaVA image, LLaVA-NeXT base image and crop grid, InternVL tile, Qwen frame) gets a
    share of the budget in proportion to its size and is split into an r x c grid of adaptive
    windows (the most windows, r*c <= its share, none more than twice as long as wide:
    ``vtprune.scoring.pool_grid``; window edges as in ``adaptive_avg_pool2d``).  A window's mean feature
    enters the LLM at the position of the window's first token (its top-left cell); the other tokens of
    the window are dropped, so positions stay original.  The realized count can be under ``keep``.  With
    ``size_bias=True`` a window's token weighs as many tokens as the window holds.
    """

    covers_all: ClassVar[bool] = True

    @property
    def inert(self) -> bool:  # the windows' means replace the features
        return False

    def kept_count(self, layout):  # its windows' anchors (a little under the budget where windows do not fit)
        anchors, _ = pool_windows(layout, total_budget(budget_of(self, layout)))
        return int(anchors.numel()) + self.kept_newlines(layout)

    def score(self, ctx):
        scores = []
        for i, (layout, k) in enumerate(zip(ctx.layouts, ctx.budgets)):
            anchors, members = pool_windows(layout, total_budget(k))
            features = ctx.features[i]
            merged = torch.stack([features[m].float().mean(0) for m in members]) if anchors.numel() else None
            ctx.replacements[i] = (anchors, merged) if merged is not None else None
            ctx.members[i] = list(zip(anchors.tolist(), members))
            ctx.budgets[i] = anchors.numel()
            s = torch.zeros(layout.n)
            s[anchors] = 1.0
            ctx.sizes[i] = torch.ones(layout.n)
            if anchors.numel():
                ctx.sizes[i][anchors] = torch.tensor([float(m.numel()) for m in members])
            scores.append(s)
        return scores


@register("divprune")
@dataclass
class DivPrune(Selector):
    """Max-min diversity selection over the visual features fed to the LLM (DivPrune, CVPR 2025).

    As the DivPrune code does: distances are 1 - cosine similarity of the LLM-input features; the
    first token is the one farthest from its nearest neighbour, then greedily the token whose
    distance to the nearest already chosen token is largest, until the budget is met (ties: the
    earliest token).  Needs no [CLS] and no attention map.  Kept tokens enter in original order.
    """

    paper: ClassVar[str] = "DivPrune: Alvar et al., CVPR 2025, arXiv 2503.02175"

    def score(self, ctx):
        scores = []
        for i, (layout, k) in enumerate(zip(ctx.layouts, ctx.budgets)):
            s = torch.full((layout.n,), float("-inf"))
            for members, budget in budget_groups(layout, k):
                order = divprune_order(ctx.features[i][members], min(budget, members.numel()))
                s[members[order]] = torch.arange(order.numel(), 0, -1, dtype=torch.float32)
            scores.append(s)
        return scores


@register("downsample")
@dataclass
class Downsample(Method):
    """A smaller image instead of fewer tokens; acts on the processor, not the model.

    ``processor = vtprune.downsample(processor, keep=0.25)`` for dynamic-resolution families;
    ``vtprune eval`` and the lmms-eval plugin apply it for you. LLaVA-1.5 has a fixed resolution:
    use ``pool`` there."""

    stage: ClassVar[str] = "input"
    ranges: ClassVar[dict] = {"keep": "float in (0, 1]: the share of the image's tokens the smaller image yields; "
                                      "int >= 1: tokens per image"}
    keep: float = 0.5

    def validate(self):
        self.keep = check_keep(self.keep)
