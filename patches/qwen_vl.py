"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL (dense and MoE): dynamic-resolution grids, 3-D (mrope) positions, deepstack.

An image of patch grid (t, h, w) gives t frames of (h/m) x (w/m) LLM tokens (m = spatial merge
size), in raster order (Qwen2.5-VL un-permutes its window order before the LLM).  Positions are
3-D; the core gathers them like any other position ids.  Two family details:

* ``rope_deltas``: a manual decode step without ``position_ids`` positions the new token at
  ``cache length + rope_deltas``.  The cache is shorter by the dropped tokens, so the adapter adds
  their number to ``model.model.rope_deltas``.  Its other reader, ``generate`` continuing from a
  cache (``_prepare_position_ids_for_generation``), counts positions from the attention mask,
  which has every token: it is shown the stock value.
* Qwen3-VL deepstack: ``visual_pos_masks`` and the per-layer ``deepstack_visual_embeds`` are cut
  with the same index.

No [CLS]: the substitute score.  The Qwen towers have no [CLS] token, so [CLS]-attention methods
(``fastervlm``, ``vtc_cls``) read instead, in the same layer, the attention each patch *receives*:
softmax(q k^T / sqrt(d)) over the keys of its own image (the ``cu_seqlens`` segment of a
full-attention block; a window of Qwen2.5-VL's windowed blocks), averaged over all query patches
and over heads.  A patch that every other patch looks at — the global saliency the [CLS] row
measures in CLIP — scores high.  An LLM token sums the scores of the 2x2 patches it merges.  q and k
are read from the block's fused ``qkv`` output with the block's own rotary embedding applied, so the
tower keeps its SDPA/flash attention; queries are processed in chunks to bound memory, and an image
of more than 512 patches averages over 512 evenly strided query rows (the cost stays linear in
the patches instead of quadratic).
"""

from __future__ import annotations

import functools
import sys

import torch

from vtprune import tower_scores
from vtprune.families.qwen_vl import QWEN2_5_VL, QWEN2_VL, QWEN3_VL, QWEN3_VL_MOE, merged_sources
from vtprune.layout import ImageLayout

from .base import Adapter


class QwenVLAdapter(Adapter):
    facts = QWEN2_VL

    def __init__(self, model):
        super().__init__(model)
        self._rope_base = None
        self._rope_set = None

    def capture(self, args, kwargs, output, medium="image"):
        out = super().capture(args, kwargs, output, medium)
        grid = kwargs.get(f"{medium}_grid_thw", args[1] if len(args) > 1 else None)
        out["grid_thw"] = [tuple(int(v) for v in g) for g in grid]
        return out

    def layout(self, i, n, capture):
        t, h, w = capture["grid_thw"][i]
        m = self.model.config.vision_config.spatial_merge_size
        shapes = [(h // m, w // m)] * t
        if sum(a * b for a, b in shapes) != n:
            return ImageLayout.flat(n)
        layout = ImageLayout.from_grids(shapes)  # one grid per temporal slice (a clip's frames)
        layout.frame = layout.grid.clone()
        layout.source = self._sources(capture)[i]
        return layout

    def family_images(self, image_mask, capture):
        # the tower encodes all images as one sequence: tower "tile" 0 holds every patch
        return [ref._replace(tiles=[0]) for ref in super().family_images(image_mask, capture)]

    # ------------------------------------------------------------------ tower
    def _blocks(self):
        return self.inner.visual.blocks

    def tower_depth(self):
        return len(self._blocks())

    def feature_layer(self):
        return self.tower_depth() - 1  # the merger reads the last block's output

    def _group_order(self, grid):
        """For every LLM token (all images, in order), the position of its 2x2 group in the tower sequence."""
        m = self.model.config.vision_config.spatial_merge_size
        return torch.arange(int((grid.prod(-1) // m**2).sum()))

    def _sources(self, capture):
        if "sources" not in capture:
            grid = torch.tensor(capture["grid_thw"])
            merge = self.model.config.vision_config.spatial_merge_size
            order = self._group_order(grid)
            sources, start = [], 0
            for n in (grid.prod(-1) // merge ** 2).tolist():
                sources.append(merged_sources(order[start:start + n], merge))
                start += n
            capture["sources"] = sources
        return capture["sources"]

    def hook_tower(self, layer, sink, kind="received"):
        """The ``vtprune.tower_scores`` formula ``kind`` on the block's queries and keys, read from its
        fused ``qkv`` output with the block's own rotary embedding applied; each ``cu_seqlens`` segment
        (an image in a full-attention block, a window otherwise) attends within itself."""
        self.refuse_cls(kind)
        attn = self._blocks()[layer].attn
        rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision
        box = {}

        def on_attn(module, args, kwargs):
            box["cu_seqlens"] = kwargs.get("cu_seqlens", args[1] if len(args) > 1 else None)
            box["position_embeddings"] = kwargs.get("position_embeddings")

        def on_qkv(module, args, qkv):
            seq = qkv.shape[0]
            q, k, _ = qkv.reshape(seq, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
            cos, sin = box.pop("position_embeddings")
            q, k = rotary(q, k, cos, sin)
            bounds = box.pop("cu_seqlens").tolist()
            sink(tower_scores.received(q, k, list(zip(bounds[:-1], bounds[1:])), attn.scaling)[None])

        return [attn.register_forward_pre_hook(on_attn, with_kwargs=True), attn.qkv.register_forward_hook(on_qkv)]

    def after_cut(self, state):
        current = getattr(self.inner, "rope_deltas", None)
        if current is None:
            return
        if current is not self._rope_set:
            self._rope_base = current
        self._rope_set = self._rope_base + state.dropped
        self.inner.rope_deltas = self._rope_set

    def install(self, installed):
        if hasattr(self.model, "_prepare_position_ids_for_generation"):
            installed.wrap(self.model, "_prepare_position_ids_for_generation", self._stock_rope_deltas)

    def _stock_rope_deltas(self, original):
        @functools.wraps(original)
        def prepare(*args, **kwargs):
            shifted = self._rope_set is not None and self.inner.rope_deltas is self._rope_set
            if shifted:
                self.inner.rope_deltas = self._rope_base
            try:
                return original(*args, **kwargs)
            finally:  # unless the call computed them afresh (a prompt with new media)
                if shifted and self.inner.rope_deltas is self._rope_base:
                    self.inner.rope_deltas = self._rope_set

        return prepare

    def reset(self):
        if self._rope_set is not None and self.inner.rope_deltas is self._rope_set:
            self.inner.rope_deltas = self._rope_base
        self._rope_base = self._rope_set = None


class Qwen25VLAdapter(QwenVLAdapter):
    facts = QWEN2_5_VL

    def _group_order(self, grid):
        from transformers.vision_utils import get_vision_window_index

        vision = self.model.config.vision_config
        window_index, _ = get_vision_window_index(grid, vision.spatial_merge_size, vision.window_size,
                                                  vision.patch_size)
        return torch.argsort(window_index)


class Qwen3VLAdapter(QwenVLAdapter):
    facts = QWEN3_VL

    def capture(self, args, kwargs, output, medium="image"):
        out = super().capture(args, kwargs, output, medium)
        layers = getattr(output, "deepstack_features", None)  # per deepstack layer, per image [n, D]
        if layers:
            out["stacked"] = [torch.cat([layer[i] for layer in layers], -1) for i in range(len(out["features"]))]
        return out

    def first_exit_layer(self):
        # deepstack adds visual features to the hidden states after layers 0..n-1
        return len(self.model.config.vision_config.deepstack_visual_indexes)

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


class Qwen3VLMoeAdapter(Qwen3VLAdapter):
    facts = QWEN3_VL_MOE  # Qwen3-VL with a mixture-of-experts language model: the same tower, deepstack and positions
