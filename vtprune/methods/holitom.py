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
density ties go to the earlier token (the code adds 1e-6 noise).

HoliTom's LLM-side merge is ``holitom_merge`` (below), composed after it: ``wrap(model, ["holitom",
"holitom_merge"], keep=...)`` (``holitom+holitom_merge`` on the command line).  As the
code (``holitom/modeling_qwen2.py``) computes it, before decoder layer ``k`` (``HOLITOM_k``) of a prefill: the
attention the prompt's last token pays each visual token in layer ``k - 1``, mean over heads, ranks them; the top
``round(N (1 - r))`` stay (``HOLITOM_r``, 0.5); every other visual token, in the order of its position, is averaged
into the kept token its hidden state (the input of layer ``k``) is most cosine-similar to, ``h <- (h + x) / 2``
(a kept token that takes several runs the average again each time), and leaves; kept tokens keep their
positions.  Differences: each sample of a batch merges on its own (the code's ranking reads sample 0); the kept
count rounds half up (Python's ``round`` to even); a similarity tie goes to the earliest kept token (the code: to
the first in the top-k's order); similarities and averages are computed in fp32; vtprune writes the merged states
at the input of layer ``k`` and drops the others there, as the code does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..attention import attention_probs
from ..scoring import density_peaks
from .base import LayerMethod, register
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


def merge_into_kept(hidden: torch.Tensor, kept: torch.Tensor, others: torch.Tensor) -> dict:
    """HoliTom's LLM-side merge of one sample: ``{kept position: (merged state, [positions of the tokens merged
    in])}`` for the kept tokens that take any; ``hidden`` [L, D] the states, ``kept`` and ``others`` ascending
    positions.  Each of ``others`` in turn, ``h <- (h + x) / 2`` into the kept token most cosine-similar to it
    (similarities of the states before any merge; a tie to the earliest kept token)."""
    x = hidden.float()
    target = F.normalize(x[others], dim=-1) @ F.normalize(x[kept], dim=-1).T  # [others, kept]
    nearest = target.argmax(-1).tolist() if others.numel() else []
    merged, members = {}, {}
    for i, j in enumerate(nearest):
        merged[j] = (merged.get(j, x[kept[j]]) + x[others[i]]) / 2
        members.setdefault(j, []).append(int(others[i]))
    return {int(kept[j]): (merged[j], members[j]) for j in merged}


@register("holitom_merge")
@dataclass
class HoliTomMerge(LayerMethod):
    """HoliTom's LLM-side merge: before decoder layer ``layer`` (18, as HoliTom runs it on 28-layer Qwen2-7B) the
    visual tokens the previous layer's last prompt token attended to least (a ``ratio`` of them, 0.5) are each
    averaged into their most similar kept token and leave.  Composed after HoliTom's selection:
    ``["holitom", "holitom_merge"]``."""

    paper: ClassVar[str] = "HoliTom: Shao et al., NeurIPS 2025, arXiv 2505.21334"
    ranges: ClassVar[dict] = {"layer": "int decoder layer in 1 .. layers-1: the merge happens before it",
                              "ratio": "float in [0, 1): the share of the visual tokens present merged away"}
    needs_attention: ClassVar[bool] = True
    layer: int = 18
    ratio: float = 0.5

    def validate(self):
        super().validate()
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0 <= self.ratio < 1:
            raise ValueError(f"holitom_merge ratio must be a number in [0, 1), got {self.ratio!r}")
        self.ratio = float(self.ratio)

    def observe(self, view, query, key, mask, scaling):
        """[B, L]: the attention the prompt's last token pays each token, mean over heads."""
        return attention_probs(query, key, mask, scaling, last_only=True)[:, 0]

    def drop(self, view, visual):
        drop, merges = torch.zeros_like(visual), []
        for b in range(visual.shape[0]):
            current = visual[b].nonzero().squeeze(1)
            if current.numel() == 0:
                continue
            count = max(1, min(current.numel(), math.floor(current.numel() * (1 - self.ratio) + 0.5)))
            score = view.scores[b].to(visual.device)[current].float()
            top = torch.sort(score, descending=True, stable=True).indices[:count]
            chosen = torch.zeros(current.numel(), dtype=torch.bool, device=visual.device)
            chosen[top] = True
            kept, others = current[chosen], current[~chosen]
            drop[b, others] = True
            states = view.hidden[b].to(visual.device)
            for position, (feature, members) in merge_into_kept(states, kept, others).items():
                merges.append((b, position, feature, torch.tensor([position] + members, device=visual.device)))
        return drop, merges
