"""Attention masks beyond the 2-D padding mask: 4-D masks and per-layer-type dicts of them.

transformers accepts, besides a 2-D padding mask, a 4-D mask ``[B|1, H|1, q, kv]`` (a custom mask
such as packed sequences' block-diagonal one, or the mask ``generate`` builds for a static cache)
and, since 5.x, a dict ``{layer type: 4-D mask}``.  A mask is boolean (True = may attend) or
additive float (0 = may attend, the dtype's minimum = blocked).  The pre-LLM cut re-indexes them
like the sequence:

* ``cut_chunk``: a call's query rows and its own key columns lose the dropped tokens; padding
  slots of the cut (``real`` False) attend only to themselves and nobody attends to them.
* ``to_cache``: a later call's mask written against the original sequence gets the columns of
  the tokens the (pruned) cache actually holds.
"""

from __future__ import annotations

import torch


def is_4d(mask) -> bool:
    """A 4-D mask tensor, or a dict of them (per layer type)."""
    if isinstance(mask, dict):
        return True
    return isinstance(mask, torch.Tensor) and mask.dim() == 4


def apply(mask, fn):
    """``fn`` on a 4-D mask, or on every (non-None) mask of a dict."""
    if isinstance(mask, dict):
        return {k: (fn(v) if v is not None else None) for k, v in mask.items()}
    return fn(mask)


def primary(mask):
    """The mask of full-attention layers (of a dict: its ``full_attention`` entry, else the first one)."""
    if isinstance(mask, dict):
        return mask.get("full_attention", next((m for m in mask.values() if m is not None), None))
    return mask


def present(mask, start: int, q: int):
    """Bool [B|1, q]: whether any query may attend to key columns ``start .. start+q-1`` (a column
    nobody attends to is padding)."""
    cols = mask[..., start:start + q]
    allowed = cols if cols.dtype == torch.bool else cols > torch.finfo(cols.dtype).min / 2
    return allowed.any(-2).any(1)


def _blocked_value(mask):
    return False if mask.dtype == torch.bool else torch.finfo(mask.dtype).min


def _block(mask, where):
    """``mask`` with the positions ``where`` (broadcastable bool) blocked."""
    return mask & ~where if mask.dtype == torch.bool else mask.masked_fill(where, torch.finfo(mask.dtype).min)


def _allow(mask, where):
    return mask | where if mask.dtype == torch.bool else mask.masked_fill(where, 0.0)


def _rows(mask, batch):
    return mask.expand(batch, *mask.shape[1:]) if mask.shape[0] != batch else mask


def cut_chunk(mask, index, real, past: int, q: int):
    """Cut a 4-D mask of a call whose ``q`` new tokens (key columns ``past .. past+q-1``) are cut to
    ``index`` [B, L'] (``real`` False on padding slots).

    Rows and the chunk's columns are gathered; columns before ``past`` (the cache) stay.  When the
    mask is wider than ``past + q`` (a static cache: unfilled slots follow) it keeps its width, the
    freed slots blocked.
    """
    index = index.to(mask.device)
    real = real.to(mask.device)
    b, width = index.shape
    m = _rows(mask, b)
    heads, kv = m.shape[1], m.shape[-1]
    m = m.gather(-2, index[:, None, :, None].expand(b, heads, width, kv))
    chunk = m[..., past:past + q].gather(-1, index[:, None, None, :].expand(b, heads, width, width))
    parts = [m[..., :past], chunk]
    if kv > past + q:
        parts.append(torch.full((b, heads, width, kv - past - width), _blocked_value(m), dtype=m.dtype,
                                device=m.device))
    out = torch.cat(parts, -1)
    cols = torch.zeros(b, out.shape[-1], dtype=torch.bool, device=out.device)
    cols[:, past:past + width] = ~real
    out = _block(out, cols[:, None, None, :])
    own = torch.zeros(b, 1, width, out.shape[-1], dtype=torch.bool, device=out.device)
    slots = torch.arange(width, device=out.device)
    own[:, 0, slots, past + slots] = ~real
    out = _block(out, (~real)[:, None, :, None] & ~own)
    return _allow(out, own)


def to_cache(mask, slots, live):
    """Re-index a 4-D mask written against the original sequence (``kv`` = original length + q) to
    the cache: ``slots`` [B, S] are the original positions the cache's S entries hold, ``live``
    [B, S] False on the cut's padding slots (blocked).  The call's own q columns follow unchanged."""
    slots = slots.to(mask.device)
    live = live.to(mask.device)
    b, s = slots.shape
    m = _rows(mask, b)
    orig = m.shape[-1] - m.shape[-2]
    cached = m[..., :orig].gather(-1, slots[:, None, None, :].expand(b, m.shape[1], m.shape[2], s))
    cached = _block(cached, (~live)[:, None, None, :])
    return torch.cat([cached, m[..., orig:]], -1)
