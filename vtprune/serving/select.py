"""What a served model keeps of an image, free of vLLM: the kept count (which sizes the prompt) and the kept
rows (which the model's multimodal embedding returns), by the same vtprune method as the HF wrap."""

from __future__ import annotations

import collections

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


def kept_count(config, n: int, grid=None, newlines: int = 0) -> int:
    """How many of an image's ``n`` tokens (on ``grid``; ``newlines`` of them LLaVA-NeXT row separators, all
    kept: ``newlines="all"``) the served method keeps: a function of the image's token grid and ``keep``
    only, as vLLM sizes a prompt before the image is encoded."""
    if newlines:
        return tokens_to_keep(config.keep, n - newlines) + newlines
    k = tokens_to_keep(config.keep, n)
    if config.name == "pool":
        anchors, _ = pool_windows(layout_of(n, grid), total_budget(k))
        return int(anchors.numel())
    return k


def select(config, features: torch.Tensor, generator, tower: dict | None = None, grid=None, layout=None) -> tuple:
    """``(kept indices, rows)``: which of one image's features [n, D] (on ``grid``, or a full ``layout``) enter
    the LLM, and the rows that do (merged rows for ``pool``).  ``tower``: the image's tower scores for [CLS]
    methods (``vtprune.serving.tower.TowerTap.image``)."""
    n = features.shape[0]
    layout = layout if layout is not None else layout_of(n, grid)
    k = tokens_to_keep(config.keep, layout.n_content)
    ctx = ScoreContext(layouts=[layout], budgets=[k], rows=[0], features=[features.float().cpu()],
                       generator=generator)
    if tower is not None:
        ctx.cls_attention = {layer: [scores] for layer, scores in tower["cls"].items()}
        if tower.get("selected") is not None:
            ctx.tower_selected = [(tower["selected"] > 0).float()]
            ctx.tower_sizes = [tower["sizes"]]
    (scores,) = config.score(ctx)
    kept = top_tokens(scores, layout, ctx.budgets[0], config.newlines)
    out = features[kept.to(features.device)]
    if ctx.replacements[0] is not None:  # pool: the windows' means at their anchors
        anchors, merged = ctx.replacements[0]
        position = {int(a): i for i, a in enumerate(kept.tolist())}
        out = out.clone()
        for a, row in zip(anchors.tolist(), merged):
            out[position[a]] = row.to(out.dtype)
    return kept, out


def attach(model, config):
    """What every pruned vLLM class carries: the last images' kept indices (``vtprune.serving.last_kept``)
    and the seeded generator of the method's random draws."""
    model.vtprune_kept = collections.deque(maxlen=4096)
    model.vtprune_generator = torch.Generator().manual_seed(int(getattr(config, "seed", 0)))


def keep_rows(model, config, rows: torch.Tensor, tower=None, grid=None, layout=None) -> tuple:
    """``select`` for a served ``model`` (``attach``-ed): its generator, its log of kept indices."""
    kept, rows = select(config, rows, model.vtprune_generator, tower, grid, layout)
    model.vtprune_kept.append(kept.tolist())
    return kept, rows
