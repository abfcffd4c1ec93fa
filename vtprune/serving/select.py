"""What a served model keeps of an image, free of vLLM: the kept count (which sizes the prompt) and the kept
rows (which the model's multimodal embedding returns), by the same vtprune method as the HF wrap."""

from __future__ import annotations

import torch

from ..budget import tokens_to_keep
from ..layout import ImageLayout
from ..methods import ScoreContext
from ..scoring import pool_windows, total_budget
from ..select import top_tokens


def layout_of(n: int, grid=None) -> ImageLayout:
    """An image's ``n`` LLM tokens: a ``grid`` (rows, columns) or a list of them (tiles, in order), by default
    the square one where ``n`` is square."""
    if grid is None:
        side = int(round(n ** 0.5))
        grid = (side, n // side) if side * (n // side) == n else None
    if grid is None:
        return ImageLayout.flat(n)
    grids = [tuple(g) for g in grid] if isinstance(grid[0], (list, tuple)) else [tuple(grid)]
    if sum(h * w for h, w in grids) != n:
        raise ValueError(f"an image of {n} tokens cannot lie on the grids {grids}")
    return ImageLayout.from_grids(grids)


def kept_count(config, n: int, grid=None) -> int:
    """How many of an image's ``n`` tokens (on ``grid``) the served method keeps: a function of the image's
    token grid and ``keep`` only, as vLLM sizes a prompt before the image is encoded."""
    k = tokens_to_keep(config.keep, n)
    if config.name == "pool":
        anchors, _ = pool_windows(layout_of(n, grid), total_budget(k))
        return int(anchors.numel())
    return k


def select(config, features: torch.Tensor, generator, tower: dict | None = None, grid=None) -> tuple:
    """``(kept indices, rows)``: which of one image's features [n, D] (on ``grid``) enter the LLM, and the rows
    that do (merged rows for ``pool``).  ``tower``: the image's tower scores for [CLS] methods
    (``vtprune.serving.tower.TowerTap.image``)."""
    n = features.shape[0]
    layout = layout_of(n, grid)
    k = tokens_to_keep(config.keep, n)
    ctx = ScoreContext(layouts=[layout], budgets=[k], rows=[0], features=[features.float().cpu()],
                       generator=generator)
    if tower is not None:
        ctx.cls_attention = {layer: [scores] for layer, scores in tower["cls"].items()}
        if tower.get("selected") is not None:
            ctx.tower_selected = [(tower["selected"] > 0).float()]
            ctx.tower_sizes = [tower["sizes"]]
    (scores,) = config.score(ctx)
    kept = top_tokens(scores, layout, ctx.budgets[0])
    out = features[kept.to(features.device)]
    if ctx.replacements[0] is not None:  # pool: the windows' means at their anchors
        anchors, merged = ctx.replacements[0]
        position = {int(a): i for i, a in enumerate(kept.tolist())}
        out = out.clone()
        for a, row in zip(anchors.tolist(), merged):
            out[position[a]] = row.to(out.dtype)
    return kept, out
