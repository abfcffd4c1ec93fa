"""The supported model classes and their adapters (re-exported by ``vtprune.patches``).

A family's HF adapter subclasses :class:`Adapter` with the family's description as ``facts`` and is made
known with :func:`register_adapter` (the tree's adapters below; a new family's own module does the same).
"""

from __future__ import annotations

from .base import Adapter
from .gemma3 import Gemma3Adapter
from .gemma4 import Gemma4Adapter
from .glm4v import Glm4vAdapter
from .internvl import InternVLAdapter
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter
from .llava_next_video import LlavaNextVideoAdapter
from .llava_onevision import LlavaOnevisionAdapter
from .qwen3_5 import Qwen35Adapter, Qwen35MoeAdapter
from .qwen_vl import Qwen3VLAdapter, Qwen3VLMoeAdapter, Qwen25VLAdapter, QwenVLAdapter

_ADAPTERS: list = []


def register_adapter(adapter: type) -> type:
    """Make ``adapter`` (an :class:`Adapter` subclass with ``facts``) the HF binding of its family's
    architectures; returns it, so it serves as a class decorator."""
    if not (isinstance(adapter, type) and issubclass(adapter, Adapter)) or adapter.__dict__.get("facts") is None:
        raise TypeError(f"register_adapter takes an Adapter subclass that sets facts, got {adapter!r}")
    taken = [a for a in _ADAPTERS if set(a.classes) & set(adapter.classes) and a is not adapter]
    if taken:
        raise ValueError(f"{adapter.classes[0]} already has an adapter ({taken[0].__name__})")
    if adapter not in _ADAPTERS:
        _ADAPTERS.append(adapter)
    return adapter


for _adapter in (LlavaAdapter, LlavaNextAdapter, LlavaNextVideoAdapter, InternVLAdapter, QwenVLAdapter, Qwen25VLAdapter, Qwen3VLAdapter,
                 Qwen3VLMoeAdapter, Gemma3Adapter, LlavaOnevisionAdapter, Glm4vAdapter, Qwen35Adapter, Qwen35MoeAdapter,
                 Gemma4Adapter):
    register_adapter(_adapter)
ADAPTERS = tuple(_ADAPTERS)  # the tree's own


def adapters() -> tuple:
    """Every registered adapter, the tree's first."""
    return tuple(_ADAPTERS)


def supported() -> dict:
    """``{family: transformers class name}`` of every supported model."""
    return {a.family: a.classes[0] for a in _ADAPTERS}


def adapter_for(model) -> Adapter:
    """The adapter for ``model`` (the one of its most derived class that has one), or ``TypeError`` listing
    the supported classes."""
    by_class = {name: a for a in _ADAPTERS for name in a.classes}
    for cls in type(model).__mro__:
        if cls.__name__ in by_class:
            return by_class[cls.__name__](model)
    listing = ", ".join(a.classes[0] for a in _ADAPTERS)
    raise TypeError(f"vtprune does not support {type(model).__name__}; supported models: {listing} "
                    "(the *ForConditionalGeneration classes of transformers)")


__all__ = ["ADAPTERS", "Adapter", "adapter_for", "adapters", "register_adapter", "supported"]
