"""Model families, described once for every engine.

A :class:`Family` holds what vtprune knows of a model family regardless of the engine that runs it:
which architectures it covers, how its visual tokens lie (grids, tiles, newline tokens, unpadding), what
its vision tower offers ([CLS] or not, where tokens may merge), how it numbers positions and what media it
takes.  The HF adapter (``vtprune.patches``) and the vLLM binding (``vtprune.serving``) of a family read
its description; each holds only what is specific to its engine.  A new family is one module here calling
:func:`register`, plus its bindings (docs/extending.md)::

    MYFAMILY = register(Family("myfamily", ("MyForConditionalGeneration",), tower="SigLIP", cls_token=False))
"""

from .base import Family, feature_layer, get, known, register
from . import gemma, glm4v, internvl, llava, llava_onevision, qwen_vl  # noqa: E402,F401,I001  (the families in the tree register themselves)

__all__ = ["Family", "feature_layer", "get", "known", "register"]
