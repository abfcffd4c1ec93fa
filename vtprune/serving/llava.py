"""LLaVA-1.5 in vLLM with vtprune's pre-LLM selection: fewer image placeholders, the kept feature rows
(positions: vLLM numbers the shortened prompt afresh, the HF wrap's ``positions="renumber"``)."""

from __future__ import annotations

from ..families import feature_layer
from ..families.llava import LLAVA
from .slot_bias import Weighing
from .bindings import bind
from .request_keep import budgeted
from .rows import attach, keep_rows, kept_count, with_bias


def tap_clip(model, config):
    """Hook the CLIP tower of vLLM's LLaVA ``model`` for a [CLS] method: a ``TowerTap`` fed by the
    fused q/k/v projection of every layer the method reads (and the projector, for merging)."""
    from .tower import TowerTap, hook_qkv

    hf = model.config
    n = hf.vision_config.num_hidden_layers
    tap = TowerTap(config, n, feature_layer(hf.vision_feature_layer, n))
    tower = getattr(model.vision_tower, "vision_model", None)
    if tower is None or not hasattr(tower, "pre_layrnorm"):
        raise ValueError(f"{config.name} reads a CLIP tower's [CLS] attention; this LLaVA's tower is "
                         f"{type(model.vision_tower).__name__}")
    hook_qkv(tap, config, tower.encoder.layers)
    if config.merges:
        model.multi_modal_projector.register_forward_pre_hook(
            lambda module, args: (tap.on_projector(args[0]), *args[1:]))
    return tap


@bind(LLAVA)
def pruned_llava(config):
    from vllm.model_executor.models.llava import (LlavaDummyInputsBuilder, LlavaForConditionalGeneration,
                                                  LlavaMultiModalProcessor, LlavaProcessingInfo)
    from vllm.multimodal import MULTIMODAL_REGISTRY

    class PrunedLlavaInfo(LlavaProcessingInfo):
        def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
            n = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
            return kept_count(config, n)

    Processor = budgeted(LlavaMultiModalProcessor, config)  # a request's own keep (vtprune.serving.request_keep)
    @MULTIMODAL_REGISTRY.register_processor(Processor, info=PrunedLlavaInfo,
                                            dummy_inputs=LlavaDummyInputsBuilder)
    class PrunedLlava(Weighing, LlavaForConditionalGeneration):
        vtprune_config = config

        def __init__(self, *, vllm_config, prefix: str = ""):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
            self.vtprune_tap = tap_clip(self, config) if config.needs_cls else None
            attach(self, config)

        def embed_multimodal(self, **kwargs):
            tap = self.vtprune_tap
            if tap is not None:
                tap.clear()
            features = super().embed_multimodal(**kwargs)
            out = []
            for i, f in enumerate(features):
                out.append(with_bias(*keep_rows(self, config, f, tap.image(i, f.shape[0]) if tap else None)[1:]))
            return out

    PrunedLlava.vtprune_parts = (PrunedLlavaInfo, Processor)  # what serving.needs checks against vLLM
    return PrunedLlava
