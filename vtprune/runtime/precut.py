"""The pre-LLM cut of each language-model call: the stage runtime of selector methods.

A forward pre-hook on the language model (the session's) hands every call here.  With image tokens
and a selector, the kept tokens are gathered (``vtprune.kernels.gather_cut``): ``inputs_embeds``,
the attention mask (2-D; 4-D and per-layer-type dicts through ``vtprune.runtime.masks``) and the position
ids, which keep their original values, so the result equals the full sequence with the dropped
tokens masked out (with the selector's ``positions="renumber"``: each position less the real tokens
cut before it, the shortened sequence numbered afresh).  Rows that keep fewer tokens are padded at
the front with masked slots, like left padding.  Later calls on the same cache get a compacted mask and, without ``position_ids``,
original positions (``vtprune.runtime.sequences``).
"""

from __future__ import annotations

import functools
import time

import torch

from vtprune.kernels import gather_cut

from . import masks
from .selection import Selection
from .stage import StageRuntime


class PreCut(StageRuntime):
    def __init__(self, adapter, selector, capture):
        self.adapter = adapter
        self.selection = Selection(adapter, selector, capture)
        self.forward = None  # the Forward record of the last call with images
        self.made_masks = ()  # 4-D masks generate built on the pruned cache (vtprune.runtime.generation)
        self.renumber = getattr(selector, "positions", "original") == "renumber"

    def install(self) -> list:
        if self.renumber and not self.adapter.flat_positions:
            raise ValueError(f"positions='renumber' numbers 1-D positions afresh; {self.adapter.family} uses (t, h, w) "
                             "mrope positions, which vtprune keeps as they are (use positions='original')")
        return []

    def remove(self):
        self.adapter.reset()

    def begin_call(self, call):
        """Cut the call (``call.cut``, kwargs replaced) and keep its ``Forward`` record."""
        kwargs, state, embeds = call.kwargs, call.state, call.embeds
        batch, q = embeds.shape[:2]
        mask = kwargs.get("attention_mask")
        four_d = masks.is_4d(mask)
        prefix = chunk = None
        if four_d:  # the chunk's padding: columns nobody attends to
            main = masks.primary(mask)
            if main is not None:
                offset = state.orig_len if self._original_columns(main, state, q) else state.cache_len
                chunk = masks.present(main, offset, q).long().expand(batch, q)
        else:
            prefix, chunk = self._split_mask(mask, state, q)
        cut = None
        if call.image_mask is not None:
            cut, self.forward = self.selection.plan(call.image_mask, call.media, call.capture, chunk, embeds)
            call.forward = self.forward
        if cut is None and state.mask is None:  # nothing cut in this sequence: the call as it came
            state.extend(batch, q, embeds.device)
            return
        start = time.perf_counter()
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = (torch.arange(q, device=embeds.device) + state.orig_len).expand(batch, q)
        elif positions.shape[-2] == 1 and batch > 1:
            positions = positions.expand(*positions.shape[:-2], batch, q)
        if self.renumber:
            positions = self._renumber(positions, cut, chunk, state)
        index = real = None
        if cut is not None:
            index, real = cut
            if self.selection.replacements:  # merged tokens (pool) take their anchor token's place
                embeds = embeds.clone()
                for row, pos, feats in self.selection.replacements:
                    embeds[row, pos.to(embeds.device)] = feats.to(embeds.device, embeds.dtype)
            embeds, chunk, positions = gather_cut(embeds, index, real, chunk, positions)
            self.adapter.cut_extra(kwargs, index, real)
        elif chunk is None:
            chunk = torch.ones(batch, q, dtype=torch.long, device=embeds.device)
        if prefix is None:
            prefix = state.mask if state.mask is not None else \
                torch.ones(batch, state.cache_len, dtype=chunk.dtype, device=chunk.device)
        full = torch.cat([prefix.to(chunk.device, chunk.dtype), chunk], dim=1)
        if four_d:
            mask = masks.apply(mask, functools.partial(self._cut_4d, state=state, cut=cut, q=q))
        kwargs.update(inputs_embeds=embeds, attention_mask=mask if four_d else full, position_ids=positions)
        bias = None
        if cut is not None and self.forward.weights is not None:  # log(size) of the kept tokens (vtprune.runtime.size_bias)
            bias = self.forward.weights.to(embeds.device).gather(1, index) * real
        state.extend(batch, q, embeds.device, index, real, bias)
        state.mask = full
        call.cut, call.changed = cut, True
        if cut is not None:
            self.adapter.after_cut(state)
            self.forward.time_gather_s = time.perf_counter() - start

    @staticmethod
    def _renumber(positions, cut, chunk, state):
        """Positions less the real tokens cut before them (this call's cut and earlier ones)."""
        batch, q = positions.shape[-2:]
        before = torch.zeros(batch, q, dtype=torch.long, device=positions.device)
        if state.shift is not None:
            before += state.shift.to(positions.device)[:, None]
        if cut is not None:
            index, real = cut
            kept = torch.zeros(batch, q, dtype=torch.long, device=positions.device)
            kept = kept.scatter_add(1, index.to(positions.device), real.to(positions.device).long()) > 0
            gone = ~kept if chunk is None else ~kept & chunk.to(positions.device).bool()
            before += gone.long().cumsum(1)
            state.shift = before[:, -1].clone()
        return positions - before

    def _original_columns(self, mask, state, q) -> bool:
        """Whether a 4-D mask of this call indexes the original sequence rather than the pruned cache
        (masks ``generate`` builds for a static cache are built on the pruned cache)."""
        return state.slots is not None and mask.shape[-1] == state.orig_len + q \
            and not any(mask is made for made in self.made_masks)

    def _cut_4d(self, mask, state, cut, q):
        """A 4-D mask of this call, re-indexed to the pruned cache and cut with this call's tokens."""
        if self._original_columns(mask, state, q):
            mask = masks.to_cache(mask, state.slots, state.live)
        elif mask.shape[-1] < state.cache_len + q:
            raise ValueError(f"a 4-D attention_mask with {mask.shape[-1]} key columns cannot cover this call: "
                             f"expected {state.orig_len + q} (the full sequence) or at least {state.cache_len + q} "
                             "(the pruned cache)")
        if cut is None:
            return mask
        return masks.cut_chunk(mask, cut[0], cut[1], state.cache_len, q)

    @staticmethod
    def _split_mask(mask, state, q):
        """The compacted mask of the cached tokens and the original mask of the new chunk."""
        if mask is None:
            return state.mask, None
        if mask.dim() != 2:
            raise ValueError(f"attention_mask must be a 2-D padding mask or a 4-D mask, got {mask.dim()}-D")
        if mask.shape[1] == state.orig_len + q:
            prefix, chunk = mask[:, :state.orig_len], mask[:, state.orig_len:]
        elif mask.shape[1] == state.cache_len + q:
            prefix, chunk = mask[:, :state.cache_len], mask[:, state.cache_len:]
        else:
            raise ValueError(f"attention_mask has {mask.shape[1]} columns; expected {state.orig_len + q} "
                             f"(the full sequence) or {state.cache_len + q} (the pruned cache) for this call")
        return (state.mask if state.mask is not None else prefix), chunk
