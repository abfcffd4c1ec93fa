"""InternVL (``InternVLForConditionalGeneration``): tiles of ``image_seq_length`` tokens after pixel shuffle.

The model is not told which tiles belong to which image; the prompt wraps each image's tiles in
``<img> ... </img>``, so an image is a contiguous run of image tokens.  Each tile is its own square
grid (the 2x2 pixel shuffle already merged the tower's patches).
"""

from __future__ import annotations

import math

import torch

from vtprune.families.internvl import INTERNVL
from vtprune.layout import ImageLayout

from .base import Adapter, ImageRef


def shuffle_children(config, pixel_shuffle) -> torch.Tensor:
    """``[tokens per tile, 4]``: the tower patches each LLM token of an InternVL tile merges — a model's own
    ``pixel_shuffle`` (transformers' or vLLM's) applied to patch indices."""
    vision = config.vision_config
    size = vision.image_size[0] if isinstance(vision.image_size, (list, tuple)) else vision.image_size
    patch = vision.patch_size[0] if isinstance(vision.patch_size, (list, tuple)) else vision.patch_size
    side = size // patch
    grid = torch.arange(side * side, dtype=torch.float32).view(1, side, side, 1)
    shuffled = pixel_shuffle(grid, scale_factor=config.downsample_ratio)
    return shuffled.reshape(-1, shuffled.shape[-1]).long()


def tile_grids(n: int, per_tile: int) -> list:
    """The tiles of an image of ``n`` tokens, ``per_tile`` each: square grids where ``per_tile`` is square."""
    side = math.isqrt(per_tile)
    if n % per_tile:
        raise ValueError(f"an InternVL image of {n} tokens is not a whole number of {per_tile}-token tiles")
    return [(side, side) if side * side == per_tile else (1, per_tile)] * (n // per_tile)


def tile_layout(n: int, per_tile: int, children=None) -> ImageLayout:
    """An image of ``n`` tokens in ``per_tile``-token tiles; with ``children`` (``shuffle_children``) each token's
    tower sources, [CLS] first in each tile."""
    layout = ImageLayout.from_grids(tile_grids(n, per_tile))
    if children is not None and children.shape[0] == per_tile:  # tower tokens per tile: [CLS] + patches
        stride = children.numel() + 1
        layout.source = torch.cat([t * stride + 1 + children for t in range(n // per_tile)])
    return layout


class InternVLAdapter(Adapter):
    facts = INTERNVL

    def __init__(self, model):
        super().__init__(model)
        self._children = None

    def cls_sites(self):
        layers = self.inner.vision_tower.encoder.layer
        return [(l.attention.q_norm, l.attention.k_norm, l.attention.num_heads, l.attention.scale) for l in layers]

    def projector(self):
        return self.inner.multi_modal_projector

    def projector_sources(self, n_tower, n_projector, medium="image"):
        children = self.children()
        if children.shape[0] != n_projector or children.numel() + 1 != n_tower:
            raise RuntimeError("vtprune: the InternVL projector input does not line up with the tower's tokens")
        return children + 1  # after the [CLS]

    def children(self) -> torch.Tensor:
        """``[tokens per tile, 4]``: the tower patches each LLM token merges, read off the model's own
        ``pixel_shuffle`` applied to patch indices."""
        if self._children is None:
            self._children = shuffle_children(self.model.config, self.inner.pixel_shuffle)
        return self._children

    def family_images(self, image_mask, capture):
        per_tile = self.model.config.image_seq_length
        feats = torch.cat(capture["features"], 0) if capture else None
        out, used = [], 0
        for row in range(image_mask.shape[0]):
            pos = image_mask[row].nonzero().squeeze(1)
            if pos.numel() == 0:
                continue
            breaks = (pos[1:] != pos[:-1] + 1).nonzero().squeeze(1) + 1
            for run in torch.tensor_split(pos, breaks.tolist()):
                n = run.numel()
                if n % per_tile:
                    raise RuntimeError(f"vtprune: an InternVL image run of {n} tokens is not a whole number of "
                                       f"{per_tile}-token tiles")
                tiles = n // per_tile
                layout = tile_layout(n, per_tile, self.children())
                flat = feats[used:used + n] if feats is not None else None
                out.append(ImageRef(row, run, layout, flat, list(range(used // per_tile, used // per_tile + tiles))))
                used += n
        return out
