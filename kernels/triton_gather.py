"""Triton kernels: the pre-LLM cut in one launch, and KV-cache compaction.

``gather_cut_triton`` gathers the kept rows of ``embeds`` [B, L, D] and, in the same launch, writes
the cut attention mask and position ids (1-D [B, L] or Qwen's [P, B, L]).  ``compact_layers_triton``
drops positions from the keys and values [B, H, S, D] of many layers in one launch (a table of
their addresses; one launch per group of tensors with equal shape, strides and dtype).  Both take
any strides (non-contiguous inputs), fp32/fp16/bf16, and empty or full selections; outputs are
bitwise equal to the torch reference in ``gather.py``.  On a CPU they run under
``TRITON_INTERPRET=1`` (how CI tests them).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gather_cut_kernel(src, dst, index, real, mask_in, mask_out, pos_in, pos_out,
                       n_pos, d_model, lp,
                       s_b, s_l, s_d, o_b, o_l, o_d,
                       m_b, m_l, p_p, p_b, p_l,
                       HAS_MASK: tl.constexpr, HAS_POS: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    j = tl.program_id(1)
    i = tl.load(index + b * lp + j)
    keep = tl.load(real + b * lp + j)
    for d0 in range(0, d_model, BLOCK_D):
        offs = d0 + tl.arange(0, BLOCK_D)
        ok = offs < d_model
        row = tl.load(src + b * s_b + i * s_l + offs * s_d, mask=ok)
        tl.store(dst + b * o_b + j * o_l + offs * o_d, row, mask=ok)
    if HAS_MASK:
        m = tl.load(mask_in + b * m_b + i * m_l)
        tl.store(mask_out + b * lp + j, m * keep.to(m.dtype))
    else:
        tl.store(mask_out + b * lp + j, keep.to(tl.int64))
    if HAS_POS:
        for p in range(0, n_pos):
            v = tl.load(pos_in + p * p_p + b * p_b + i * p_l)
            tl.store(pos_out + p * (lp * tl.num_programs(0)) + b * lp + j, v)


def gather_cut_triton(embeds, index, real, mask=None, positions=None):
    """Triton version of :func:`vtprune.kernels.gather.gather_cut` (same arguments and results)."""
    b, _, d = embeds.shape
    lp = index.shape[1]
    index = index.to(embeds.device, torch.int64).contiguous()
    real_i = real.to(embeds.device, torch.int64).contiguous()
    out = torch.empty(b, lp, d, dtype=embeds.dtype, device=embeds.device)
    mask_out = torch.empty(b, lp, dtype=mask.dtype if mask is not None else torch.int64, device=embeds.device)
    pos_out = None
    squeeze = False
    if positions is not None:
        if positions.dim() == 2:
            positions, squeeze = positions[None], True
        if positions.shape[1] == 1 and b > 1:
            positions = positions.expand(-1, b, -1)
        pos_out = torch.empty(positions.shape[0], b, lp, dtype=positions.dtype, device=embeds.device)
    if b and lp:
        dummy = out
        block = min(1024, triton.next_power_of_2(max(d, 16)))
        _gather_cut_kernel[(b, lp)](
            embeds, out, index, real_i,
            mask if mask is not None else dummy, mask_out,
            positions if positions is not None else dummy, pos_out if pos_out is not None else dummy,
            positions.shape[0] if positions is not None else 0, d, lp,
            embeds.stride(0), embeds.stride(1), embeds.stride(2), out.stride(0), out.stride(1), out.stride(2),
            mask.stride(0) if mask is not None else 0, mask.stride(1) if mask is not None else 0,
            positions.stride(0) if positions is not None else 0, positions.stride(1) if positions is not None else 0,
            positions.stride(2) if positions is not None else 0,
            HAS_MASK=mask is not None, HAS_POS=positions is not None, BLOCK_D=block,
        )
    if pos_out is not None and squeeze:
        pos_out = pos_out[0]
    return out, mask_out, pos_out


@triton.jit
def _compact_kv_kernel(src_ptrs, dst_ptrs, like, index, heads, d_head, sp,
                       s_b, s_h, s_s, s_d, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    # program (t, b*heads + h, block of kept positions): tensor t of the pointer tables
    t = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // heads
    h = bh % heads
    js = tl.program_id(2) * BLOCK_J + tl.arange(0, BLOCK_J)
    j_ok = js < sp
    i = tl.load(index + b * sp + js, mask=j_ok, other=0)
    src = tl.load(src_ptrs + t).to(like.dtype)  # addresses -> typed pointers (like's element type)
    dst = tl.load(dst_ptrs + t).to(like.dtype)
    src_rows = src + b * s_b + h * s_h + i[:, None] * s_s
    dst_rows = dst + (bh * sp + js[:, None]) * d_head
    for d0 in range(0, d_head, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        ok = j_ok[:, None] & (ds < d_head)[None, :]
        x = tl.load(src_rows + ds[None, :] * s_d, mask=ok)
        tl.store(dst_rows + ds[None, :], x, mask=ok)


def compact_layers_triton(pairs, index):
    """Keep positions ``index`` [B, S'] of every ``(keys, values)`` pair [B, H, S, D] (many layers).

    Tensors that share shape, strides and dtype (the usual cache: every layer alike) are compacted by
    one launch that reads their addresses from a pointer table; others form their own groups.
    Returns ``[(keys, values), ...]``, contiguous, in the order given.
    """
    tensors = [t for pair in pairs for t in pair]
    if not tensors:
        return []
    device = tensors[0].device
    sp = index.shape[1]
    index = index.to(device, torch.int64).contiguous()
    outs = [torch.empty(*t.shape[:2], sp, t.shape[3], dtype=t.dtype, device=t.device) for t in tensors]
    groups: dict = {}
    for n, t in enumerate(tensors):
        if t.device != device:
            raise ValueError(f"KV compaction needs every tensor on one device; got {device} and {t.device}")
        groups.setdefault((tuple(t.shape), t.stride(), t.dtype), []).append(n)
    for (shape, stride, _), members in groups.items():
        b, h, _, d = shape
        if not (b and h and sp and d):
            continue
        src = torch.tensor([tensors[n].data_ptr() for n in members], dtype=torch.int64, device=device)
        dst = torch.tensor([outs[n].data_ptr() for n in members], dtype=torch.int64, device=device)
        block_d = min(256, triton.next_power_of_2(max(d, 16)))
        block_j = max(1, min(64, 4096 // block_d, triton.next_power_of_2(sp)))
        grid = (len(members), b * h, triton.cdiv(sp, block_j))
        _compact_kv_kernel[grid](src, dst, outs[members[0]], index, h, d, sp, *stride,
                                 BLOCK_J=block_j, BLOCK_D=block_d)
    return list(zip(outs[0::2], outs[1::2]))


def compact_kv_triton(keys, values, index):
    """Keep positions ``index`` [B, S'] of one layer's ``keys``/``values`` [B, H, S, D] (one launch)."""
    return compact_layers_triton([(keys, values)], index)[0]
