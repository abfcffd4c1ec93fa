"""What a served model keeps of an image, free of vLLM: the kept count (which sizes the prompt) and the kept
rows (which the model's multimodal embedding returns), by the same vtprune method as the HF wrap."""

from __future__ import annotations

import collections

import torch

from ..choose import Seen, choose
from ..layout import ImageLayout
from . import request_keep


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


def kept_count(config, n: int, grid=None, layout=None) -> int:
    """How many of an image's ``n`` tokens (on ``grid``, or a full ``layout``) the served method keeps
    (``Selector.kept_count``): a function of the image's layout and ``keep`` only, as vLLM sizes a prompt
    before the image is encoded; the ``keep`` of the request being processed where it gives one
    (``vtprune.serving.request_keep``)."""
    return request_keep.kept_count(config, layout if layout is not None else layout_of(n, grid))


def select(config, features: torch.Tensor, generator, tower: dict | None = None, grid=None, layout=None) -> tuple:
    """``(kept indices, rows, bias or None)``: which of one image's features [n, D] (on ``grid``, or a full
    ``layout``) enter the LLM, the rows that do (merged rows for ``pool``, summary tokens' means) and, for a
    config that ``weighs`` (summary tokens, ``size_bias``), each kept row's attention bias ``log(size)``.
    ``tower``: the image's tower scores for [CLS] methods (``vtprune.serving.tower.TowerTap.image``); the
    choice is ``vtprune.choose.choose``'s, as on the HF wrap."""
    layout = layout if layout is not None else layout_of(features.shape[0], grid)
    seen = Seen(layout, features.float().cpu())
    if tower is not None:
        seen.cls = tower["cls"]
        seen.selected, seen.sizes = tower.get("selected"), tower.get("sizes")
    (choice,) = choose(config, [seen], generator)
    kept = choice.kept
    out = features[kept.to(features.device)]
    if choice.replacement is not None:  # pool: the windows' means at their anchors; summary tokens: their means
        anchors, merged = choice.replacement
        position = {int(a): i for i, a in enumerate(kept.tolist())}
        out = out.clone()
        for a, row in zip(anchors.tolist(), merged):
            out[position[a]] = row.to(out.dtype)
    bias = None
    if config.weighs:
        bias = (choice.sizes[kept] if choice.sizes is not None else torch.ones(kept.numel())).float().log()
    return kept, out, bias


def attach(model, config):
    """What every pruned vLLM class carries: the last images' kept indices (``vtprune.serving.last_kept``),
    the seeded generator of the method's random draws and, for a config that weighs, the attention bias
    (``vtprune.serving.slot_bias.SlotBias``)."""
    model.vtprune_kept = collections.deque(maxlen=4096)
    model.vtprune_generator = torch.Generator().manual_seed(int(getattr(config, "seed", 0)))
    model.vtprune_bias = None
    if config.weighs:  # summary tokens, size_bias: the bias inside vLLM's attention
        from .slot_bias import SlotBias

        model.vtprune_bias = SlotBias.for_model(model, config)


def keep_rows(model, config, rows: torch.Tensor, tower=None, grid=None, layout=None) -> tuple:
    """``select`` for a served ``model`` (``attach``-ed): its generator, its log of kept indices, the next image's
    budget where its request gave one (``Weighing`` queues them as each binding's ``embed_multimodal`` starts)."""
    budgets = getattr(model, "vtprune_budgets", None)
    if budgets:
        config = budgets.popleft()
    kept, rows, bias = select(config, rows, model.vtprune_generator, tower, grid, layout)
    model.vtprune_kept.append(kept.tolist())
    return kept, rows, bias


def with_bias(rows: torch.Tensor, bias) -> torch.Tensor:
    """An image's kept rows with their attention bias as one more column (``vtprune.serving.slot_bias`` reads it
    off and drops it before the LLM); the rows as they are when the config does not weigh."""
    return rows if bias is None else torch.cat([rows, bias.to(rows.device, rows.dtype)[:, None]], 1)
