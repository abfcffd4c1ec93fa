"""Which model families vLLM serves pruned: each family's vLLM binding, registered by family.

A binding module (``vtprune.serving.llava`` and the others below) registers a builder with :func:`bind`:
``build(config)`` returns the pruned vLLM model class for the method config.  Importing a binding imports
no vLLM (its builder does).  ``VTPRUNE_EXTENSIONS`` names more modules (comma-separated, importable in
every vLLM process) that register families, adapters, bindings or methods of one's own.
"""

from __future__ import annotations

import importlib
import os

EXTENSIONS = "VTPRUNE_EXTENSIONS"
TREE = ("vtprune.serving.llava", "vtprune.serving.llava_next", "vtprune.serving.llava_onevision",
        "vtprune.serving.internvl", "vtprune.serving.qwen", "vtprune.serving.glm4v", "vtprune.serving.gemma3",
        "vtprune.serving.gemma4")
_BUILDERS: dict = {}  # family name -> (Family, build)


def bind(family, tower: bool = True, media: tuple = ("image",)):
    """Decorator: ``build(config) -> pruned vLLM class`` serves ``family`` (a ``vtprune.families.Family``);
    ``tower``: the binding reads the vision tower's attention, for methods that need it; ``media``: what it
    prunes (vLLM refuses the family's other media up front)."""

    def deco(build):
        build.vtprune_tower = tower
        build.vtprune_media = tuple(media)
        _BUILDERS[family.name] = (family, build)
        return build

    return deco


def reads_tower(name: str) -> bool:
    """Whether the binding of family ``name`` reads the vision tower's attention ([CLS] methods)."""
    load()
    entry = _BUILDERS.get(name)
    return entry is None or getattr(entry[1], "vtprune_tower", True)


def load():
    """Import the tree's bindings and the modules ``VTPRUNE_EXTENSIONS`` names."""
    extra = [m.strip() for m in os.environ.get(EXTENSIONS, "").split(",") if m.strip()]
    for module in TREE + tuple(extra):
        try:
            importlib.import_module(module)
        except ImportError as err:
            if module in TREE:
                raise
            raise ValueError(f"{EXTENSIONS} names {module!r}, which does not import: {err}") from err


def media(name: str) -> tuple:
    """What the binding of family ``name`` prunes (images where none is bound)."""
    load()
    entry = _BUILDERS.get(name)
    return getattr(entry[1], "vtprune_media", ("image",)) if entry else ("image",)


def served() -> dict:
    """``{architecture: Family}`` of every family vLLM serves pruned."""
    load()
    return {arch: family for family, _ in _BUILDERS.values() for arch in family.architectures}


def build(config) -> dict:
    """``{architecture: pruned vLLM class}`` for ``config``."""
    load()
    out = {}
    for family, make in _BUILDERS.values():
        cls = make(config)
        for arch in family.architectures:
            out[arch] = cls
    return out
