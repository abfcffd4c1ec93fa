"""InternVL (HF format, vLLM's ``InternVLForConditionalGeneration`` → its InternS1 class) with vtprune's
pre-LLM selection: each image is a run of tiles of ``image_seq_length`` tokens (a square grid each, after
pixel shuffle), chosen among as one image (the HF wrap's ``scope="image"``).  The placeholder count is
cut between ``<img>`` and ``</img>``; positions are numbered afresh (1-D, the HF wrap's
``positions="renumber"``).  Images only."""

from __future__ import annotations

import math

from .bias import Weighing
from .select import attach, keep_rows, kept_count, with_bias


def tile_grids(n: int, per_tile: int) -> list:
    """The tiles of an image of ``n`` tokens, ``per_tile`` each: square grids where ``per_tile`` is square."""
    side = math.isqrt(per_tile)
    if n % per_tile:
        raise ValueError(f"an InternVL image of {n} tokens is not a whole number of {per_tile}-token tiles")
    return [(side, side) if side * side == per_tile else (1, per_tile)] * (n // per_tile)


def pruned_internvl(config):
    from vllm.model_executor.models.interns1 import (InternS1DummyInputsBuilder, InternS1ForConditionalGeneration,
                                                     InternS1MultiModalProcessor, InternS1ProcessingInfo)
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.multimodal.processing import PromptReplacement, PromptUpdateDetails

    class PrunedInternVLInfo(InternS1ProcessingInfo):
        def get_num_image_tokens(self, *, image_width, image_height, processor, mm_kwargs) -> int:
            n = super().get_num_image_tokens(image_width=image_width, image_height=image_height, processor=processor,
                                             mm_kwargs=mm_kwargs)
            return kept_count(config, n, tile_grids(n, processor.image_seq_length))

    class PrunedInternVLProcessor(InternS1MultiModalProcessor):
        def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
            hf = self.info.get_hf_processor(**hf_processor_mm_kwargs)
            context = hf.image_token_id
            updates = []
            for update in super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
                if update.modality == "image":
                    def replacement(item_idx, full=update.replacement):
                        ids = list(full(item_idx).full)  # <img> context x n </img>
                        first, n = ids.index(context), ids.count(context)
                        k = kept_count(config, n, tile_grids(n, hf.image_seq_length))
                        return PromptUpdateDetails.select_token_id(ids[:first] + [context] * k + ids[first + n:],
                                                                   context)

                    update = PromptReplacement(modality="image", target=update.target, replacement=replacement)
                updates.append(update)
            return updates

    @MULTIMODAL_REGISTRY.register_processor(PrunedInternVLProcessor, info=PrunedInternVLInfo,
                                            dummy_inputs=InternS1DummyInputsBuilder)
    class PrunedInternVL(Weighing, InternS1ForConditionalGeneration):
        vtprune_config = config

        def __init__(self, *, vllm_config, prefix: str = ""):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
            attach(self, config)

        def embed_multimodal(self, **kwargs):
            if kwargs.get("pixel_values_videos") is not None:
                raise ValueError("vtprune serving prunes images; this InternVL model was given a video")
            out = []
            for rows in super().embed_multimodal(**kwargs):
                grids = tile_grids(rows.shape[0], self.config.image_seq_length)
                out.append(with_bias(*keep_rows(self, config, rows, grid=grids)[1:]))
            return out

    return PrunedInternVL
