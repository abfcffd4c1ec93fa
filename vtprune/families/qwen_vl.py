"""Qwen2-VL, Qwen2.5-VL, Qwen3-VL (dense and MoE), Qwen3.5 (dense and MoE): a ViT without [CLS] whose patch merger joins 2 x 2 patches before the
projector's output, (t, h, w) mrope positions, images and videos."""

import torch

from .base import Family, register

_QWEN = dict(tower="Qwen ViT", cls_token=False, merges_before_projector=True, positions="mrope",
             media=("image", "video"))
QWEN2_VL = register(Family("qwen2_vl", ("Qwen2VLForConditionalGeneration",), **_QWEN))
QWEN2_5_VL = register(Family("qwen2_5_vl", ("Qwen2_5_VLForConditionalGeneration",), **_QWEN))
QWEN3_VL = register(Family("qwen3_vl", ("Qwen3VLForConditionalGeneration",), **_QWEN))
# Qwen3-VL's tower and deepstack; a mixture-of-experts language model
QWEN3_VL_MOE = register(Family("qwen3_vl_moe", ("Qwen3VLMoeForConditionalGeneration",), **_QWEN))
# Qwen3.5: Qwen3-VL's tower without deepstack; a language model of linear-attention (Gated DeltaNet) layers and
# full-attention ones, dense or mixture-of-experts
QWEN3_5 = register(Family("qwen3_5", ("Qwen3_5ForConditionalGeneration",), **_QWEN))
QWEN3_5_MOE = register(Family("qwen3_5_moe", ("Qwen3_5MoeForConditionalGeneration",), **_QWEN))


def merged_sources(groups: torch.Tensor, merge: int) -> torch.Tensor:
    """``[n, merge^2]``: the tower tokens each of an image's ``n`` LLM tokens merges, from ``groups`` [n], the
    position of each token's ``merge x merge`` group in the tower's sequence (the tower runs groups in the
    raster order, or a windowed tower's order)."""
    m2 = merge * merge
    return groups[:, None] * m2 + torch.arange(m2)
