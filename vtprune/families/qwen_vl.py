"""Qwen2-VL, Qwen2.5-VL, Qwen3-VL: a ViT without [CLS] whose patch merger joins 2 x 2 patches before the
projector's output, (t, h, w) mrope positions, images and videos."""

import torch

from .base import Family, register

_QWEN = dict(tower="Qwen ViT", cls_token=False, merges_before_projector=True, positions="mrope",
             media=("image", "video"))
QWEN2_VL = register(Family("qwen2_vl", ("Qwen2VLForConditionalGeneration",), **_QWEN))
QWEN2_5_VL = register(Family("qwen2_5_vl", ("Qwen2_5_VLForConditionalGeneration",), **_QWEN))
QWEN3_VL = register(Family("qwen3_vl", ("Qwen3VLForConditionalGeneration",), **_QWEN))


def merged_sources(groups: torch.Tensor, merge: int) -> torch.Tensor:
    """``[n, merge^2]``: the tower tokens each of an image's ``n`` LLM tokens merges, from ``groups`` [n], the
    position of each token's ``merge x merge`` group in the tower's sequence (the tower runs groups in the
    raster order, or a windowed tower's order)."""
    m2 = merge * merge
    return groups[:, None] * m2 + torch.arange(m2)
