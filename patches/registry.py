"""The supported model classes and their adapters (re-exported by ``vtprune.patches``)."""

from __future__ import annotations

from .base import Adapter
from .internvl import InternVLAdapter
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter
from .qwen_vl import Qwen3VLAdapter, Qwen25VLAdapter, QwenVLAdapter

ADAPTERS = (LlavaAdapter, LlavaNextAdapter, InternVLAdapter, QwenVLAdapter, Qwen25VLAdapter, Qwen3VLAdapter)


def supported() -> dict:
    """``{family: transformers class name}`` of every supported model."""
    return {a.family: a.classes[0] for a in ADAPTERS}


def adapter_for(model) -> Adapter:
    """The adapter for ``model``, or ``TypeError`` listing the supported classes."""
    names = {cls.__name__ for cls in type(model).__mro__}
    for adapter in ADAPTERS:
        if names & set(adapter.classes):
            return adapter(model)
    listing = ", ".join(a.classes[0] for a in ADAPTERS)
    raise TypeError(f"vtprune does not support {type(model).__name__}; supported models: {listing} "
                    "(the *ForConditionalGeneration classes of transformers)")


__all__ = ["ADAPTERS", "Adapter", "adapter_for", "supported"]
