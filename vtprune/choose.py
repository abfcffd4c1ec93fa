"""Which of an image's (or a video's) visual tokens a pre-LLM selector keeps: one function for every engine.

The HF wrap (``vtprune.runtime.selection.Selection``) and the vLLM binding (``vtprune.serving.rows``) each turn
what they saw of an image into a :class:`Seen` (its layout, its LLM-input features, its tower scores
mapped onto its LLM tokens) and call :func:`choose`; budgets, scores, the kept indices, summary tokens and
sizes all come from here.  ``Selector.kept_count`` says, from the layout and the budget alone, how many
tokens that will be (what vLLM sizes a prompt by).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import summary as summaries
from .layout import ImageLayout
from .methods.base import ScoreContext


@dataclass
class Seen:
    """What an engine saw of one image.

    ``features``: its LLM-input features [n, D]; ``cls``: ``{tower layer: [n] scores}`` (the tower layers
    a [CLS] method reads, on the image's LLM tokens); ``selected`` / ``sizes``: a merging method's kept
    tower tokens and their sizes, on the LLM tokens; ``instruction``: the embeddings of its prompt's
    instruction (methods with ``needs_text``); ``row``: its sample in the batch; ``stacked``: the features the
    family adds to each token inside the LLM (Qwen3-VL's deepstack features side by side), or None.
    """

    layout: ImageLayout
    features: torch.Tensor | None = None
    row: int = 0
    cls: dict | None = None
    selected: torch.Tensor | None = None
    sizes: torch.Tensor | None = None
    instruction: torch.Tensor | None = None
    stacked: torch.Tensor | None = None


@dataclass
class Choice:
    """What a selector keeps of one image: the kept indices (ascending), the scores it ranked by, each
    token's size (the tokens it stands for; None: one each), the summary groups ``[(position, members,
    feature)]``, the features that replace kept rows (``(positions, features)``, or None), and what a merging
    method's tokens stand for (``[(position, member indices)]``: pool's windows)."""

    kept: torch.Tensor
    scores: torch.Tensor
    sizes: torch.Tensor | None = None
    groups: list = field(default_factory=list)
    replacement: tuple | None = None
    members: list = field(default_factory=list)


def summary_split(summary: int, budget):
    """(the selector's budget, summary tokens) of an image's (or each tile's: a dict) budget: at most
    budget - 1 summary tokens."""
    if isinstance(budget, dict):
        parts = {t: summary_split(summary, k) for t, k in budget.items()}
        return {t: p[0] for t, p in parts.items()}, {t: p[1] for t, p in parts.items()}
    n = min(summary, max(budget - 1, 0))
    return budget - n, n


def choose(selector, images: list, generator: torch.Generator) -> list:
    """A :class:`Choice` per :class:`Seen` image, in order.  Copies of one image (the same ``features``
    object: an expanded batch) share its scores."""
    if not images:
        return []
    layouts = [img.layout.scoped(selector.scope) for img in images]  # scope="frame": frames are the parts
    budgets, wanted = zip(*[summary_split(selector.summary, selector.budget(layout)) for layout in layouts])
    ctx = ScoreContext(layouts=layouts, budgets=list(budgets), rows=[img.row for img in images],
                       features=[_scored(selector, img) for img in images], generator=generator,
                       instructions=[img.instruction for img in images] if selector.needs_text else [])
    if images[0].cls is not None:
        ctx.cls_attention = {layer: [img.cls[layer] for img in images] for layer in images[0].cls}
    if images[0].selected is not None:
        ctx.tower_selected = [(img.selected > 0).float() for img in images]
        if images[0].sizes is not None:
            ctx.tower_sizes = [img.sizes for img in images]
    scores = list(selector.score(ctx))
    first = {}
    for i, img in enumerate(images):
        if img.features is not None:
            scores[i] = scores[first.setdefault(id(img.features), i)]
    out = []
    for i, img in enumerate(images):  # a method may have set its own budget (pool, visionzip)
        kept = top_tokens(scores[i], layouts[i], ctx.budgets[i], selector.newlines)
        kept, groups, sizes, summary = summarise_image(selector, layouts[i], img.features, kept, wanted[i],
                                                       ctx.sizes[i])
        out.append(Choice(kept, scores[i], sizes, groups, summary if summary is not None else ctx.replacements[i],
                          ctx.members[i] or []))
    return out


def _scored(selector, img: Seen):
    """The features ``selector`` scores ``img`` by: its LLM-input features, and its stacked features beside
    them where the selector reads those (``score_stacked``) and the family has them."""
    if not selector.score_stacked or img.stacked is None or img.features is None:
        return img.features
    return torch.cat([img.features, img.stacked.to(img.features.device, img.features.dtype)], -1)


def top_tokens(scores: torch.Tensor, layout: ImageLayout, k, newlines: str = "rows") -> torch.Tensor:
    """Indices (ascending) of the best content tokens of one image, plus the newlines of kept rows.

    ``k`` is the image's budget, or a dict ``{tile: budget}`` to choose within each tile.  Ties are
    broken by position (earlier first).  A LLaVA-NeXT newline token is kept exactly when its row
    keeps at least one token, so that every kept row still ends with its separator; with
    ``newlines="all"`` every newline is kept (a count that does not depend on the selection).
    """
    scores = scores.detach().float().cpu()
    if scores.shape != (layout.n,):
        raise ValueError(f"a method returned {tuple(scores.shape)} scores for an image of {layout.n} tokens")
    content = ~layout.newline
    groups = {None: content} if not isinstance(k, dict) else {t: content & (layout.tiles == t) for t in k}
    keep = torch.zeros(layout.n, dtype=torch.bool)
    for group, members in groups.items():
        budget = min(k if group is None else k[group], int(members.sum()))
        order = torch.sort(scores.masked_fill(~members, float("-inf")), descending=True, stable=True).indices
        keep[order[:budget]] = True
    if newlines == "all":
        keep |= layout.newline
    elif layout.newline.any():
        row_key = layout.grid * (int(layout.row.max()) + 1) + layout.row
        kept_rows = row_key[keep]
        keep |= layout.newline & torch.isin(row_key, kept_rows)
    return keep.nonzero().squeeze(1)


def summarise_image(sel, layout, features, keep, wanted, sizes):
    """Add an image's summary tokens (selector ``sel``, ``wanted`` of them) to its kept indices ``keep``:
    ``(kept, groups, sizes, replacement or None)``; with ``size_bias`` alone, the sizes of nearest-feature
    assignment.  ``features``: the image's LLM-input features [n, D]; ``sizes``: the method's own or None."""
    if not (sel.summary or (sel.size_bias and sizes is None)):
        return keep, [], sizes, None
    if features is None:
        raise RuntimeError("vtprune: summary tokens need the image's features; the vision tower's run was not seen")
    content = ~layout.newline
    dropped = content.clone()
    dropped[keep] = False
    if not sel.summary:
        kept_content = keep[content[keep]]
        return keep, [], summaries.nearest_sizes(features, kept_content, dropped.nonzero().squeeze(1), layout.n), None
    parts = [(dropped, wanted)] if not isinstance(wanted, dict) else \
        [(dropped & (layout.tiles == t), k) for t, k in wanted.items()]
    groups = []
    for members, k in parts:
        groups += summaries.summarise(features, layout, members.nonzero().squeeze(1), k,
                                      sel.summary_group, sel.summary_feature)
    sizes = torch.ones(layout.n)
    for pos, members, _ in groups:
        sizes[pos] = float(members.numel())
    placed = torch.tensor([pos for pos, _, _ in groups], dtype=torch.long)
    if sel.size_bias and groups:  # every dropped token joins the kept or summary token closest to it
        feats = features.float().clone()
        for pos, _, feat in groups:
            if feat is not None:
                feats[pos] = feat
        stand = torch.cat([keep[content[keep]], placed])
        rest = dropped.clone()
        rest[placed] = False
        sizes = summaries.nearest_sizes(feats, stand, rest.nonzero().squeeze(1), layout.n)
    keep = torch.sort(torch.cat([keep, placed])).values
    means = [(pos, feat) for pos, _, feat in groups if feat is not None]
    rep = (torch.tensor([p for p, _ in means]), torch.stack([f for _, f in means])) if means else None
    return keep, groups, sizes, rep
