"""Which visual tokens a pre-LLM method keeps in one call: scores, budgets, the rectangular cut."""

from __future__ import annotations

import time

import torch

from . import summary as summaries
from .budget import tokens_to_keep
from .methods import ScoreContext
from .records import Forward
from .select import plan_cut, top_tokens


class Selection:
    def __init__(self, adapter, selector, capture):
        self.adapter = adapter
        self.selector = selector
        self.capture = capture  # the Capture runtime (its tower layers)
        self.generator = torch.Generator().manual_seed(int(getattr(selector, "seed", 0)))
        self.replacements = []  # (row, positions, features): merged tokens (pool) replace their anchors

    def plan(self, image_mask, capture, chunk_mask, embeds):
        """``(cut or None, Forward)``: the cut ``(index, real)`` of this call (None when all is kept).

        When image tokens are dropped, left padding (mask 0 before a row's first real token) is dropped
        too; other masked positions stay, masked, so that every position whose output the caller may
        read (right padding, the last position) keeps its place.
        """
        start = time.perf_counter()
        device = embeds.device
        raw_mask = image_mask
        image_mask = image_mask.detach().cpu()
        batch, length = image_mask.shape
        images = self.adapter.images(image_mask, capture or {"counts": [], "features": []})
        if self.selector is None:  # in-LLM and attention methods: every token enters the LLM
            kept = [torch.arange(img.layout.n) for img in images]
            record, _ = self._record(images, kept, batch, length, start, None)
            return None, record
        text = (lambda: self._instructions(images, embeds, raw_mask, chunk_mask)) if self.selector.needs_text else None
        scores, replacements, kept, sizes, groups = self._select(images, capture, text)
        self.replacements = [(img.row, img.positions[idx], feats) for img, rep in zip(images, replacements)
                             if rep is not None for idx, feats in [rep]]
        record, drop = self._record(images, kept, batch, length, start, scores)
        record.summaries = [[] for _ in range(batch)]
        for img, group in zip(images, groups):
            record.summaries[img.row].append([(pos, members) for pos, members, _ in group])
        if self.selector.weighs and any(s is not None for s in sizes):
            record.sizes = [[] for _ in range(batch)]
            record.weights = torch.zeros(batch, length)
            for img, keep, size in zip(images, kept, sizes):
                size = size if size is not None else torch.ones(img.layout.n)
                record.sizes[img.row].append(size[keep])
                record.weights[img.row, img.positions[keep]] = size[keep].float().log()
        if not drop.any():
            return None, record
        if chunk_mask is not None:  # left padding goes too
            pad = chunk_mask.detach().cpu() == 0
            drop |= pad & (~pad).long().cumsum(1).eq(0)
        index, real = plan_cut([(~drop[b]).nonzero().squeeze(1) for b in range(batch)], length, device)
        record.llm_length = index.shape[1]
        record.pad_slots = (~real).sum(1).tolist()
        record.cut = (index, real)
        return (index, real), record

    @staticmethod
    def _instructions(images, embeds, image_mask, chunk_mask) -> list:
        """Per image: the input embeddings of its sample's real text tokens after its last image (all its
        text tokens when none follow)."""
        out = []
        image_mask = image_mask.to(embeds.device)
        for img in images:
            visual = image_mask[img.row]
            real = chunk_mask[img.row].to(embeds.device).bool() if chunk_mask is not None else torch.ones_like(visual)
            text = real & ~visual
            after = text & (torch.arange(visual.numel(), device=visual.device) > visual.nonzero().max())
            out.append(embeds[img.row, after if bool(after.any()) else text].detach())
        return out

    def _select(self, images, capture, text=None):
        """Per image: scores, merged replacements, kept indices, sizes (or None) and summary groups;
        a re-used capture re-uses its selection."""
        if capture is not None and "selection" in capture:
            return capture["selection"]
        budgets, wanted = zip(*[self._split(b) for b in self._budgets(images)]) if images else ((), ())
        ctx = ScoreContext(layouts=[img.layout for img in images], budgets=list(budgets),
                           rows=[img.row for img in images], features=[img.features for img in images],
                           generator=self.generator, instructions=text() if text is not None else [])
        layers = self.capture.tower_layers
        if layers:
            towers = (capture or {}).get("cls", {})
            if set(towers) != set(layers):
                raise RuntimeError("vtprune: the vision tower ran without the [CLS] attention hooks firing")
            ctx.cls_attention = {layer: [self.adapter.tower_to_llm(img, towers[layer]) for img in images]
                                 for layer in layers}
        if self.selector.merges:
            selected = (capture or {}).get("selected")
            if selected is None:
                raise RuntimeError("vtprune: the projector ran without the merging hook firing")
            ctx.tower_selected = [(self.adapter.tower_to_llm(img, selected) > 0).float() for img in images]
            sizes = (capture or {}).get("sizes")
            if sizes is not None:
                ctx.tower_sizes = [self.adapter.tower_to_llm(img, sizes) for img in images]
        scores = list(self.selector.score(ctx))
        first = {}
        for i, img in enumerate(images):  # copies of one image (an expanded batch) share its selection
            if img.features is not None:
                scores[i] = scores[first.setdefault(id(img.features), i)]
        # a method may set its own budgets (pool, visionzip)
        kept = [top_tokens(s, img.layout, k, self.selector.newlines) for s, img, k in zip(scores, images, ctx.budgets)]
        groups = [[] for _ in images]
        for i, img in enumerate(images):
            kept[i], groups[i], ctx.sizes[i], rep = self._summarise(img, kept[i], wanted[i], ctx.sizes[i])
            if rep is not None:
                ctx.replacements[i] = rep
        selection = (scores, ctx.replacements, kept, ctx.sizes, groups)
        if capture is not None:
            capture["selection"] = selection
        return selection

    def _split(self, budget):
        return split_budget(self.selector.summary, budget)

    def _summarise(self, img, keep, wanted, sizes):
        return summarise_image(self.selector, img.layout, img.features, keep, wanted, sizes)

    def _budgets(self, images) -> list:
        if self.selector.scope == "tile":
            return [self._tile_budgets(img.layout) for img in images]
        return [tokens_to_keep(self.selector.keep, img.layout.n_content) for img in images]

    def _tile_budgets(self, layout) -> dict:
        content = ~layout.newline
        tiles = layout.tiles[content]
        return {int(t): tokens_to_keep(self.selector.keep, int((tiles == t).sum())) for t in tiles.unique() if t >= 0}

    @staticmethod
    def _record(images, kept, batch, length, start, scores):
        """The call's ``Forward`` record and the bool [B, L] mask of the tokens it drops."""
        drop = torch.zeros(batch, length, dtype=torch.bool)
        per_sample = [[] for _ in range(batch)]
        layouts = [[] for _ in range(batch)]
        for img, keep in zip(images, kept):
            gone = torch.ones(img.layout.n, dtype=torch.bool)
            gone[keep] = False
            drop[img.row, img.positions[gone]] = True
            per_sample[img.row].append(keep)
            layouts[img.row].append(img.layout)
        record = Forward(kept=per_sample, layouts=layouts, scores=scores, length=length, llm_length=length,
                         images=[(img.row, img.layout.n, k.numel()) for img, k in zip(images, kept)],
                         time_score_s=time.perf_counter() - start)
        return record, drop


def split_budget(summary: int, budget):
    """(the selector's budget, summary tokens) of an image's (or each tile's: a dict) budget: at most
    budget - 1 summary tokens."""
    if isinstance(budget, dict):
        parts = {t: split_budget(summary, k) for t, k in budget.items()}
        return {t: p[0] for t, p in parts.items()}, {t: p[1] for t, p in parts.items()}
    n = min(summary, max(budget - 1, 0))
    return budget - n, n


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
