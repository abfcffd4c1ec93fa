"""The vLLM general plugin (entry point ``vllm.general_plugins``): when ``VTPRUNE_SERVE`` names a method,
pruned variants of vLLM's model classes replace the stock ones for the served architectures."""

from __future__ import annotations

from . import config_from_env


def register():
    config = config_from_env()
    if config is None:
        return
    from vllm import ModelRegistry
    from vllm.config.multimodal import MultiModalConfig

    from .internvl import pruned_internvl
    from .llava import pruned_llava
    from .llava_next import pruned_llava_next
    from .qwen import pruned_qwen

    ModelRegistry.register_model("LlavaForConditionalGeneration", pruned_llava(config))
    ModelRegistry.register_model("LlavaNextForConditionalGeneration", pruned_llava_next(config))
    ModelRegistry.register_model("InternVLForConditionalGeneration", pruned_internvl(config))
    ModelRegistry.register_model("Qwen2VLForConditionalGeneration", pruned_qwen(config, "qwen2_vl"))
    ModelRegistry.register_model("Qwen2_5_VLForConditionalGeneration", pruned_qwen(config, "qwen2_5_vl"))
    ModelRegistry.register_model("Qwen3VLForConditionalGeneration", pruned_qwen(config, "qwen3_vl"))
    # vLLM's model runner rewrites the mrope positions of pruned media (recompute_mrope_positions) only when
    # multimodal pruning is on, which it ties to EVS's video_pruning_rate: vtprune prunes images, so it is on
    # (for models that support it, the Qwen classes here; LLaVA's 1-D positions do not use it)
    if not getattr(MultiModalConfig.is_multimodal_pruning_enabled, "vtprune", False):
        def is_multimodal_pruning_enabled(self):
            return True

        is_multimodal_pruning_enabled.vtprune = True
        MultiModalConfig.is_multimodal_pruning_enabled = is_multimodal_pruning_enabled
    _cpu_runner_reads_the_flag()


def _cpu_runner_reads_the_flag():
    """vLLM's CPU model runner loads the model without setting ``is_multimodal_pruning_enabled`` (its GPU
    runner sets it after loading), so on CPU no pruned media ever gets its mrope positions rewritten: set
    it there as the GPU runner does."""
    try:
        from vllm.model_executor.models.interfaces import supports_multimodal_pruning
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    except ImportError:  # not a CPU build
        return
    load = CPUModelRunner.load_model
    if getattr(load, "vtprune", False):
        return

    def load_model(self, *args, **kwargs):
        load(self, *args, **kwargs)
        mm_config = self.model_config.multimodal_config
        self.is_multimodal_pruning_enabled = (supports_multimodal_pruning(self.get_model()) and mm_config is not None
                                              and mm_config.is_multimodal_pruning_enabled())

    load_model.vtprune = True
    CPUModelRunner.load_model = load_model
