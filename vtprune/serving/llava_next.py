"""LLaVA-NeXT in vLLM with vtprune's pre-LLM selection.

An image is its base tile's grid, then its crops packed into one unpadded grid with a newline token
after every row (vLLM packs as transformers does).  The HF wrap keeps a row's newline when the row
keeps a token, which makes the count depend on the selection; vLLM sizes the prompt before the image
is encoded, so served configs keep every newline (the selector's ``newlines="all"``: the budget of
content tokens plus all newlines; ``pool``: its windows on the packed grids plus all newlines).  [CLS]
methods read each tile's scores off vLLM's CLIP layers (``TowerTap.tiles``) and sum them onto the
packed tokens as the HF adapter does.  The layout is read off vLLM's own packing of patch indices (as
the HF adapter reads transformers'), positions are numbered afresh (``positions="renumber"``).
VisionZip is refused: it keeps a share of every tower tile, and unpadding drops some of a crop's
tower tokens, so its count depends on which tokens it kept.
"""

from __future__ import annotations

import types

import torch

from vtprune.patches.llava_next import packed_layout

from ..families.llava import LLAVA_NEXT
from .slot_bias import Weighing
from .bindings import bind
from .llava import tap_clip
from .request_keep import budgeted
from .rows import attach, keep_rows, kept_count, with_bias


_LAYOUTS = {}  # (what of the config packing reads, image size) -> layout


def _layout(hf, key):
    from vllm.model_executor.models.llava_next import (LlavaNextForConditionalGeneration,
                                                       get_anyres_image_grid_shape)

    side = hf.vision_config.image_size // hf.vision_config.patch_size
    rows, cols = get_anyres_image_grid_shape(key, hf.image_grid_pinpoints, hf.vision_config.image_size)
    tiles = 1 + rows * cols
    indices = torch.arange(tiles * side * side, dtype=torch.float32).view(tiles, side * side, 1)
    packer = types.SimpleNamespace(config=hf, image_newline=torch.tensor([-1.0]))
    prov = LlavaNextForConditionalGeneration._merge_image_patch_embeddings(packer, torch.tensor(key), indices,
                                                                           strategy="spatial_unpad")
    skip = int(hf.vision_feature_select_strategy == "default")
    return packed_layout(prov.squeeze(-1).long(), side * side, side, skip, tiles)


def image_layout(hf, image_size):
    """The layout of a LLaVA-NeXT image of ``image_size`` (height, width) as vLLM packs it — read off vLLM's own
    packing of patch indices (a newline packs as -1), as the HF adapter reads transformers'."""
    vision = hf.vision_config
    size = tuple(int(v) for v in image_size)
    key = (vision.image_size, vision.patch_size, str(hf.image_grid_pinpoints), hf.vision_feature_select_strategy, size)
    if key not in _LAYOUTS:
        if len(_LAYOUTS) > 1024:
            _LAYOUTS.clear()
        _LAYOUTS[key] = _layout(hf, size)
    return _LAYOUTS[key]


@bind(LLAVA_NEXT)
def pruned_llava_next(config):
    from vllm.model_executor.models.llava import LlavaDummyInputsBuilder
    from vllm.model_executor.models.llava_next import (LlavaNextForConditionalGeneration,
                                                       LlavaNextMultiModalProcessor, LlavaNextProcessingInfo)
    from vllm.multimodal import MULTIMODAL_REGISTRY

    class PrunedLlavaNextInfo(LlavaNextProcessingInfo):
        def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
            n = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
            layout = image_layout(self.get_hf_config(), (image_height, image_width))
            if layout.n != n:
                raise ValueError(f"vtprune: a {image_width} x {image_height} LLaVA-NeXT image packs into {n} tokens "
                                 f"in vLLM, {layout.n} by its packing of patch indices")
            return kept_count(config, n, layout=layout)

    Processor = budgeted(LlavaNextMultiModalProcessor, config)  # a request's own keep (vtprune.serving.request_keep)
    @MULTIMODAL_REGISTRY.register_processor(Processor, info=PrunedLlavaNextInfo,
                                            dummy_inputs=LlavaDummyInputsBuilder)
    class PrunedLlavaNext(Weighing, LlavaNextForConditionalGeneration):
        vtprune_config = config

        def __init__(self, *, vllm_config, prefix: str = ""):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
            attach(self, config)
            self.vtprune_tap = tap_clip(self, config) if config.needs_cls else None

        def embed_multimodal(self, **kwargs):
            image_input = self._parse_and_validate_image_input(**kwargs)
            if image_input is None:
                return []
            tap = self.vtprune_tap
            if tap is not None:
                tap.clear()
            sizes = image_input.get("image_sizes")
            pixels = image_input.get("pixel_values")
            tiles = [int(p.shape[0]) for p in pixels] if pixels is not None else None  # the tower batch, in order
            out, start = [], 0
            for i, rows in enumerate(self._process_image_input(image_input)):
                layout = image_layout(self.config, sizes[i]) if sizes is not None else None
                if layout is None or layout.n != rows.shape[0]:
                    raise ValueError("vtprune serving needs each LLaVA-NeXT image's size to read its packing")
                tower = tap.tiles(start, tiles[i], layout) if tap is not None else None
                out.append(with_bias(*keep_rows(self, config, rows, tower, layout=layout)[1:]))
                start += tiles[i] if tiles is not None else 0
            return out

    PrunedLlavaNext.vtprune_parts = (PrunedLlavaNextInfo, Processor)  # what serving.needs checks against vLLM
    return PrunedLlavaNext
