"""VisPruner (Zhang et al., ICCV 2025, arXiv 2412.01818v2) — its config and selection.

Of an image's budget T, ``important_ratio`` (default 0.5, as in every eval script of the VisPruner
code) goes to *important* tokens: the top ``floor(T * important_ratio)`` by the [CLS] attention of
the tower layer the projector reads (the FasterVLM score; on Qwen the received-attention
substitute).  The rest of the budget goes to *diverse* tokens, chosen from the remaining tokens
(ordered by descending attention) by ToMe-style duplicate removal: split the current list into
A (even places) and B (odd places), score each A token by its highest cosine similarity to a B
token, drop the ``min(8, R - T_div)`` most similar A tokens, and continue with the other A tokens
(most similar first) followed by B, until T_div tokens remain.  Kept tokens enter the LLM in
their original order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Selector, budget_groups, register
from .cls import SOURCE, _check_source

STEP = 8  # tokens removed per round, as in the VisPruner code


def remove_duplicates(features: torch.Tensor, order: torch.Tensor, keep: int) -> torch.Tensor:
    """VisPruner's diverse tokens: of the tokens ``order`` (indices into ``features`` [n, D], in the
    order the rounds split them), the ``keep`` left after removing near-duplicates round by round."""
    x = torch.nn.functional.normalize(features.float(), dim=-1)
    res = order
    while keep > 0:
        k = min(STEP, res.numel() - keep)
        if k <= 0:
            break
        a, b = res[0::2], res[1::2]
        sim = (x[a] @ x[b].T).max(1).values
        res = torch.cat([a[torch.sort(sim, descending=True, stable=True).indices[k:]], b])
    return res if keep > 0 else res[:0]


@register("vispruner")
@dataclass
class VisPruner(Selector):
    """Important tokens by [CLS] attention, then diverse tokens by removing near-duplicates (VisPruner, ICCV 2025).

    ``important_ratio`` of each image's (or tile's, ``scope="tile"``) budget are the tokens the [CLS]
    attends to most in the layer the projector reads; the rest are chosen among the remaining
    tokens by rounds that drop up to 8 near-duplicates each (cosine similarity of the LLM-input
    features; a token's best match among the other half of the list).  ``important_ratio=1``
    is FasterVLM.  Differences from the VisPruner code: similarities are computed on the features
    the LLM receives (after the projector, which maps each token alone) instead of the tower's;
    sorting is stable (ties by position); an odd number of remaining tokens works (the code's
    index shape fails there).
    """

    paper: ClassVar[str] = "VisPruner: Zhang et al., ICCV 2025, arXiv 2412.01818v2"
    ranges: ClassVar[dict] = {"important_ratio": "float in [0, 1]: the share of the budget chosen by [CLS] "
                                                 "attention; the rest are diverse tokens", "source": SOURCE}
    needs_cls: ClassVar[bool] = True
    important_ratio: float = 0.5
    source: str | None = None

    def validate(self):
        super().validate()
        _check_source(self.source)
        if isinstance(self.important_ratio, bool) or not isinstance(self.important_ratio, (int, float)) \
                or not 0.0 <= self.important_ratio <= 1.0:
            raise ValueError(f"vispruner important_ratio must lie in [0, 1], got {self.important_ratio!r}")

    def tower_layers(self, n_layers, feature_layer):
        return [feature_layer]

    def choose(self, attention, features, members, budget) -> torch.Tensor:
        """The kept tokens (indices into ``members``' image) among ``members`` for ``budget`` tokens."""
        budget = min(budget, members.numel())
        important = int(budget * self.important_ratio)
        order = members[torch.sort(attention[members], descending=True, stable=True).indices]
        diverse = remove_duplicates(features, order[important:], budget - important)
        return torch.cat([order[:important], diverse])

    def score(self, ctx):
        (layer,) = ctx.cls_attention
        scores = []
        for i, (layout, k) in enumerate(zip(ctx.layouts, ctx.budgets)):
            s = torch.zeros(layout.n)
            for members, budget in budget_groups(layout, k):
                s[self.choose(ctx.cls_attention[layer][i].float().cpu(), ctx.features[i], members, budget)] = 1.0
            scores.append(s)
        return scores
