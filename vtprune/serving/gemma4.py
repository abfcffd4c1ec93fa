"""Gemma 4 in vLLM with vtprune's pre-LLM selection, images only (vLLM refuses a served model's videos up front:
``vtprune.serving.refused_media``; audio passes as it is).

An image is resized at its aspect ratio to a budget of patches, which the tower pools k x k into a grid of
tokens in raster order: the prompt is sized from that grid (``get_image_repl``, as vLLM sizes it before the
image is encoded) and the image's features are selected on the layout read off its patch positions
(``vtprune.patches.gemma4.pooled_layout``, as the HF adapter reads them), which must be the same grid.
Positions are numbered afresh (vLLM numbers the shortened prompt: ``positions="renumber"`` on the HF wrap).
Methods that read the tower's attention are not served here yet.
"""

from __future__ import annotations

import math

import torch

from vtprune.patches.gemma4 import pooled_layout

from ..families.gemma import GEMMA4
from ..layout import ImageLayout
from .bindings import bind
from .request_keep import budgeted
from .rows import attach, keep_rows, kept_count, with_bias
from .slot_bias import Weighing


def image_grid(vision, width: int, height: int, max_soft_tokens: int | None = None) -> ImageLayout:
    """The layout of an image of ``width`` x ``height`` pixels: the grid of k x k patch blocks its processor resizes
    it to within ``max_soft_tokens`` (vLLM's ``_compute_num_soft_tokens``; a flat layout where the budget clips
    an extreme aspect ratio)."""
    budget = max_soft_tokens or vision.default_output_length
    k, patch = vision.pooling_kernel_size, vision.patch_size
    unit = patch * k
    scale = math.sqrt(budget * k * k / ((height / patch) * (width / patch)))
    rows = max(unit, int(math.floor(height * scale / unit)) * unit) // unit
    cols = max(unit, int(math.floor(width * scale / unit)) * unit) // unit
    n = min(rows * cols, budget)
    return ImageLayout.from_grids([(rows, cols)]) if rows * cols == n else ImageLayout.flat(n)


@bind(GEMMA4, tower=False)
def pruned_gemma4(config):
    from vllm.model_executor.models.gemma4_mm import (Gemma4DummyInputsBuilder, Gemma4ForConditionalGeneration,
                                                      Gemma4MultiModalProcessor, Gemma4ProcessingInfo)
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.multimodal.processing import PromptUpdateDetails

    class PrunedGemma4Info(Gemma4ProcessingInfo):
        def get_image_repl(self, *, image_width: int, image_height: int, processor, max_soft_tokens=None):
            n = self._compute_num_soft_tokens(image_width, image_height, max_soft_tokens=max_soft_tokens)
            hf = self.get_hf_config()
            layout = image_grid(hf.vision_config, image_width, image_height, max_soft_tokens)
            if layout.n != n:
                raise ValueError(f"vtprune: a {image_width} x {image_height} Gemma 4 image has {n} tokens in vLLM, "
                                 f"{layout.n} by its processor's resize")
            kept = kept_count(config, n, layout=layout)
            processor = processor if processor is not None else self.get_hf_processor()
            ids = [hf.boi_token_id] + [processor.image_token_id] * kept + [hf.eoi_token_id]
            return PromptUpdateDetails.select_token_id(ids, processor.image_token_id)

    Processor = budgeted(Gemma4MultiModalProcessor, config)  # a request's own keep (vtprune.serving.request_keep)
    @MULTIMODAL_REGISTRY.register_processor(Processor, info=PrunedGemma4Info,
                                            dummy_inputs=Gemma4DummyInputsBuilder)
    class PrunedGemma4(Weighing, Gemma4ForConditionalGeneration):
        vtprune_config = config

        def __init__(self, *, vllm_config, prefix: str = ""):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
            attach(self, config)

        def embed_multimodal(self, **kwargs):
            out = []
            k = self.config.vision_config.pooling_kernel_size
            for modality, given in self._parse_and_validate_multimodal_inputs(**kwargs).items():
                if given is None:
                    continue
                if modality != "image":  # audio as it is (videos are refused before they get here)
                    out.extend(getattr(self, f"_process_{modality}_input")(given))
                    continue
                positions = given["pixel_position_ids"]
                for i, rows in enumerate(self._process_image_input(given)):
                    layout = pooled_layout(torch.as_tensor(positions[i]).cpu(), k, rows.shape[0])
                    if layout.source is None:
                        raise ValueError(f"vtprune: a Gemma 4 image's {rows.shape[0]} tokens do not pool its patches "
                                         "as a grid; serve it unpruned")
                    out.append(with_bias(*keep_rows(self, config, rows, None, layout=layout)[1:]))
            return out

    PrunedGemma4.vtprune_parts = (PrunedGemma4Info, Processor)  # what serving.needs checks against vLLM
    return PrunedGemma4
