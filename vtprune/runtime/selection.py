"""Which visual tokens a pre-LLM method keeps in one call of the HF model: the images the adapter finds,
what the vision tower's run recorded of them, handed to ``vtprune.choose`` (the selection the vLLM binding
runs too), and the call's record and rectangular cut."""

from __future__ import annotations

import dataclasses
import time
import warnings

import torch

from ..choose import Seen, choose
from ..methods.base import budget_of
from .cut import plan_cut
from .records import Forward


class Selection:
    def __init__(self, adapter, selector, capture):
        self.adapter = adapter
        self.selector = selector
        self.capture = capture  # the Capture runtime (its tower layers)
        self.generator = torch.Generator().manual_seed(int(getattr(selector, "seed", 0)))
        self.replacements = []  # (row, positions, features): merged tokens (pool) replace their anchors
        self.warned = False  # an int keep above an image's tokens was reported

    def plan(self, visual_mask, media, capture, chunk_mask, embeds):
        """``(cut or None, Forward)``: the cut ``(index, real)`` of this call (None when all is kept).

        ``visual_mask`` [B, q]: the image and video tokens; ``media``: each medium's own mask.  Images
        and videos are selected alike, each clip with its own budget.  When visual tokens are dropped,
        left padding (mask 0 before a row's first real token) is dropped too; other masked positions stay,
        masked, so that every position whose output the caller may read (right padding, the last position)
        keeps its place.
        """
        start = time.perf_counter()
        device = embeds.device
        batch, length = visual_mask.shape
        images = self.items(media, capture)
        if self.selector is None:  # in-LLM and attention methods: every token enters the LLM
            kept = [torch.arange(img.layout.n) for img in images]
            record, _ = self._record(images, kept, batch, length, start, None)
            return None, record
        text = (lambda: self._instructions(images, embeds, visual_mask, chunk_mask)) if self.selector.needs_text else None
        choices = self._select(images, capture, text)
        self.replacements = [(img.row, img.positions[idx], feats) for img, c in zip(images, choices)
                             if c.replacement is not None for idx, feats in [c.replacement]]
        record, drop = self._record(images, [c.kept for c in choices], batch, length, start,
                                    [c.scores for c in choices])
        record.summaries, record.merged = [[] for _ in range(batch)], [[] for _ in range(batch)]
        record.capped = [[] for _ in range(batch)]
        for img, c in zip(images, choices):
            record.summaries[img.row].append([(pos, members) for pos, members, _ in c.groups])
            record.merged[img.row].append(c.members)
            record.capped[img.row].append(self._capped(img.layout))
        if self.selector.weighs and any(c.sizes is not None for c in choices):
            record.sizes = [[] for _ in range(batch)]
            record.weights = torch.zeros(batch, length)
            for img, c in zip(images, choices):
                size = c.sizes if c.sizes is not None else torch.ones(img.layout.n)
                record.sizes[img.row].append(size[c.kept])
                record.weights[img.row, img.positions[c.kept]] = size[c.kept].float().log()
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

    def _capped(self, layout) -> bool:
        """Whether an int ``keep`` asks for more tokens than the image (or one of its tiles or frames) has: all
        are kept, and the first time a wrap sees it, a warning says so (``stats`` marks it per image)."""
        keep = self.selector.keep
        if not isinstance(keep, int):
            return False
        budget = budget_of(self.selector, layout)
        capped = any(k < keep for k in budget.values()) if isinstance(budget, dict) else budget < keep
        if capped and not self.warned:
            self.warned = True
            warnings.warn(f"vtprune: {self.selector.name} keep={keep} asks for more visual tokens than an image or "
                          f"clip ({layout.n_content}) or one of its parts has: all of them are kept (vtprune.stats "
                          "marks it 'budget_capped'); a float keeps a share instead", UserWarning, stacklevel=2)
        return capped

    def items(self, media, capture) -> list:
        """The :class:`ImageRef` of every image and clip of the call, in prompt order."""
        refs = []
        for medium, mask in media.items():
            seen = ((capture or {}).get("media") or {}).get(medium) or {"counts": [], "features": []}
            for ref in self.adapter.images(mask.detach().cpu(), seen):
                if ref.layout.media != medium:  # (adapters may cache layouts: a copy)
                    ref = ref._replace(layout=dataclasses.replace(ref.layout, media=medium))
                refs.append(ref)
        return sorted(refs, key=lambda ref: (ref.row, int(ref.positions[0])))

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
        """Per image, its ``vtprune.choose.Choice``; a re-used capture re-uses its selection."""
        if capture is not None and "selection" in capture:
            return capture["selection"]
        seen = [Seen(img.layout, img.features, img.row, stacked=img.stacked) for img in images]
        for one, instruction in zip(seen, text() if text is not None else []):
            one.instruction = instruction
        runs = (capture or {}).get("media") or {}  # each medium's tower run
        layers = self.capture.tower_layers
        if layers:
            for one, img in zip(seen, images):
                towers = runs.get(img.layout.media, {}).get("cls", {})
                if set(towers) != set(layers):
                    raise RuntimeError("vtprune: the vision tower ran without the [CLS] attention hooks firing")
                one.cls = {layer: self.adapter.tower_to_llm(img, towers[layer]) for layer in layers}
        if self.selector.merges:
            for one, img in zip(seen, images):
                selected, sizes = (runs.get(img.layout.media, {}).get(key) for key in ("selected", "sizes"))
                if selected is None:
                    raise RuntimeError("vtprune: the projector ran without the merging hook firing")
                one.selected = self.adapter.tower_to_llm(img, selected)
                one.sizes = self.adapter.tower_to_llm(img, sizes) if sizes is not None else None
        choices = choose(self.selector, seen, self.generator)
        if capture is not None:
            capture["selection"] = choices
        return choices

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

