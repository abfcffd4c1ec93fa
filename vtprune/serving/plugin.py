"""The vLLM general plugin (entry point ``vllm.general_plugins``): when ``VTPRUNE_SERVE`` names a method,
pruned variants of vLLM's model classes replace the stock ones for the served architectures."""

from __future__ import annotations

from . import bindings, needs
from .config import config_from_env


def register():
    bindings.load()  # the tree's bindings and VTPRUNE_EXTENSIONS (its methods too) before the config is read
    config = config_from_env()
    if config is None:
        return
    classes = pruned_classes(config)  # checked against the installed vLLM before any is registered
    from vllm import ModelRegistry
    from vllm.config.multimodal import MultiModalConfig

    for architecture, cls in classes.items():
        ModelRegistry.register_model(architecture, cls)
    # vLLM's model runner rewrites the mrope positions of pruned media (recompute_mrope_positions) only when
    # multimodal pruning is on, which it ties to EVS's video_pruning_rate: vtprune prunes images, so it is on
    # (for models that support it, the Qwen classes here; LLaVA's 1-D positions do not use it)
    if not getattr(MultiModalConfig.is_multimodal_pruning_enabled, "vtprune", False):
        def is_multimodal_pruning_enabled(self):
            return True

        is_multimodal_pruning_enabled.vtprune = True
        MultiModalConfig.is_multimodal_pruning_enabled = is_multimodal_pruning_enabled
    # vLLM's Qwen3-VL lays a pruned clip out (its placeholders, its frames' positions) only under a video-pruning
    # spec; vtprune's count and selection stand in for EVS's there (vtprune.serving.qwen_video), so the rate
    # named here is never used
    spec = MultiModalConfig.get_video_pruning_spec
    if not getattr(spec, "vtprune", False):
        def get_video_pruning_spec(self):
            return spec(self) or ("evs", 0.5)

        get_video_pruning_spec.vtprune = True
        MultiModalConfig.get_video_pruning_spec = get_video_pruning_spec
    _cpu_runner_reads_the_flag()


def pruned_classes(config) -> dict:
    """``{architecture: pruned class}`` for ``config``, or ``needs.VLLMMismatch`` (one line) when the installed
    vLLM lacks what they hook."""
    try:
        classes = bindings.build(config)
    except (ImportError, AttributeError) as err:
        needs.check()  # names what is missing, where it can
        raise needs.mismatch([str(err)]) from err
    needs.check(classes.values())
    return classes


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
