"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: dynamic-resolution grids, 3-D (mrope) positions, deepstack.

An image of patch grid (t, h, w) gives t frames of (h/m) x (w/m) LLM tokens (m = spatial merge
size), in raster order (Qwen2.5-VL un-permutes its window order before the LLM).  Positions are
3-D; the core gathers them like any other position ids.  Two family details:

* ``rope_deltas``: a manual decode step without ``position_ids`` positions the new token at
  ``cache length + rope_deltas``.  The cache is shorter by the dropped tokens, so the adapter adds
  their number to ``model.model.rope_deltas`` (``generate`` passes explicit positions and does
  not read it).
* Qwen3-VL deepstack: ``visual_pos_masks`` and the per-layer ``deepstack_visual_embeds`` are cut
  with the same index.
"""

from __future__ import annotations

import torch

from vtprune.layout import ImageLayout

from .base import Adapter


class QwenVLAdapter(Adapter):
    family = "qwen2_vl"
    classes = ("Qwen2VLForConditionalGeneration",)

    def __init__(self, model):
        super().__init__(model)
        self._rope_base = None
        self._rope_set = None

    def capture(self, args, kwargs, output):
        out = super().capture(args, kwargs, output)
        grid = kwargs.get("image_grid_thw", args[1] if len(args) > 1 else None)
        out["grid_thw"] = [tuple(int(v) for v in g) for g in grid]
        return out

    def layout(self, i, n, capture):
        t, h, w = capture["grid_thw"][i]
        m = self.model.config.vision_config.spatial_merge_size
        shapes = [(h // m, w // m)] * t
        if sum(a * b for a, b in shapes) != n:
            return ImageLayout.flat(n)
        return ImageLayout.from_grids(shapes)

    def after_cut(self, state):
        current = getattr(self.inner, "rope_deltas", None)
        if current is None:
            return
        if current is not self._rope_set:
            self._rope_base = current
        self._rope_set = self._rope_base + state.dropped
        self.inner.rope_deltas = self._rope_set

    def reset(self):
        if self._rope_set is not None and self.inner.rope_deltas is self._rope_set:
            self.inner.rope_deltas = self._rope_base
        self._rope_base = self._rope_set = None


class Qwen25VLAdapter(QwenVLAdapter):
    family = "qwen2_5_vl"
    classes = ("Qwen2_5_VLForConditionalGeneration",)


class Qwen3VLAdapter(QwenVLAdapter):
    family = "qwen3_vl"
    classes = ("Qwen3VLForConditionalGeneration",)

    def cut_extra(self, kwargs, index, real):
        vis = kwargs.get("visual_pos_masks")
        embeds = kwargs.get("deepstack_visual_embeds")
        if vis is None:
            return
        kept = torch.zeros_like(vis)
        kept.scatter_(1, index, real)
        if embeds is not None:
            rows = kept[vis]
            kwargs["deepstack_visual_embeds"] = [e[rows.to(e.device)] for e in embeds]
        kwargs["visual_pos_masks"] = vis.gather(1, index) & real
