"""LLaVA-1.5 (``LlavaForConditionalGeneration``): one CLIP grid per image, [CLS] dropped by default."""

from __future__ import annotations

import torch

from vtprune.families.llava import LLAVA
from vtprune.layout import ImageLayout

from .base import Adapter


def clip_layout(n: int, side: int) -> ImageLayout:
    """A square ``side`` x ``side`` grid, with a leading [CLS] token when ``n`` is one larger.

    LLM token j comes from CLIP token j + 1 (the [CLS] at 0 is dropped by the "default" strategy).
    """
    if n == side * side:
        layout = ImageLayout.from_grids([(side, side)])
        layout.source = (torch.arange(n) + 1)[:, None]
    elif n == side * side + 1:
        layout = ImageLayout.from_grids([(side, side)], lead=1)
        layout.source = torch.arange(n)[:, None]
    else:
        layout = ImageLayout.flat(n)
    return layout


def clip_sites(tower) -> list:
    """q/k projections of every CLIP encoder layer (transformers 5.x flattens the CLIP vision model)."""
    layers = tower.vision_model.encoder.layers if hasattr(tower, "vision_model") else tower.encoder.layers
    return [(l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.num_heads, l.self_attn.scale) for l in layers]


class LlavaAdapter(Adapter):
    facts = LLAVA

    def cls_sites(self):
        return clip_sites(self.inner.vision_tower)

    def projector(self):
        return self.inner.multi_modal_projector

    def layout(self, i, n, capture):
        vision = self.model.config.vision_config
        return clip_layout(n, vision.image_size // vision.patch_size)
