"""Which visual tokens a pre-LLM method keeps in one call: scores, budgets, the rectangular cut."""

from __future__ import annotations

import time

import torch

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

    def plan(self, image_mask, capture, chunk_mask, device):
        """``(cut or None, Forward)``: the cut ``(index, real)`` of this call (None when all is kept).

        When image tokens are dropped, left padding (mask 0 before a row's first real token) is dropped
        too; other masked positions stay, masked, so that every position whose output the caller may
        read (right padding, the last position) keeps its place.
        """
        start = time.perf_counter()
        image_mask = image_mask.detach().cpu()
        batch, length = image_mask.shape
        images = self.adapter.images(image_mask, capture or {"counts": [], "features": []})
        if self.selector is None:  # in-LLM and attention methods: every token enters the LLM
            kept = [torch.arange(img.layout.n) for img in images]
            record, _ = self._record(images, kept, batch, length, start, None)
            return None, record
        scores, replacements, budgets = self._select(images, capture)
        kept = [top_tokens(s, img.layout, k) for s, img, k in zip(scores, images, budgets)]
        self.replacements = [(img.row, img.positions[idx], feats) for img, rep in zip(images, replacements)
                             if rep is not None for idx, feats in [rep]]
        record, drop = self._record(images, kept, batch, length, start, scores)
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

    def _select(self, images, capture):
        """Scores, merged replacements and budgets of every image; a re-used capture re-uses its selection."""
        if capture is not None and "selection" in capture:
            return capture["selection"]
        ctx = ScoreContext(layouts=[img.layout for img in images], budgets=self._budgets(images),
                           rows=[img.row for img in images], features=[img.features for img in images],
                           generator=self.generator)
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
        scores = list(self.selector.score(ctx))
        first = {}
        for i, img in enumerate(images):  # copies of one image (an expanded batch) share its selection
            if img.features is not None:
                scores[i] = scores[first.setdefault(id(img.features), i)]
        selection = (scores, ctx.replacements, ctx.budgets)  # a method may set its own budgets (pool, visionzip)
        if capture is not None:
            capture["selection"] = selection
        return selection

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
