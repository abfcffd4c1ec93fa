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
from ..selection import split_budget, summarise_image


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


def kept_count(config, n: int, grid=None, newlines: int = 0, layout=None) -> int:
    """How many of an image's ``n`` tokens (on ``grid``, or a full ``layout``; ``newlines`` of them LLaVA-NeXT
    row separators, all kept: ``newlines="all"``) the served method keeps: a function of the image's token
    grid and ``keep`` only, as vLLM sizes a prompt before the image is encoded."""
    k = tokens_to_keep(config.keep, n - newlines)
    if config.merges:  # VisionZip keeps a share of every tower tile (one per grid)
        grids = layout.shapes if layout is not None else layout_of(n, grid).shapes
        k = sum(tokens_to_keep(config.keep, h * w) for h, w in grids) if grids else k
    if config.name == "pool":
        anchors, _ = pool_windows(layout if layout is not None else layout_of(n, grid), total_budget(k))
        k = int(anchors.numel())
    return k + newlines


def select(config, features: torch.Tensor, generator, tower: dict | None = None, grid=None, layout=None) -> tuple:
    """``(kept indices, rows, bias or None)``: which of one image's features [n, D] (on ``grid``, or a full
    ``layout``) enter the LLM, the rows that do (merged rows for ``pool``, summary tokens' means) and, for a
    config that ``weighs`` (summary tokens, ``size_bias``), each kept row's attention bias ``log(size)``.
    ``tower``: the image's tower scores for [CLS] methods (``vtprune.serving.tower.TowerTap.image``)."""
    n = features.shape[0]
    layout = layout if layout is not None else layout_of(n, grid)
    budget, wanted = split_budget(config.summary, tokens_to_keep(config.keep, layout.n_content))
    cpu = features.float().cpu()
    ctx = ScoreContext(layouts=[layout], budgets=[budget], rows=[0], features=[cpu], generator=generator)
    if tower is not None:
        ctx.cls_attention = {layer: [scores] for layer, scores in tower["cls"].items()}
        if tower.get("selected") is not None:
            ctx.tower_selected = [(tower["selected"] > 0).float()]
            ctx.tower_sizes = [tower["sizes"]]
    (scores,) = config.score(ctx)
    kept = top_tokens(scores, layout, ctx.budgets[0], config.newlines)
    kept, _, sizes, summary = summarise_image(config, layout, cpu, kept, wanted, ctx.sizes[0])
    replacement = ctx.replacements[0] if summary is None else summary
    out = features[kept.to(features.device)]
    if replacement is not None:  # pool: the windows' means at their anchors; summary tokens: their groups' means
        anchors, merged = replacement
        position = {int(a): i for i, a in enumerate(kept.tolist())}
        out = out.clone()
        for a, row in zip(anchors.tolist(), merged):
            out[position[a]] = row.to(out.dtype)
    bias = None
    if config.weighs:
        bias = (sizes[kept] if sizes is not None else torch.ones(kept.numel())).float().log()
    return kept, out, bias


def attach(model, config):
    """What every pruned vLLM class carries: the last images' kept indices (``vtprune.serving.last_kept``),
    the seeded generator of the method's random draws and, for a config that weighs, the attention bias
    (``vtprune.serving.bias.SlotBias``)."""
    model.vtprune_kept = collections.deque(maxlen=4096)
    model.vtprune_generator = torch.Generator().manual_seed(int(getattr(config, "seed", 0)))
    model.vtprune_bias = None
    if config.weighs:  # summary tokens, size_bias: the bias inside vLLM's attention
        from .bias import SlotBias

        model.vtprune_bias = SlotBias.for_model(model, config)


def keep_rows(model, config, rows: torch.Tensor, tower=None, grid=None, layout=None) -> tuple:
    """``select`` for a served ``model`` (``attach``-ed): its generator, its log of kept indices."""
    kept, rows, bias = select(config, rows, model.vtprune_generator, tower, grid, layout)
    model.vtprune_kept.append(kept.tolist())
    return kept, rows, bias


def with_bias(rows: torch.Tensor, bias) -> torch.Tensor:
    """An image's kept rows with their attention bias as one more column (``vtprune.serving.bias`` reads it
    off and drops it before the LLM); the rows as they are when the config does not weigh."""
    return rows if bias is None else torch.cat([rows, bias.to(rows.device, rows.dtype)[:, None]], 1)
