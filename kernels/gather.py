"""Torch references: the cut (kept rows of embeddings, mask and positions)."""

from __future__ import annotations

import torch


def gather_cut(embeds: torch.Tensor, index: torch.Tensor, real: torch.Tensor, mask=None, positions=None):
    """Cut ``embeds`` [B, L, D], ``mask`` [B, L] and ``positions`` ([B, L] or [P, B, L]) along L.

    ``index`` [B, L'] holds the kept positions of each row, ``real`` [B, L'] is False on padding
    slots (which get mask 0).  A missing mask becomes all ones (0 on padding slots).  Positions
    keep their original values.  Returns ``(embeds, mask, positions)``.
    """
    b, _, d = embeds.shape
    out = embeds.gather(1, index.to(embeds.device)[..., None].expand(b, -1, d))
    real = real.to(embeds.device)
    if mask is None:
        new_mask = real.long()
    else:
        new_mask = mask.gather(1, index.to(mask.device)) * real.to(mask.device, mask.dtype)
    if positions is not None:
        positions = gather_positions(positions, index)
    return out, new_mask, positions


def gather_positions(positions: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Position ids ``[B|1, L]`` or ``[P, B|1, L]`` (Qwen's mrope rows) at ``index`` [B, L'] of each row."""
    idx = index.to(positions.device)
    batch = idx.shape[0]
    if positions.shape[-2] != batch:
        positions = positions.expand(*positions.shape[:-2], batch, positions.shape[-1])
    if positions.dim() == 3:
        idx = idx.expand(positions.shape[0], -1, -1)
    return positions.gather(-1, idx)
