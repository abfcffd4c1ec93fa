"""LLaVA-1.5 (``LlavaForConditionalGeneration``): one CLIP grid per image, [CLS] dropped by default."""

from __future__ import annotations

from vtprune.layout import ImageLayout

from .base import Adapter


def clip_layout(n: int, side: int) -> ImageLayout:
    """A square ``side`` x ``side`` grid, with a leading [CLS] token when ``n`` is one larger."""
    if n == side * side:
        return ImageLayout.from_grids([(side, side)])
    if n == side * side + 1:
        return ImageLayout.from_grids([(side, side)], lead=1)
    return ImageLayout.flat(n)


class LlavaAdapter(Adapter):
    family = "llava"
    classes = ("LlavaForConditionalGeneration",)

    def layout(self, i, n, capture):
        vision = self.model.config.vision_config
        return clip_layout(n, vision.image_size // vision.patch_size)
