"""The vLLM general plugin (entry point ``vllm.general_plugins``): when ``VTPRUNE_SERVE`` names a method,
pruned variants of vLLM's model classes replace the stock ones for the served architectures."""

from __future__ import annotations

from . import config_from_env


def register():
    config = config_from_env()
    if config is None:
        return
    from vllm import ModelRegistry

    from .llava import pruned_llava

    ModelRegistry.register_model("LlavaForConditionalGeneration", pruned_llava(config))
