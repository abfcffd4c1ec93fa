"""CDPruner (Zhang et al. 2025, "Beyond Attention or Similarity: Maximizing Conditional Diversity
for Token Pruning in MLLMs", arXiv 2506.10967) — its config and selection.

A conditional DPP over an image's visual tokens: similarity S = cosine of the LLM-input features,
relevance r = each token's mean cosine to the instruction's text embeddings, min-max normalised
over the image; kernel L = diag(r) S diag(r); the ``keep`` tokens are chosen by the greedy MAP
inference of Chen et al. 2018 (fast greedy DPP: each step adds the token with the largest
remaining conditional variance, updated by one Cholesky row).  Kept tokens enter in original order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Selector, register


def relevance(features: torch.Tensor, text: torch.Tensor, negate: bool = False, theta=None) -> torch.Tensor:
    """[n]: each token's mean cosine to the ``text`` embeddings [m, D], min-max normalised as the CDPruner
    code does ((r - min + 1e-6) / (max - min)); ``theta`` maps it through exp(theta / (2 (1 - theta)) r)."""
    f = torch.nn.functional.normalize(features.float(), dim=-1)
    t = torch.nn.functional.normalize(text.float().to(f.device), dim=-1)
    r = (f @ t.T).mean(1)
    if negate:
        r = -r
    r = (r - r.min() + 1e-6) / (r.max() - r.min()).clamp_min(1e-12)
    if theta is not None:
        r = torch.exp(theta / (2 * (1 - theta)) * r)
    return r


def greedy_map(kernel: torch.Tensor, k: int) -> torch.Tensor:
    """The fast greedy MAP inference of a DPP (Chen et al. 2018): ``k`` indices in the order chosen.

    Each step takes the largest remaining conditional variance ``d2`` (ties: the first); when the
    kernel's rank is spent (``d2`` <= 0 gives NaN) the first unchosen token follows, as in the CDPruner code."""
    n = kernel.shape[0]
    k = min(k, n)
    c = torch.zeros(k, n, dtype=kernel.dtype, device=kernel.device)
    d2 = kernel.diagonal().clone()
    chosen = []
    for i in range(k):
        j = int(torch.nan_to_num(d2, nan=math.inf).argmax())
        chosen.append(j)
        e = (kernel[j] - c[:i, j] @ c[:i]) / d2[j].sqrt()
        c[i] = e
        d2 = d2 - e * e
        d2[chosen] = -math.inf
    return torch.tensor(chosen, dtype=torch.long)


@register("cdpruner")
@dataclass
class CDPruner(Selector):
    """Conditional diversity: a DPP over each image's tokens weighted by relevance to the instruction (CDPruner, 2025).

    Similarity: cosine of the LLM-input features (the CDPruner code uses the projector's output too).
    Relevance: the mean cosine of each token's LLM-input feature to the LLM input embeddings of the
    instruction — the sample's text tokens after its last image (all its text when none follow) —
    min-max normalised over the image.  Kernel diag(r) S diag(r); greedy MAP selection of the budget,
    per tile with ``scope="tile"`` (the code's per-crop selection on LLaVA-NeXT).  ``theta`` (None:
    off, as in the released code) sharpens relevance by exp(theta / (2 (1 - theta)) r).

    Difference from the CDPruner code: there relevance is the CLIP text encoder's embedding of the
    question against CLIP's projected image features, *negated* (the code's sign, on CLIP only);
    stock transformers VLMs carry no CLIP text encoder, so vtprune compares in the LLM's input space,
    where the features the LLM reads and the instruction's token embeddings live (the route taken by
    ports to models without CLIP).  ``negate=True`` flips the sign as the code does.
    """

    paper: ClassVar[str] = "CDPruner: Zhang et al. 2025, arXiv 2506.10967"
    ranges: ClassVar[dict] = {"theta": "float in [0, 1) or None (off): relevance sharpening",
                              "negate": "bool: negate relevance (the CDPruner code's sign for CLIP)"}
    needs_text: ClassVar[bool] = True
    theta: float | None = None
    negate: bool = False

    def validate(self):
        super().validate()
        if self.theta is not None and (isinstance(self.theta, bool) or not isinstance(self.theta, (int, float))
                                       or not 0.0 <= self.theta < 1.0):
            raise ValueError(f"cdpruner theta must lie in [0, 1) or be None, got {self.theta!r}")
        if not isinstance(self.negate, bool):
            raise TypeError(f"cdpruner negate must be True or False, got {self.negate!r}")

    def score(self, ctx):
        scores = []
        for i, (layout, k) in enumerate(zip(ctx.layouts, ctx.budgets)):
            content = (~layout.newline).nonzero().squeeze(1)
            features = ctx.features[i][content].float()
            r = relevance(features, ctx.instructions[i], self.negate, self.theta)
            x = torch.nn.functional.normalize(features, dim=-1)
            kernel = r[:, None] * (x @ x.T) * r[None, :]
            tiles = layout.tiles[content]
            groups = [(torch.arange(content.numel()), k)] if not isinstance(k, dict) else \
                [((tiles == t).nonzero().squeeze(1), kt) for t, kt in k.items()]
            s = torch.zeros(layout.n)
            for members, budget in groups:
                chosen = members[greedy_map(kernel[members][:, members], budget)]
                s[content[chosen]] = 1.0
            scores.append(s)
        return scores
