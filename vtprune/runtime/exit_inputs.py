"""The inputs of the decoder layers that visual tokens have left (``vtprune.runtime.exit``): the attention mask,
position embeddings and ids of every layer from a stage's on, cut to the tokens still there."""

from __future__ import annotations

import torch

from vtprune.kernels import gather_positions, gather_seq

from ..attention import allowed_keys
from ..compat import cache_of


def cut_kwargs(kwargs, prefill: bool, plan, past: int, q: int, rows: int | None = None) -> dict:
    """The attention mask, position embeddings and ids for the layers of ``plan`` (a stage's cut) in a call
    of ``q`` tokens after ``past`` cached ones (``prefill``: the call that made the plan; ``rows``: the model
    runs these layers on the prefill's last ``rows`` queries only, and sliced their mask and position
    embeddings so)."""
    index, real = plan["index"], plan["real"]
    out = {}
    mask = kwargs.get("attention_mask")
    q_index = None
    if prefill:
        q_index = index if rows is None else index[:, -rows:]
        pe = kwargs.get("position_embeddings")
        if pe is not None and rows is None:
            out["position_embeddings"] = tuple(gather_seq(t, index.to(t.device)) for t in pe)
        pos = kwargs.get("position_ids")
        if pos is not None:
            out["position_ids"] = gather_positions(pos, q_index)
        if rows is not None:
            q_index = None  # the mask's rows are the prefill's last ones already
    if mask is not None and mask.dim() == 4:
        kv = mask.shape[-1]
        filled = past + q  # a static cache's mask is wider: unfilled slots follow
        extra = torch.arange(plan["length"], filled, device=mask.device).expand(index.shape[0], -1)
        cols = torch.cat([index.to(mask.device), extra], 1)
        m = mask.expand(index.shape[0], *mask.shape[1:])
        m = m.gather(-1, cols[:, None, None, :].expand(-1, m.shape[1], m.shape[2], -1))
        if q_index is not None:
            m = m.gather(-2, q_index.to(m.device)[:, None, :, None].expand(-1, m.shape[1], -1, m.shape[3]))
        col_real = torch.cat([real.to(mask.device), torch.ones_like(extra, dtype=torch.bool)], 1)
        m = mask_columns(m, col_real)
        cache = cache_of(kwargs)
        if getattr(cache, "is_compileable", False) and kv > m.shape[3]:
            # a static cache keeps its width: the slots this layer's cache never fills are blocked
            pad = torch.zeros(*m.shape[:3], kv - m.shape[3], dtype=m.dtype, device=m.device)
            m = torch.cat([m, pad if m.dtype == torch.bool else pad.fill_(torch.finfo(m.dtype).min)], -1)
        out["attention_mask"] = m
    elif mask is None and not bool(real.all()):
        out["attention_mask"] = fresh_mask(real, prefill, plan, past, q)
        if prefill and rows is not None:
            out["attention_mask"] = out["attention_mask"][:, :, -rows:]
    elif mask is not None:
        raise ValueError("vtprune's in-LLM exit needs a 4-D attention mask or none (SDPA/eager); "
                         f"got a {mask.dim()}-D mask")
    return out


def fresh_mask(real, prefill: bool, plan, past: int, q: int):
    """A boolean mask for a call where the model passed none (causal, unpadded) but rows have padding slots."""
    n = real.shape[1]
    if prefill:
        causal = torch.ones(n, n, dtype=torch.bool, device=real.device).tril()
        return mask_columns(causal[None, None].expand(real.shape[0], 1, n, n), real)
    cols = torch.cat([real, torch.ones(real.shape[0], past - plan["length"] + q, dtype=torch.bool,
                                       device=real.device)], 1)
    return cols[:, None, None, :].expand(-1, 1, q, -1)


def mask_exited(mask, visual, rows, q: int, past: int):
    """Mask the ``visual`` [B, n] columns for the ``rows`` [B] whose visual tokens have left (others
    unchanged) in a call of ``q`` tokens after ``past`` cached ones."""
    b, n = visual.shape
    kv = mask.shape[-1] if mask is not None else past + q  # a static cache's mask is wider
    cols = torch.cat([visual, torch.zeros(b, kv - n, dtype=torch.bool, device=visual.device)], 1)
    bad = cols & rows[:, None].to(cols.device)
    if mask is None:
        mask = allowed_keys(None, q, kv, visual.device)
    mask = mask.expand(b, *mask.shape[1:])
    bad = bad.to(mask.device)[:, None, None, :]
    return mask & ~bad if mask.dtype == torch.bool else mask.masked_fill(bad, torch.finfo(mask.dtype).min)


def mask_columns(mask, col_real):
    """Mask out padding-slot columns of a 4-D mask, keeping each row's own diagonal (no empty rows)."""
    keep = col_real[:, None, None, :]
    if mask.dtype == torch.bool:
        out = mask & keep
    else:
        out = mask.masked_fill(~keep, torch.finfo(mask.dtype).min)
    q, kv = out.shape[-2], out.shape[-1]
    if q == kv:
        eye = torch.eye(q, dtype=torch.bool, device=out.device)[None, None]
        out = out | eye if out.dtype == torch.bool else out.masked_fill(eye, 0.0)
    return out


def first_layer_attention(plan, query, key, mask):
    """Layer 0's query, key and 4-D mask (over the whole prompt) under a stage before it (``plan``), cut to the
    tokens that go on to layer 1: what a method observing layer 0 for stage 1 reads."""
    step, real = plan["step"].to(query.device), plan["real"].to(query.device)
    query = query.gather(2, step[:, None, :, None].expand(-1, query.shape[1], -1, query.shape[3]))
    key = key.gather(2, step[:, None, :, None].expand(-1, key.shape[1], -1, key.shape[3]))
    m = mask.expand(step.shape[0], *mask.shape[1:])
    m = m.gather(2, step[:, None, :, None].expand(-1, m.shape[1], -1, m.shape[3]))
    m = m.gather(3, step[:, None, None, :].expand(-1, m.shape[1], m.shape[2], -1))
    return query, key, mask_columns(m, real)


def first_layer_mask(plan, kwargs, q: int, past: int) -> dict:
    """Layer 0's kwargs under a stage before it (``plan``): the stage's tokens masked out of its attention in the
    prefill and every decode step (its cache keeps every token; from layer 1 on they are cut)."""
    drop = plan["drop"]
    rows = torch.ones(drop.shape[0], dtype=torch.bool, device=drop.device)
    kwargs["attention_mask"] = mask_exited(kwargs.get("attention_mask"), drop, rows, q, past)
    return kwargs


def cut_sequence_inputs(sequence_inputs, args, kwargs, plan, rows):
    """A layer's other inputs that run along the prefill (``sequence_inputs``: ``Adapter.sequence_inputs``), cut by
    ``plan`` (``rows``: the layer runs the prefill's last rows only)."""
    index = plan["index"]
    args = list(args)
    for where in sequence_inputs:
        box, name = (args, where) if isinstance(where, int) else (kwargs, where)
        if isinstance(where, int) and where >= len(args):
            continue
        t = box[name] if isinstance(where, int) else box.get(name)
        if t is None:
            continue
        if rows is None:
            box[name] = gather_seq(t, index.to(t.device))
        elif not bool((index[:, -rows:].cpu() == torch.arange(plan["length"] - rows, plan["length"])).all()):
            raise ValueError("the prompt ends with visual tokens that left the language model; end it with text "
                             "(as chat templates do) or use a pre-LLM method")
    return tuple(args)
