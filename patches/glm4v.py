"""GLM-4.1V (``Glm4vForConditionalGeneration``): Qwen2-VL's token layout and numbering on its own tower.

An image of patch grid (t, h, w) gives t slices of (h/m) x (w/m) LLM tokens in raster order; the tower runs
the patches in m x m group order and a strided convolution merges each group.  Positions are 3-D (mrope),
kept as the stock model numbers them, with ``rope_deltas`` shifted by the dropped tokens as on Qwen
(``vtprune.patches.qwen_vl``).  No [CLS]: [CLS]-attention methods read the attention each patch receives in
the tower's last block, from its fused ``qkv`` with the block's rotary embedding, over its ``cu_seqlens``
segments.
"""

from __future__ import annotations

from vtprune.families.glm4v import GLM4V

from .qwen_vl import QwenVLAdapter


class Glm4vAdapter(QwenVLAdapter):
    facts = GLM4V
