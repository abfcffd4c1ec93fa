"""LLaVA-1.5 in vLLM with vtprune's pre-LLM selection: fewer image placeholders, the kept feature rows."""

from __future__ import annotations

import torch

from ..budget import tokens_to_keep
from ..layout import ImageLayout
from ..methods import ScoreContext
from ..scoring import pool_windows, total_budget
from ..select import top_tokens


def kept_count(config, n: int) -> int:
    """How many of an image's ``n`` tokens the served method keeps (a function of ``n`` and ``keep`` only)."""
    k = tokens_to_keep(config.keep, n)
    if config.name == "pool":
        side = int(round(n ** 0.5))
        anchors, _ = pool_windows(ImageLayout.from_grids([(side, n // side)]), total_budget(k))
        return int(anchors.numel())
    return k


def select(config, features: torch.Tensor, generator) -> tuple:
    """``(kept indices, rows)``: which of one image's features [n, D] enter the LLM, and the rows that do
    (merged rows for ``pool``)."""
    n = features.shape[0]
    side = int(round(n ** 0.5))
    layout = ImageLayout.from_grids([(side, n // side)]) if side * (n // side) == n else ImageLayout.flat(n)
    k = tokens_to_keep(config.keep, n)
    ctx = ScoreContext(layouts=[layout], budgets=[k], rows=[0], features=[features.float().cpu()],
                       generator=generator)
    (scores,) = config.score(ctx)
    kept = top_tokens(scores, layout, ctx.budgets[0])
    out = features[kept.to(features.device)]
    if ctx.replacements[0] is not None:  # pool: the windows' means at their anchors
        anchors, merged = ctx.replacements[0]
        position = {int(a): i for i, a in enumerate(kept.tolist())}
        out = out.clone()
        for a, row in zip(anchors.tolist(), merged):
            out[position[a]] = row.to(out.dtype)
    return kept, out


def pruned_llava(config):
    from vllm.model_executor.models.llava import (LlavaDummyInputsBuilder, LlavaForConditionalGeneration,
                                                  LlavaMultiModalProcessor, LlavaProcessingInfo)
    from vllm.multimodal import MULTIMODAL_REGISTRY

    class PrunedLlavaInfo(LlavaProcessingInfo):
        def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
            n = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
            return kept_count(config, n)

    @MULTIMODAL_REGISTRY.register_processor(LlavaMultiModalProcessor, info=PrunedLlavaInfo,
                                            dummy_inputs=LlavaDummyInputsBuilder)
    class PrunedLlava(LlavaForConditionalGeneration):
        vtprune_config = config

        def embed_multimodal(self, **kwargs):
            features = super().embed_multimodal(**kwargs)
            if not hasattr(self, "_vtprune_generator"):
                self._vtprune_generator = torch.Generator().manual_seed(int(getattr(config, "seed", 0)))
            return [select(config, f, self._vtprune_generator)[1] for f in features]

    return PrunedLlava
