"""Turn per-image scores into kept indices, and per-row keep lists into a rectangular cut."""

from __future__ import annotations

import torch

from .layout import ImageLayout


def top_tokens(scores: torch.Tensor, layout: ImageLayout, k, newlines: str = "rows") -> torch.Tensor:
    """Indices (ascending) of the best content tokens of one image, plus the newlines of kept rows.

    ``k`` is the image's budget, or a dict ``{tile: budget}`` to choose within each tile.  Ties are
    broken by position (earlier first).  A LLaVA-NeXT newline token is kept exactly when its row
    keeps at least one token, so that every kept row still ends with its separator; with
    ``newlines="all"`` every newline is kept (a count that does not depend on the selection).
    """
    scores = scores.detach().float().cpu()
    if scores.shape != (layout.n,):
        raise ValueError(f"a method returned {tuple(scores.shape)} scores for an image of {layout.n} tokens")
    content = ~layout.newline
    groups = {None: content} if not isinstance(k, dict) else {t: content & (layout.tiles == t) for t in k}
    keep = torch.zeros(layout.n, dtype=torch.bool)
    for group, members in groups.items():
        budget = min(k if group is None else k[group], int(members.sum()))
        order = torch.sort(scores.masked_fill(~members, float("-inf")), descending=True, stable=True).indices
        keep[order[:budget]] = True
    if newlines == "all":
        keep |= layout.newline
    elif layout.newline.any():
        row_key = layout.grid * (int(layout.row.max()) + 1) + layout.row
        kept_rows = row_key[keep]
        keep |= layout.newline & torch.isin(row_key, kept_rows)
    return keep.nonzero().squeeze(1)


def plan_cut(keep_rows: list, length: int, device) -> tuple:
    """Make per-row keep lists rectangular.

    ``keep_rows[b]`` is the ascending LongTensor of positions row ``b`` keeps.  Rows that keep
    fewer positions than the longest row are padded at the front with masked copies of position 0,
    exactly like left padding.  Returns ``(index [B, L'], real [B, L'] bool)``; ``real`` is False on
    the padding slots.
    """
    width = max(int(k.numel()) for k in keep_rows)
    index = torch.zeros(len(keep_rows), width, dtype=torch.long)
    real = torch.zeros(len(keep_rows), width, dtype=torch.bool)
    for b, k in enumerate(keep_rows):
        index[b, width - k.numel():] = k
        real[b, width - k.numel():] = True
    return index.to(device), real.to(device)
