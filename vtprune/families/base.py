"""The family description and its registry (``vtprune.families`` re-exports them)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..layout import ImageLayout

_FAMILIES: dict = {}


@dataclass(frozen=True)
class Family:
    """What a model family is, for every engine.

    ``name``: its ``model_type``; ``architectures``: the model classes (transformers' and vLLM's names);
    ``tower``: its vision tower, in words; ``cls_token``: the tower has a [CLS] token ([CLS] methods read
    the attention each patch *receives* where it has none); ``merges_before_projector``: the tower merges
    patches before the projector's input (Qwen's patch merger), where methods that merge tower tokens
    cannot act; ``tiles``: an image may be several tower passes (crops, tiles); ``newlines``: a row
    separator token ends every row of an image's tokens; ``unpadded``: some tower tokens of a tile never
    reach the language model (LLaVA-NeXT's unpadding); ``positions``: ``"1d"`` or ``"mrope"`` ((t, h, w)
    rows); ``media``: what the model takes (``"image"``, ``"video"``); ``sliding_window``: language-model layers
    attend within a window (Gemma).
    """

    name: str
    architectures: tuple
    tower: str = "CLIP"
    cls_token: bool = True
    merges_before_projector: bool = False
    tiles: bool = False
    newlines: bool = False
    unpadded: bool = False
    positions: str = "1d"
    media: tuple = ("image",)
    sliding_window: bool = False

    @property
    def default_score(self) -> str:
        """What [CLS]-attention methods read unless told (their ``source``)."""
        return "cls" if self.cls_token else "received"

    @property
    def flat_positions(self) -> bool:
        return self.positions == "1d"

    def example_layout(self) -> ImageLayout:
        """A small image laid out as this family lays one out: what a method's needs can be checked on before
        a model loads (``Selector.kept_count``)."""
        if self.newlines:  # a base grid, then two crops packed into one grid with a newline after every row
            side, rows, cols = 2, 2, 4
            n = side * side + rows * (cols + 1)
            layout = ImageLayout.flat(n)
            crop = torch.arange(rows * (cols + 1))
            newline = crop % (cols + 1) == cols
            layout.grid = torch.cat([torch.zeros(side * side, dtype=torch.long), torch.ones(crop.numel(), dtype=torch.long)])
            layout.row = torch.cat([torch.arange(side).repeat_interleave(side), crop // (cols + 1)])
            layout.col = torch.cat([torch.arange(side).repeat(side), torch.where(newline, -1, crop % (cols + 1))])
            layout.newline = torch.cat([torch.zeros(side * side, dtype=torch.bool), newline])
            layout.shapes = [(side, side), (rows, cols)]
            tile = torch.where(newline, -1, 1 + (crop % (cols + 1)) // side)
            layout.tile = torch.cat([torch.zeros(side * side, dtype=torch.long), tile])
            layout.cropped = self.unpadded
            return layout
        return ImageLayout.from_grids([(4, 4)] * (3 if self.tiles else 1))


def feature_layer(layer, depth: int) -> int:
    """The 0-based index of the tower layer whose output the projector reads, from a config's
    ``vision_feature_layer`` (negative: counted from the end; a list: its last) and the tower's ``depth``."""
    if isinstance(layer, (list, tuple)):
        layer = layer[-1]
    return depth + layer if layer < 0 else layer - 1


def register(family: Family) -> Family:
    """Make ``family`` known (by name and by architecture); returns it."""
    if family.positions not in ("1d", "mrope"):
        raise ValueError(f"a family's positions are '1d' or 'mrope', got {family.positions!r}")
    taken = [a for a in family.architectures for f in _FAMILIES.values() if a in f.architectures and f.name != family.name]
    if taken:
        raise ValueError(f"architecture {taken[0]} already belongs to another family")
    _FAMILIES[family.name] = family
    return family


def get(name: str) -> Family:
    try:
        return _FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(sorted(_FAMILIES))}") from None


def known() -> dict:
    """``{name: Family}`` of every registered family."""
    return dict(_FAMILIES)
