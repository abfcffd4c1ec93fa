"""Temporal selectors for videos: tokens ranked by how much they changed since the previous frame
(``evs``), or by how unlike the clip and their frame they are, with budgets per frame (``vidcom2``);
and the temporal control, whole frames evenly spaced in time (``uniform_time``).

``evs`` — Efficient Video Sampling (Bagrov et al., arXiv 2510.14624), as vLLM implements it
(``vllm/multimodal/video_prune/evs.py``, ``--video-pruning-method evs``): a token's score is its
cosine *dissimilarity* to the token at the same (row, column) of the previous temporal slice,
``1 - cos(x[t], x[t-1])``; every token of the first slice scores 255, so that slice is always kept
whole; the clip keeps ``max(n, int(T n r))`` tokens (``n`` tokens per slice, ``T`` slices, ``r``
the kept fraction: vLLM's ``1 - video_pruning_rate``), the highest scores, ties to the earlier token,
in their original order.  A clip's slices may keep from none to all of their tokens.

``vidcom2`` — VidCom2 (Liu et al., EMNLP 2025, arXiv 2505.14454), as vLLM implements it
(``vllm/multimodal/video_prune/vidcom2.py``, ``--video-pruning-method vidcom2``): on the half of the
feature channels that vary least over the clip, each token (L2-normalised) gets a redundancy
``v + f``, ``v``/``f`` = sum over a in {1/8, 1/4, 1/2, 1, 2} of ``exp(-|x - c|^2 / 2a)`` for the clip's
and its frame's mean ``c``; a frame's uniqueness ``-mean v`` sets its share by a softmax at
temperature 0.01: ``k_t = clamp(round(min(1, r (1 + p_t - mean p)) n), 1, n)``; each frame keeps its
``k_t`` least redundant tokens, then the clip is brought to exactly ``max(T, int(T n r))`` tokens by
dropping the most redundant kept ones or adding the least redundant others.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from .base import Selector, register

FIRST = 255.0  # the first slice's score (vLLM's): above every dissimilarity, which lies in [0, 2]


def clip_share(keep, total: int) -> float:
    """``keep`` as a share of a clip's ``total`` tokens (an int ``keep`` counts tokens)."""
    return keep if isinstance(keep, float) else keep / total


def clip_count(keep, total: int) -> int:
    """``keep`` as a count of a clip's ``total`` tokens: ``int(total keep)`` for a share (vLLM's rounding)."""
    return int(total * keep) if isinstance(keep, float) else int(keep)


class ClipSelector(Selector):
    """A temporal selector: one budget over a clip's frames (``scope`` "image"/"clip"), its kept count
    ``count(tokens per slice, slices)``."""

    temporal: ClassVar[bool] = True

    def validate(self):
        super().validate()
        if self.scope not in ("image", "clip"):
            raise ValueError(f"{self.name} shares one budget over a clip's frames (scope='clip'); got "
                             f"scope={self.scope!r}")

    def count(self, per_slice: int, slices_: int) -> int:
        raise NotImplementedError

    def budget(self, layout):
        parts = slices(layout)
        return self.count(int(parts[0].numel()), len(parts))

    def clips(self, ctx):
        """``(layout, features)`` of every clip of the call."""
        for layout, features in zip(ctx.layouts, ctx.features):
            if features is None:
                raise RuntimeError(f"vtprune: {self.name} needs the clip's features; the vision tower's run was not seen")
            yield layout, features


class MergingClip(ClipSelector):
    """A clip selector that reads the tower score [CLS] methods read (``source``) as each token's salience
    and merges tokens (``fastvid``, ``flashvid``): ``select(frames [T, n, D], salience [T, n], keep)`` gives the
    kept indices into the flattened clip and ``(indices, features)`` of its merged tokens.  Its kept count
    depends on the clip's content."""

    needs_cls: ClassVar[bool] = True

    def validate(self):
        from .cls import _check_source

        super().validate()
        _check_source(getattr(self, "source", None))

    def select(self, frames, salience, keep) -> tuple:
        raise NotImplementedError

    def tower_layers(self, n_layers, feature_layer):
        return [feature_layer]

    def kept_count(self, layout):
        from ..errors import NotApplicable

        raise NotApplicable(f"{self.name}'s kept count depends on how the clip segments and merges")

    def score(self, ctx):
        (layer,) = ctx.cls_attention
        out = []
        for i, (layout, features) in enumerate(self.clips(ctx)):
            parts = slices(layout)
            order = torch.cat(parts)
            t, n = len(parts), int(parts[0].numel())
            keep = clip_share(self.keep, t * n)
            frames = features[order.to(features.device)].view(t, n, -1).cpu()
            kept, (merged, feats) = self.select(frames, ctx.cls_attention[layer][i][order].view(t, n).cpu(), keep)
            s = torch.zeros(layout.n)
            s[order[kept]] = 1.0
            ctx.budgets[i] = kept.numel()
            ctx.replacements[i] = (order[merged], feats) if merged.numel() else None
            out.append(s)
        return out


def slices(layout) -> list:
    """Per temporal slice, its content tokens' indices in raster order."""
    frames = layout.frames.masked_fill(layout.newline, -1)
    return [(frames == f).nonzero().squeeze(1) for f in range(int(frames.max()) + 1)]


def evs_scores(layout, features: torch.Tensor) -> torch.Tensor:
    """EVS's score of every token of a clip: 255 on the first slice, else ``1 - cos`` with the token of the
    same cell in the previous slice (computed in the features' dtype, as vLLM does); newlines -inf."""
    scores = torch.full((layout.n,), float("-inf"))
    parts = slices(layout)
    scores[parts[0]] = FIRST
    for prev, now in zip(parts, parts[1:]):
        if now.numel() != prev.numel() or not all(torch.equal(c[now], c[prev]) for c in (layout.row, layout.col)):
            raise ValueError("evs compares each token with the same cell of the previous frame; this clip's frames "
                             "have different grids")
        x = features[now.to(features.device)]
        y = features[prev.to(features.device)]
        scores[now] = (1 - F.cosine_similarity(x, y, dim=-1)).float().cpu()
    return scores


def evs_count(per_slice: int, slices_: int, keep) -> int:
    """The tokens EVS keeps of a clip of ``slices_`` slices of ``per_slice`` tokens: ``max(n, int(T n r))``
    for a fraction ``r``, ``max(n, keep)`` for a count (vLLM's ``compute_retained_tokens_count``)."""
    total = per_slice * slices_
    return min(total, max(per_slice, clip_count(keep, total)))


@register("evs")
@dataclass
class EVS(ClipSelector):
    """Efficient Video Sampling (vLLM's ``evs``): keep the tokens that changed most since the previous
    frame, the first frame whole.

    Per clip (``scope`` "image"/"clip" only): the score of a token is ``1 - cos`` with the token at the same
    cell of the previous temporal slice, 255 on the first slice; ``max(n, int(T n keep))`` tokens stay (an
    int ``keep``: ``max(n, keep)``).  A still image is one slice: it stays whole, as vLLM leaves images
    alone.  On Qwen3-VL a token is scored, as vLLM scores it, on its merger output and its deepstack
    features side by side.  Difference from vLLM: positions stay as the stock HF model numbers them (vLLM
    renumbers Qwen2.5-VL's text after the clip).
    """

    paper: ClassVar[str] = "EVS: Bagrov et al., arXiv 2510.14624 (vLLM --video-pruning-method evs)"
    score_stacked: ClassVar[bool] = True

    def count(self, per_slice, slices_):
        return evs_count(per_slice, slices_, self.keep)

    def score(self, ctx):
        return [evs_scores(layout, features) for layout, features in self.clips(ctx)]


ALPHAS = tuple(2.0 ** k for k in range(-3, 2))  # the Gaussian kernels' widths


def _gaussians(x: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    d2 = ((x - centre) ** 2).sum(-1)
    total = 0
    for a in ALPHAS:
        total = total + torch.exp(-d2 / (2.0 * a))
    return total


def vidcom2_count(per_slice: int, slices_: int, keep) -> int:
    """The tokens VidCom2 keeps of a clip: ``max(T, min(int(T n r), T n))`` (vLLM's count), a count ``keep``
    for an int."""
    total = per_slice * slices_
    return max(slices_, min(clip_count(keep, total), total))


def vidcom2_kept(frames: torch.Tensor, keep) -> tuple:
    """VidCom2 on a clip's features ``[T, n, D]``: ``(kept [T*n] bool, redundancy [T*n])``."""
    t, n, dim = frames.shape
    flat = frames.reshape(t * n, dim)
    rate = clip_share(keep, t * n)
    low = torch.topk(flat.var(dim=0, unbiased=False), k=max(1, int(dim * 0.5)), largest=False).indices
    x = F.normalize(flat.index_select(-1, low).view(t, n, -1), dim=-1)
    v = _gaussians(x, x.mean(dim=(0, 1), keepdim=True))
    redundancy = v + _gaussians(x, x.mean(dim=1, keepdim=True))
    unique = -v.mean(dim=-1)
    p = F.softmax((unique - unique.max()) / 0.01, dim=0)
    shares = ((rate * (1.0 + p - p.mean())).clamp(max=1.0) * n).round().long().clamp(min=1, max=n)
    kept = torch.zeros(t, n, dtype=torch.bool, device=frames.device)
    for f, k in enumerate(shares.tolist()):
        kept[f, torch.topk(redundancy[f], k=k, largest=False, sorted=False).indices] = True
    kept, redundancy = kept.view(-1), redundancy.reshape(-1)
    target = vidcom2_count(n, t, keep)
    have = int(kept.sum())
    if have > target:  # the most redundant kept tokens go
        inside = kept.nonzero().squeeze(-1)
        kept[inside[torch.topk(redundancy[inside], k=have - target, largest=True, sorted=False).indices]] = False
    elif have < target:  # the least redundant others come
        outside = (~kept).nonzero().squeeze(-1)
        more = min(target - have, outside.numel())
        kept[outside[torch.topk(redundancy[outside], k=more, largest=False, sorted=False).indices]] = True
    return kept, redundancy


@register("vidcom2")
@dataclass
class VidCom2(ClipSelector):
    """VidCom2 (vLLM's ``vidcom2``): frames unlike the rest of the clip get more of the budget, and each
    keeps its tokens least like the clip's and its frame's mean.

    Per clip (``scope`` "image"/"clip" only), on the LLM-input features (on Qwen3-VL with the deepstack
    features side by side, as vLLM scores them): exactly ``max(T, int(T n keep))``
    tokens (an int ``keep``: that count, at least one per frame).  A still image is one frame: its least
    redundant tokens.  Differences from the VidCom2 code: vLLM's exact-count reconciliation (the code keeps
    the sum of the rounded per-frame budgets), kept tokens in their original order.
    """

    paper: ClassVar[str] = "VidCom2: Liu et al., EMNLP 2025, arXiv 2505.14454 (vLLM --video-pruning-method vidcom2)"
    score_stacked: ClassVar[bool] = True

    def count(self, per_slice, slices_):
        return vidcom2_count(per_slice, slices_, self.keep)

    def score(self, ctx):
        scores = []
        for layout, features in self.clips(ctx):
            parts = slices(layout)
            if len({p.numel() for p in parts}) != 1:
                raise ValueError("vidcom2 needs frames of one size")
            order = torch.cat(parts)
            kept, redundancy = vidcom2_kept(features[order.to(features.device)].view(len(parts), parts[0].numel(), -1),
                                            self.keep)
            s = torch.full((layout.n,), float("-inf"))  # the kept tokens first (the budget is their count),
            s[order] = kept.cpu().float() * 100.0 - redundancy.float().cpu()  # the least redundant first
            scores.append(s)
        return scores


def even_frames(slices_: int, count: int) -> torch.Tensor:
    """``count`` of ``slices_`` frame indices evenly spaced in time, first and last included
    (``linspace(0, T - 1, count)`` rounded, as Qwen3-VL's processor samples frames)."""
    return torch.linspace(0, slices_ - 1, count).round().long().unique()


@register("uniform_time")
@dataclass
class UniformTime(ClipSelector):
    """Whole frames evenly spaced in time: the control for video methods, as ``uniform`` is in space.

    A clip of T temporal slices keeps ``max(1, floor(T keep + 1/2))`` of them (an int ``keep``: ``max(1, keep // n)``,
    n tokens per slice), first and last included, every token of each: what sampling fewer frames would
    feed the LLM (same tokens, same positions).  A still image is one slice: it stays whole.
    """

    def frames_kept(self, layout) -> torch.Tensor:
        parts = slices(layout)
        n = int(parts[0].numel())
        count = int(len(parts) * self.keep + 0.5) if isinstance(self.keep, float) else self.keep // max(n, 1)
        return even_frames(len(parts), min(len(parts), max(1, count)))

    def budget(self, layout):
        parts = slices(layout)
        return sum(int(parts[f].numel()) for f in self.frames_kept(layout).tolist())

    def score(self, ctx):
        scores = []
        for layout in ctx.layouts:
            s = torch.zeros(layout.n)
            for f in self.frames_kept(layout).tolist():
                s[slices(layout)[f]] = 1.0
            scores.append(s)
        return scores
