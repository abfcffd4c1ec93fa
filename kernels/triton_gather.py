"""Triton kernels: the cut in one launch.

``gather_cut_triton`` gathers the kept rows of ``embeds`` [B, L, D] and, in the same launch, writes
the cut attention mask and position ids (1-D [B, L] or Qwen's [P, B, L]).  It takes any strides
(non-contiguous inputs), fp32/fp16/bf16, and empty or full selections; outputs are bitwise equal to
the torch reference in ``gather.py``.  On a CPU they run under
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
