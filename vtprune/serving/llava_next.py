"""LLaVA-NeXT in vLLM with vtprune's pre-LLM selection.

An image is its base tile's grid, then its crops packed into one unpadded grid with a newline token
after every row (vLLM packs as transformers does).  The HF wrap keeps a row's newline when the row
keeps a token, which makes the count depend on the selection; vLLM sizes the prompt before the image
is encoded, so served configs keep every newline (the selector's ``newlines="all"``: the budget of
content tokens plus all newlines).  [CLS] methods read each tile's scores off vLLM's CLIP layers
(``TowerTap.tiles``) and sum them onto the packed tokens as the HF adapter does.  The layout is read off vLLM's own packing of patch indices (as the
HF adapter reads transformers'), positions are numbered afresh (``positions="renumber"``).
"""

from __future__ import annotations

import types

import torch

from vtprune.patches.llava_next import packed_layout

from .llava import tap_clip
from .select import attach, keep_rows, kept_count


def pruned_llava_next(config):
    from vllm.model_executor.models.llava import LlavaDummyInputsBuilder
    from vllm.model_executor.models.llava_next import (LlavaNextForConditionalGeneration,
                                                       LlavaNextMultiModalProcessor, LlavaNextProcessingInfo,
                                                       get_anyres_image_grid_shape)
    from vllm.multimodal import MULTIMODAL_REGISTRY

    class PrunedLlavaNextInfo(LlavaNextProcessingInfo):
        def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
            n = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
            hf, vision = self.get_hf_config(), self.get_vision_encoder_info()
            rows, cols = get_anyres_image_grid_shape(image_size=(image_height, image_width),
                                                     grid_pinpoints=hf.image_grid_pinpoints,
                                                     patch_size=vision.get_image_size())
            _, newlines = self._get_num_unpadded_features(
                original_height=image_height, original_width=image_width, npatches=vision.get_patch_grid_length(),
                num_patch_height=rows, num_patch_width=cols)
            return kept_count(config, n, newlines=newlines)

    @MULTIMODAL_REGISTRY.register_processor(LlavaNextMultiModalProcessor, info=PrunedLlavaNextInfo,
                                            dummy_inputs=LlavaDummyInputsBuilder)
    class PrunedLlavaNext(LlavaNextForConditionalGeneration):
        vtprune_config = config

        def __init__(self, *, vllm_config, prefix: str = ""):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
            attach(self, config)
            self.vtprune_tap = tap_clip(self, config) if config.needs_cls else None
            self.vtprune_layouts = {}

        def layout(self, image_size) -> object:
            """The packed image's layout, from vLLM's packing of patch indices (a newline packs as -1)."""
            key = tuple(int(v) for v in image_size)
            if key not in self.vtprune_layouts:
                hf = self.config
                side = hf.vision_config.image_size // hf.vision_config.patch_size
                rows, cols = get_anyres_image_grid_shape(key, hf.image_grid_pinpoints, hf.vision_config.image_size)
                tiles = 1 + rows * cols
                indices = torch.arange(tiles * side * side, dtype=torch.float32).view(tiles, side * side, 1)
                packer = types.SimpleNamespace(config=hf, image_newline=torch.tensor([-1.0]))
                prov = type(self)._merge_image_patch_embeddings(packer, torch.tensor(key), indices,
                                                                strategy="spatial_unpad")
                skip = int(hf.vision_feature_select_strategy == "default")
                self.vtprune_layouts[key] = packed_layout(prov.squeeze(-1).long(), side * side, side, skip, tiles)
            return self.vtprune_layouts[key]

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
                layout = self.layout(sizes[i]) if sizes is not None else None
                if layout is None or layout.n != rows.shape[0]:
                    raise ValueError("vtprune serving needs each LLaVA-NeXT image's size to read its packing")
                tower = tap.tiles(start, tiles[i], layout) if tap is not None else None
                out.append(keep_rows(self, config, rows, tower, layout=layout)[1])
                start += tiles[i] if tiles is not None else 0
            return out

    return PrunedLlavaNext
