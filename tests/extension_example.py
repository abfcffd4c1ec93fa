"""A model family and methods of one's own, each added by this one module and nothing else
(docs/extending.md): ``RenamedLlava``, LLaVA under a name vtprune has never heard of, wrapped in HF and served in
vLLM; ``centre``, a pre-LLM selector that keeps the tokens nearest the middle of each grid, in both engines;
``every_other``, an in-LLM method that lets every other visual token leave before a decoder layer.

Imported by ``tests/test_extension.py`` and, in vLLM's processes, through
``VTPRUNE_EXTENSIONS=extension_example`` (``tests/serving/test_extension.py``).
"""

from dataclasses import dataclass

import torch
from transformers import LlavaForConditionalGeneration

from vtprune.families import Family, register as register_family
from vtprune.methods import LayerMethod, Selector, register
from vtprune.patches import register_adapter
from vtprune.patches.llava import LlavaAdapter


# --- a family: its description, its HF adapter, its vLLM binding ---------------------------------------
class RenamedLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """LLaVA under another name."""


RENAMED = register_family(Family("renamed_llava", ("RenamedLlavaForConditionalGeneration",), tower="CLIP"))


@register_adapter
class RenamedLlavaAdapter(LlavaAdapter):
    facts = RENAMED


def pruned_renamed(config):
    from vtprune.serving.llava import pruned_llava

    return pruned_llava(config)


try:  # the vLLM binding: where vtprune.serving imports (it needs no vLLM to import)
    from vtprune.serving.bindings import bind
except ImportError:  # pragma: no cover
    pass
else:
    bind(RENAMED)(pruned_renamed)


# --- a selector ------------------------------------------------------------------------------------------
@register("centre")
@dataclass
class Centre(Selector):
    """Keep the tokens nearest the centre of their grid (ties: the earlier token)."""

    def score(self, ctx):
        out = []
        for layout in ctx.layouts:
            shapes = torch.tensor(layout.shapes, dtype=torch.float32)[layout.grid.clamp(min=0)]
            centre = (shapes - 1) / 2
            distance = (layout.row - centre[:, 0]) ** 2 + (layout.col - centre[:, 1]) ** 2
            out.append((-distance).masked_fill(layout.newline | (layout.grid < 0), float("-inf")))
        return out


# --- an in-LLM method ------------------------------------------------------------------------------------
@register("every_other")
@dataclass
class EveryOther(LayerMethod):
    """Every other visual token of each sample (the 2nd, 4th, ...) leaves before decoder layer ``layer``."""

    def drop(self, view, visual):
        order = visual.long().cumsum(1)  # 1, 2, 3, ... over each row's visual tokens still there
        return visual & (order % 2 == 0)
