"""InternVL (HF format, vLLM's ``InternVLForConditionalGeneration`` → its InternS1 class) with vtprune's
pre-LLM selection: each image is a run of tiles of ``image_seq_length`` tokens (a square grid each, after
pixel shuffle), chosen among as one image (the HF wrap's ``scope="image"``).  The placeholder count is
cut between ``<img>`` and ``</img>``; positions are numbered afresh (1-D, the HF wrap's
``positions="renumber"``).  Images only.  [CLS] methods read InternViT's queries and keys (``tap_intern``);
each LLM token sums the scores of the four tower patches its pixel shuffle merged, as on the HF path."""

from __future__ import annotations

import torch

from vtprune.patches.internvl import shuffle_children, tile_grids, tile_layout

from ..families.internvl import INTERNVL
from .slot_bias import Weighing
from .bindings import bind
from .request_keep import budgeted
from .rows import attach, keep_rows, kept_count, with_bias


def tap_intern(model, config, children):
    """Hook the InternViT tower of vLLM's InternVL ``model`` for a [CLS] method: each hooked layer's queries and
    keys as its attention reads them (after the q/k norms where the tower has them), and the projector's input
    (after pixel shuffle) for merging, each token holding the tower patches ``children`` names.  vLLM builds
    every tower layer and feeds the projector the last."""
    from .tower import TowerTap

    layers = model.vision_tower.encoder.layer
    tap = TowerTap(config, len(layers), len(layers) - 1)
    for layer in tap.layers:
        attn = layers[layer].attention
        if getattr(attn, "dummy_dim", attn.num_heads * attn.head_dim) != attn.num_heads * attn.head_dim:
            raise ValueError(f"{config.name} reads the tower's attention heads; this InternVL tower pads dummy heads "
                             "for tensor parallelism: serve it with tensor_parallel_size=1")
        q_mod, k_mod = (attn.q_norm, attn.k_norm) if attn.qk_normalization else (attn.q_proj, attn.k_proj)
        box = {}
        q_mod.register_forward_hook(lambda module, args, q, box=box: box.update(q=q))
        k_mod.register_forward_hook(lambda module, args, k, box=box, layer=layer, attn=attn:
                                    tap.on_qkv(layer, box.pop("q"), k, attn.num_heads, attn.scale))
    if config.merges:
        tap.sources = children + 1  # after the [CLS]
        model.multi_modal_projector.register_forward_pre_hook(
            lambda module, args: (tap.on_projector(args[0]), *args[1:]))
    return tap


def children(model) -> torch.Tensor:
    """[tokens per tile, 4]: the tower patches each LLM token merges, read off vLLM's own ``pixel_shuffle``."""
    return shuffle_children(model.config, model.pixel_shuffle)


@bind(INTERNVL)
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

    Processor = budgeted(PrunedInternVLProcessor, config)  # a request's own keep (vtprune.serving.request_keep)
    @MULTIMODAL_REGISTRY.register_processor(Processor, info=PrunedInternVLInfo,
                                            dummy_inputs=InternS1DummyInputsBuilder)
    class PrunedInternVL(Weighing, InternS1ForConditionalGeneration):
        vtprune_config = config

        def __init__(self, *, vllm_config, prefix: str = ""):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
            attach(self, config)
            self.vtprune_children = children(self) if config.needs_cls else None
            self.vtprune_tap = tap_intern(self, config, self.vtprune_children) if config.needs_cls else None

        def embed_multimodal(self, **kwargs):
            if kwargs.get("pixel_values_videos") is not None:
                raise ValueError("vtprune serving prunes images; this InternVL model was given a video")
            tap = self.vtprune_tap
            if tap is not None:
                tap.clear()
            out, start, per_tile = [], 0, self.config.image_seq_length
            for rows in super().embed_multimodal(**kwargs):  # the tower ran once on every image's tiles, in order
                layout = tile_layout(rows.shape[0], per_tile, self.vtprune_children)
                tiles = rows.shape[0] // per_tile
                tower = tap.tiles(start, tiles, layout) if tap is not None else None
                out.append(with_bias(*keep_rows(self, config, rows, tower, layout=layout)[1:]))
                start += tiles
            return out

    PrunedInternVL.vtprune_parts = (PrunedInternVLInfo, Processor)  # checked by serving.needs
    return PrunedInternVL
