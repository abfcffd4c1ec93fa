"""Gemma 3 in vLLM with vtprune's pre-LLM selection, images without pan-and-scan.

An image is ``mm_tokens_per_image`` tokens, a square grid in raster order (SigLIP's patches pooled in the
projector): the prompt's image sequence keeps ``kept_count`` of them and the image's features are selected on
that grid.  Positions are numbered afresh (vLLM numbers the shortened prompt: ``positions="renumber"`` on the HF
wrap).  An image's tokens attend to each other both ways on vLLM's GPU attention backends (``mm_prefix``: the
kept tokens' block, as the HF wrap rebuilds Gemma's masks over them); vLLM's CPU attention has no such blocks and
runs them causally, stock or pruned alike.  [CLS] methods read the attention each patch receives in SigLIP's last
layer (no [CLS] there; ``source="received"``, the HF path's default), summed over the patches each token pools.
"""

from __future__ import annotations

import math

from vtprune.patches.gemma3 import pooled_sources

from ..families.gemma import GEMMA3
from ..layout import ImageLayout
from .bindings import bind
from .request_keep import budgeted
from .rows import attach, keep_rows, kept_count, with_bias
from .slot_bias import Weighing
from .tower import tap_received


def image_layout(config) -> ImageLayout:
    """The square grid of one Gemma 3 image's ``mm_tokens_per_image`` tokens, each pooling a block of the tower's
    patches (``source``, as the HF adapter lays it out)."""
    side = math.isqrt(config.mm_tokens_per_image)
    layout = ImageLayout.from_grids([(side, side)])
    layout.source = pooled_sources(config.vision_config.image_size // config.vision_config.patch_size, side)
    return layout


@bind(GEMMA3)
def pruned_gemma3(config):
    from vllm.model_executor.models.gemma3_mm import (Gemma3DummyInputsBuilder, Gemma3ForConditionalGeneration,
                                                      Gemma3MultiModalProcessor, Gemma3ProcessingInfo)
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.multimodal.processing import PromptUpdateDetails

    class PrunedGemma3Info(Gemma3ProcessingInfo):
        def get_num_crops(self, *, image_width, image_height, processor, mm_kwargs) -> int:
            crops = super().get_num_crops(image_width=image_width, image_height=image_height, processor=processor,
                                          mm_kwargs=mm_kwargs)
            if crops:
                raise ValueError(f"vtprune prunes Gemma 3 images whole: a {image_width} x {image_height} image was "
                                 f"cut into {crops} pan-and-scan crops; serve with do_pan_and_scan=False")
            return crops

        def get_image_repl(self, *, image_width, image_height, processor, mm_kwargs):
            full = super().get_image_repl(image_width=image_width, image_height=image_height, processor=processor,
                                          mm_kwargs=mm_kwargs)
            image = self.get_hf_config().image_token_index
            first = full.full.index(image)
            n = sum(token == image for token in full.full)
            ids = full.full[:first] + [image] * kept_count(config, n, layout=image_layout(self.get_hf_config())) + \
                full.full[first + n:]
            return PromptUpdateDetails.select_token_id(ids, image)

        def get_num_image_tokens(self, *, image_width, image_height, processor, mm_kwargs) -> int:
            n = super().get_num_image_tokens(image_width=image_width, image_height=image_height, processor=processor,
                                             mm_kwargs=mm_kwargs)
            return kept_count(config, n, layout=image_layout(self.get_hf_config()))

    Processor = budgeted(Gemma3MultiModalProcessor, config)  # a request's own keep (vtprune.serving.request_keep)
    @MULTIMODAL_REGISTRY.register_processor(Processor, info=PrunedGemma3Info,
                                            dummy_inputs=Gemma3DummyInputsBuilder)
    class PrunedGemma3(Weighing, Gemma3ForConditionalGeneration):
        vtprune_config = config

        def __init__(self, *, vllm_config, prefix: str = ""):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
            attach(self, config)
            layers = self.vision_tower.vision_model.encoder.layers  # the projector pools the last one's output
            self.vtprune_tap = tap_received(config, layers, len(layers), len(layers) - 1,
                                            GEMMA3.default_score) if config.needs_cls else None

        def embed_multimodal(self, **kwargs):
            given = self._parse_and_validate_image_input(**kwargs)
            if given is None:
                return []
            tap = self.vtprune_tap
            if tap is not None:
                tap.clear()
            out = []
            for i, rows in enumerate(self._process_image_input(given)):  # (one tower image each: no crops)
                layout = image_layout(self.config)
                tower = tap.tiles(i, 1, layout) if tap is not None else None
                out.append(with_bias(*keep_rows(self, config, rows, tower, layout=layout)[1:]))
            return out

    PrunedGemma3.vtprune_parts = (PrunedGemma3Info, Processor)  # what serving.needs checks against vLLM
    return PrunedGemma3
