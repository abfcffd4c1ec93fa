"""LLaVA-OneVision in vLLM with vtprune's pre-LLM selection, images and videos.

An image is LLaVA-NeXT's layout on a SigLIP tower: its base tile, then its crops packed into one unpadded
grid with a newline after every row, shrunk by bilinear interpolation past ``anyres_max_9`` (vLLM packs with
9 whatever the config says).  The layout is read off vLLM's own packing of each patch's (index, row, column)
(``vtprune.patches.llava_onevision.packed_onevision_layout``, as the HF adapter reads transformers'); every
newline is kept (``newlines="all"``: vLLM sizes the prompt before the image is encoded) and positions are
numbered afresh (``positions="renumber"``).  [CLS] methods read the attention each patch receives in the SigLIP
layer the projector reads (no [CLS] there: ``source="received"``, the HF path's default), per tile, mapped onto the
tokens by the layout's sources (an interpolated token: the patch nearest to where it samples), as on the HF path.
A clip is its frames' halved grids one after another and one newline after the last (``video_layout``, the HF
adapter's), sized by the kept count of that layout (``clips.kept_count``: the video methods, and ``random`` and
``divprune`` over the clip) and selected from vLLM's own clip features.
"""

from __future__ import annotations

import math
import sys
import types

import torch

from vtprune.patches.llava_onevision import packed_onevision_layout, video_layout

from ..families import feature_layer
from ..families.llava_onevision import LLAVA_ONEVISION
from .bindings import bind
from .request_keep import budgeted
from . import clips, request_keep
from .rows import attach, keep_rows, kept_count, with_bias
from .slot_bias import Weighing
from .tower import tap_received

_LAYOUTS = {}  # (what of the config packing reads, image size) -> layout


def image_layout(hf, image_size):
    """The layout of a LLaVA-OneVision image of ``image_size`` (height, width) as vLLM packs it."""
    from vllm.model_executor.models.llava_onevision import LlavaOnevisionForConditionalGeneration

    vision = hf.vision_config
    size = tuple(int(v) for v in image_size)
    key = (vision.image_size, vision.patch_size, str(hf.image_grid_pinpoints), size)
    if key not in _LAYOUTS:
        if len(_LAYOUTS) > 1024:
            _LAYOUTS.clear()
        packer = types.SimpleNamespace(config=hf)

        def pack(values, newline):
            return LlavaOnevisionForConditionalGeneration._merge_image_patch_embeddings(
                packer, torch.tensor(size), values, image_newline=newline, strategy="spatial_unpad")

        _LAYOUTS[key] = packed_onevision_layout(hf, size, sys.modules[LlavaOnevisionForConditionalGeneration.__module__],
                                                pack)[0]
    return _LAYOUTS[key]


def clip_layout(hf, frames, n: int):
    """The layout of a LLaVA-OneVision clip of ``n`` tokens (``frames`` frames, or as many as ``n`` holds), with the
    HF adapter's layout of a clip (``video_layout``)."""
    vision = hf.vision_config
    side = vision.image_size // vision.patch_size
    per_frame = math.ceil(side / 2) ** 2
    frames = (n - 1) // per_frame if frames is None else frames
    if frames * per_frame + 1 != n:
        raise ValueError(f"vtprune: a LLaVA-OneVision clip of {n} tokens is not {frames} frames of {per_frame} and a "
                         "newline")
    layout = video_layout(side, frames)
    layout.media = "video"
    return layout


@bind(LLAVA_ONEVISION, media=("image", "video"))
def pruned_llava_onevision(config):
    from vllm.model_executor.models.llava_onevision import (LlavaOnevisionDummyInputsBuilder,
                                                            LlavaOnevisionForConditionalGeneration,
                                                            LlavaOnevisionMultiModalProcessor,
                                                            LlavaOnevisionProcessingInfo)
    from vllm.multimodal import MULTIMODAL_REGISTRY

    class PrunedLlavaOnevisionInfo(LlavaOnevisionProcessingInfo):
        def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
            n = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
            layout = image_layout(self.get_hf_config(), (image_height, image_width))
            if layout.n != n:
                raise ValueError(f"vtprune: a {image_width} x {image_height} LLaVA-OneVision image packs into {n} "
                                 f"tokens in vLLM, {layout.n} by its packing of patch indices")
            return kept_count(config, n, layout=layout)

        def get_num_video_tokens(self, *, image_width: int, image_height: int, num_frames: int) -> int:
            n = super().get_num_video_tokens(image_width=image_width, image_height=image_height, num_frames=num_frames)
            if request_keep.serving() is None:  # a token budget sized outside a request (vLLM's estimates): the bound
                return n
            return clips.kept_count(config, clip_layout(self.get_hf_config(), num_frames, n))

    Processor = budgeted(LlavaOnevisionMultiModalProcessor, config)  # a request's own keep
    @MULTIMODAL_REGISTRY.register_processor(Processor, info=PrunedLlavaOnevisionInfo,
                                            dummy_inputs=LlavaOnevisionDummyInputsBuilder)
    class PrunedLlavaOnevision(Weighing, LlavaOnevisionForConditionalGeneration):
        vtprune_config = config

        def __init__(self, *, vllm_config, prefix: str = ""):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
            attach(self, config)
            hf, n = self.config, self.config.vision_config.num_hidden_layers
            self.vtprune_tap = tap_received(config, self.vision_tower.vision_model.encoder.layers, n,
                                            feature_layer(hf.vision_feature_layer, n),
                                            LLAVA_ONEVISION.default_score) if config.needs_cls else None

        def embed_multimodal(self, **kwargs):
            out = []
            for modality, given in self._parse_and_validate_multimodal_inputs(**kwargs).items():  # in their order
                out += self._vtprune_images(given) if modality == "image" else self._vtprune_clips(given)
            return out

        def _vtprune_clips(self, given):
            """Each clip's kept rows (the newline after its last frame among them) by the method, on vLLM's features."""
            out = []
            for rows in self._process_video_pixels(given):  # [1, frames x tokens + 1, d] a clip
                rows = rows.reshape(-1, rows.shape[-1])
                kept = clips.select(self, clip_layout(self.config, None, rows.shape[0]), rows)
                out.append(rows[kept.to(rows.device)])
            return out

        def _vtprune_images(self, image_input):
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
                    raise ValueError("vtprune serving needs each LLaVA-OneVision image's size to read its packing")
                tower = tap.tiles(start, tiles[i], layout) if tap is not None else None
                out.append(with_bias(*keep_rows(self, config, rows, tower, layout=layout)[1:]))
                start += tiles[i] if tiles is not None else 0
            return out

    PrunedLlavaOnevision.vtprune_parts = (PrunedLlavaOnevisionInfo, Processor)  # what serving.needs checks against vLLM
    return PrunedLlavaOnevision
