"""HoliTom (Shao et al., NeurIPS 2025, arXiv 2505.21334) — its selection before the LLM.

A clip of T temporal slices of n tokens (LLM-input features ``x``, a salience ``a`` per token):

1. **Static windows.**  ``s_f,i = cos(x_f,i, x_f+1,i)``; a window [s, e] saves ``(e - s)`` tokens for every
   cell that stays similar (``s_f,i > tau``) through it; windows are chosen by dynamic programming to save
   the most (windows of one slice save nothing).  With ``R`` tokens saved of ``T n``, the ratio left for
   the rest is ``r' = min(1, keep / (1 - R / (T n)))``.
2. **Static tokens.**  In a window of several slices, a cell similar throughout is one token, its mean over
   the window, at its first slice; the window's static tokens are clustered by density peaks (DPC-kNN,
   k = min(7, c)) to ``round(count r')`` centres, each ``beta centre + (1 - beta) mean(members)``.
3. **Dynamic tokens**, per slice: the ``ceil(count r')`` with the highest salience (``contextual_share`` D
   > 0: ``round(ceil(count r') (1 - D))`` of them, the rest density-peak centres merged as above).
4. Kept: every slice's dynamic tokens, and the windows' static tokens at their first slice; positions
   original.

Differences from the official code (``holitom/llava_arch.py``): a static token sits at its window's first
slice (LLaVA-OneVision's code puts a window's static block before its frames and renumbers); the salience is
the tower score vtprune reads for [CLS] methods (HoliTom reads SigLIP's last-layer attention, 2-D pooled);
density ties go to the earlier token (the code adds 1e-6 noise).  HoliTom's LLM-side merge (at layer 18) is
not part of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..scoring import density_peaks
from .base import register
from .cls import SOURCE
from .temporal import MergingClip, clip_share


def static_windows(sim: torch.Tensor, tau: float, longest: int = 1024) -> tuple:
    """``([(start, end)], tokens saved)``: the windows covering T slices that save the most, from ``sim``
    [T - 1, n] (each cell's similarity to the next slice)."""
    t = sim.shape[0] + 1
    still = sim > tau
    gain = torch.zeros(t, t)
    for s in range(t - 1):
        run = torch.cumprod(still[s:].float(), dim=0).sum(-1)  # cells similar from s through s + 1 + j
        for j, cells in enumerate(run.tolist()):
            gain[s, s + 1 + j] = cells * (1 + j)
    best, start = [0.0] * t, [0] * t
    for i in range(t):
        best[i], start[i] = (best[i - 1] if i else 0.0), i
        for size in range(2, min(i + 1, longest) + 1):
            j = i - size
            value = (best[j] if j >= 0 else 0.0) + float(gain[j + 1, i])
            if value > best[i]:
                best[i], start[i] = value, j + 1
    windows, i = [], t - 1
    while i >= 0:
        windows.append((start[i], i))
        i = start[i] - 1
    return windows[::-1], best[-1]


def density_merge(x: torch.Tensor, count: int, beta: float, k: int = 7) -> tuple:
    """Density-peak centres of ``x`` [m, D] (``count`` of them, ascending) and their merged features:
    ``beta centre + (1 - beta) mean(members)`` (members: the others nearest to it; a centre alone stays)."""
    m = x.shape[0]
    score, d = density_peaks(x, min(k, count))
    centres = torch.sort(torch.sort(score, descending=True, stable=True).indices[:count]).values
    others = torch.ones(m, dtype=torch.bool)
    others[centres] = False
    assign = d[others][:, centres].argmin(-1)
    out = x[centres].float().clone()
    for c in range(centres.numel()):
        members = x[others][assign == c].float()
        if members.numel():
            out[c] = beta * out[c] + (1 - beta) * members.mean(0)
    return centres, out


def holitom(frames: torch.Tensor, salience: torch.Tensor, keep: float, tau: float = 0.8, beta: float = 0.6,
            contextual_share: float = 0.0, k: int = 7) -> tuple:
    """HoliTom on a clip: ``frames`` [T, n, D], ``salience`` [T, n].  Returns the kept indices into the
    flattened clip (ascending) and ``(indices, features)`` of the tokens whose features changed."""
    t, n, dim = frames.shape
    x = frames.float()
    sim = F.cosine_similarity(F.normalize(x[:-1], dim=-1), F.normalize(x[1:], dim=-1), dim=-1)  # [T - 1, n]
    windows, saved = static_windows(sim, tau) if t > 1 else ([(0, 0)], 0.0)
    ratio = min(keep / ((t * n - saved) / (t * n)), 1.0)
    kept, changed, feats = [], [], []
    for start, end in windows:
        static = sim[start:end].gt(tau).all(0) if end > start else torch.zeros(n, dtype=torch.bool)
        if static.any():
            cells = static.nonzero().squeeze(1)
            count = round(cells.numel() * ratio)
            if count > 0:
                centres, merged = density_merge(x[start:end + 1, cells].mean(0), count, beta, k)
                idx = cells[centres] + start * n
                kept.append(idx)
                changed.append(idx)
                feats.append(merged)
        dynamic = (~static).nonzero().squeeze(1)
        for f in range(start, end + 1):
            budget = math.ceil(dynamic.numel() * ratio)
            dominant = round(budget * (1 - contextual_share))
            order = torch.sort(salience[f, dynamic].float(), descending=True, stable=True).indices
            top = dynamic[order[:dominant]]
            kept.append(top + f * n)
            rest = torch.sort(dynamic[order[dominant:]]).values  # in order: density ties go to the earlier token
            if budget - dominant > 0 and rest.numel():
                centres, merged = density_merge(x[f, rest], min(budget - dominant, rest.numel()), beta, k)
                idx = rest[centres] + f * n
                kept.append(idx)
                changed.append(idx)
                feats.append(merged)
    merged_idx = torch.cat(changed) if changed else torch.zeros(0, dtype=torch.long)
    merged_feats = torch.cat(feats) if feats else x.new_zeros(0, dim)
    return torch.sort(torch.cat(kept)).values, (merged_idx, merged_feats)


@register("holitom")
@dataclass
class HoliTom(MergingClip):
    """HoliTom (its pre-LLM stage): cells still through a window of slices become one token each (merged by
    density peaks), the budget they save goes to the slices' salient dynamic tokens (``keep``: the clip's
    retention ratio)."""

    paper: ClassVar[str] = "HoliTom: Shao et al., NeurIPS 2025, arXiv 2505.21334"
    ranges: ClassVar[dict] = {
        "tau": "float in [-1, 1]: a cell similar above it to the next slice is still",
        "beta": "float in [0, 1]: a merged centre keeps this weight against its members' mean",
        "contextual_share": "float in [0, 1): share D of each slice's dynamic budget merged by density peaks",
        "source": SOURCE}
    tau: float = 0.8
    beta: float = 0.6
    contextual_share: float = 0.0
    source: str | None = None

    def validate(self):
        super().validate()
        if not -1 <= self.tau <= 1 or not 0 <= self.beta <= 1 or not 0 <= self.contextual_share < 1:
            raise ValueError("holitom tau must lie in [-1, 1], beta in [0, 1] and contextual_share in [0, 1)")

    def count(self, per_slice, slices_):  # the nominal budget; score() sets what the windows give
        keep = clip_share(self.keep, per_slice * slices_)
        return slices_ * math.ceil(per_slice * keep)

    def select(self, frames, salience, keep):
        return holitom(frames, salience, keep, self.tau, self.beta, self.contextual_share)
