"""A cut's rectangular index: per-row keep lists made one [B, L'] gather (the pre-LLM cut, in-LLM exits)."""

from __future__ import annotations

import torch


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
