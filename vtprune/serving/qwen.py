"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL in vLLM with vtprune's pre-LLM selection, positions as EVS (vLLM's
video pruning) keeps them.

The processor emits the kept number of image placeholders (``kept_count`` on the image's merged-token
grid); the multimodal embedding returns the kept rows with four extra channels, the kept tokens'
mrope (t, h, w) offsets within the image and the image's position extent, which vLLM's model runner
turns into positions (``recompute_mrope_positions``, enabled by the plugin): kept tokens keep their
original (t, h, w) positions and the text after the image keeps its unpruned positions — the HF
wrap's default, ``positions="original"``.  Every pruned class uses Qwen2.5-VL's
``recompute_mrope_positions`` (four channels): vLLM's Qwen2-VL has no EVS, and Qwen3-VL's five-channel
variant continues the text after the largest *kept* position, not the image's extent as HF does.
Qwen3-VL's deepstack features ride in the same rows and are cut with them; the method scores the main
features, as on the HF path.  Images only: vLLM refuses video requests for a served Qwen model
(``limit_mm_per_prompt`` video 0).  The position channels travel in the rows' dtype, as EVS's do (exact
in bf16 up to 256 merged tokens a side).
"""

from __future__ import annotations

import torch

from .bias import Weighing
from .select import attach, keep_rows, kept_count, with_bias


def image_positions(t: int, h: int, w: int, kept: torch.Tensor) -> torch.Tensor:
    """[k, 4]: the kept tokens' (t, h, w) offsets on an image's ``t`` x ``h`` x ``w`` merged-token grid (row
    major), and in the last channel where the text after the image continues (its largest offset + 1)."""
    index = torch.arange(t * h * w)
    thw = torch.stack([index // (h * w), index // w % h, index % w], 1)[kept]
    extent = torch.full((thw.shape[0], 1), max(t, h, w))
    return torch.cat([thw, extent], 1)


CLASSES = {  # model type -> vLLM module and the prefix of its classes
    "qwen2_vl": ("vllm.model_executor.models.qwen2_vl", "Qwen2VL"),
    "qwen2_5_vl": ("vllm.model_executor.models.qwen2_5_vl", "Qwen2_5_VL"),
    "qwen3_vl": ("vllm.model_executor.models.qwen3_vl", "Qwen3VL"),
}


def pruned_qwen(config, model_type: str):
    import importlib

    from vllm.model_executor.models.interfaces import SupportsMultiModalPruning
    from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.multimodal.processing import PromptReplacement

    module, prefix = CLASSES[model_type]
    module = importlib.import_module(module)
    Model = getattr(module, f"{prefix}ForConditionalGeneration")
    Processor = getattr(module, f"{prefix}MultiModalProcessor")
    Info = getattr(module, f"{prefix}ProcessingInfo")
    Dummy = getattr(module, f"{prefix}DummyInputsBuilder")

    class PrunedQwenInfo(Info):
        def get_num_image_tokens(self, *, image_width, image_height, image_processor, mm_kwargs) -> int:
            size, n = self._get_vision_info(image_width=image_width, image_height=image_height, num_frames=1,
                                            image_processor=image_processor, mm_kwargs=mm_kwargs)
            vision = self.get_hf_config().vision_config
            cell = vision.patch_size * vision.spatial_merge_size
            return kept_count(config, n, (size.height // cell, size.width // cell))

    class PrunedQwenProcessor(Processor):
        def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
            merge = self.info.get_hf_config().vision_config.spatial_merge_size
            updates = []
            for update in super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
                if update.modality == "image":
                    def replacement(item_idx, full=update.replacement):
                        tokens = full(item_idx)
                        _, h, w = (int(v) for v in out_mm_kwargs["image"][item_idx]["image_grid_thw"].data)
                        return tokens[:kept_count(config, len(tokens), (h // merge, w // merge))]

                    update = PromptReplacement(modality="image", target=update.target, replacement=replacement)
                updates.append(update)
            return updates

    @MULTIMODAL_REGISTRY.register_processor(PrunedQwenProcessor, info=PrunedQwenInfo, dummy_inputs=Dummy)
    class PrunedQwen(Weighing, Model, SupportsMultiModalPruning):
        vtprune_config = config
        recompute_mrope_positions = Qwen2_5_VLForConditionalGeneration.recompute_mrope_positions

        def __init__(self, *, vllm_config, prefix: str = ""):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
            attach(self, config)

        def embed_multimodal(self, **kwargs):
            inputs = self._parse_and_validate_multimodal_inputs(**kwargs)  # Qwen2-VL's keys are plural
            if "video" in inputs or "videos" in inputs:
                raise ValueError("vtprune serving prunes images; this Qwen model was given a video")
            if not inputs:
                return []
            image_input = inputs.get("image", inputs.get("images"))
            merge = self.visual.spatial_merge_size
            width = getattr(self, "visual_dim", None)  # Qwen3-VL: the deepstack features follow in each row
            out = []
            for rows, (t, h, w) in zip(self._process_image_input(image_input), image_input["image_grid_thw"].tolist()):
                grid = (int(h) // merge, int(w) // merge)
                kept, main, bias = keep_rows(self, config, rows[:, :width], grid=grid if t == 1 else None)
                rows = rows[kept.to(rows.device)]
                rows[:, :main.shape[1]] = main
                positions = image_positions(int(t), *grid, kept.cpu()).to(rows.device, rows.dtype)
                out.append(torch.cat([with_bias(rows, bias), positions], 1))  # the bias column before the positions
            return out

    PrunedQwen.__name__ = PrunedQwen.__qualname__ = f"Pruned{prefix}"
    return PrunedQwen
