"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): anyres base image + crops + newline tokens.

The LLM sequence of an image is the base tile's grid, then the crops re-assembled into one large
grid (unpadded to the image's aspect ratio) with an ``image_newline`` token after every row.  The
layout is read off the model's own ``pack_image_features`` by packing position indices instead of
features, so it matches whatever the installed transformers does.
"""

from __future__ import annotations

import torch

from vtprune.families.llava import LLAVA_NEXT
from vtprune.layout import ImageLayout

from .base import Adapter
from .llava import clip_sites


def packed_layout(prov: torch.Tensor, per_tile: int, side: int, skip: int, tiles: int,
                  tower: int | None = None) -> ImageLayout:
    """The layout of a packed LLaVA-NeXT image of ``tiles`` tiles from its provenance ``prov`` [n]: for each LLM
    token the index (tile x ``per_tile`` + patch) of the projector token it is, -1 for a newline; ``side`` x
    ``side`` patches per tile, ``skip`` leading tower tokens ([CLS]) per tile, ``tower`` tower tokens per tile
    (default: the patches and one [CLS])."""
    tower = side * side + 1 if tower is None else tower
    # tower token of packed index p: tile p // per_tile, position p % per_tile (+1 past [CLS])
    source = torch.where(prov >= 0, (prov // per_tile) * tower + prov % per_tile + skip, -1)[:, None]
    if tiles == 1 or per_tile != side * side:
        # single tile (base + one newline) or [CLS] kept: no crop grid to describe
        layout = ImageLayout.flat(prov.numel())
        layout.grid[prov < 0] = -1
        layout.source = source
        layout.tile = torch.where(prov >= 0, prov // per_tile, -1)
        return layout
    base = ImageLayout.from_grids([(side, side)])
    crop = prov[per_tile:]
    newline = crop < 0
    row = torch.cumsum(newline.long(), 0) - newline.long()
    idx = torch.arange(crop.numel())
    last_nl = torch.where(newline, idx, torch.full_like(idx, -1)).cummax(0).values
    row_start = torch.cat([torch.zeros(1, dtype=torch.long), last_nl[:-1] + 1])
    col = torch.where(newline, torch.full_like(idx, -1), idx - row_start)
    rows, cols = int(newline.sum()), int(newline.nonzero()[0, 0]) if newline.any() else crop.numel()
    layout = ImageLayout(
        grid=torch.cat([base.grid, torch.ones_like(crop)]),
        row=torch.cat([base.row, row]),
        col=torch.cat([base.col, col]),
        newline=torch.cat([base.newline, newline]),
        shapes=[(side, side), (rows, cols)],
        source=source,
        tile=torch.where(prov >= 0, prov // per_tile, -1),
        cropped=int((prov >= 0).sum()) < tiles * per_tile,
    )
    return layout


class LlavaNextAdapter(Adapter):
    facts = LLAVA_NEXT

    def __init__(self, model):
        super().__init__(model)
        self._cache = {}

    def capture(self, args, kwargs, output, medium="image"):
        out = super().capture(args, kwargs, output, medium)
        sizes = kwargs.get("image_sizes", args[1] if len(args) > 1 else None)
        out["image_sizes"] = [tuple(int(v) for v in s) for s in sizes]
        return out

    def _entry(self, i, n, capture):
        key = (capture["image_sizes"][i], n)
        if key not in self._cache:
            self._cache[key] = self._build(capture["image_sizes"][i], n)
        return self._cache[key]

    def layout(self, i, n, capture):
        return self._entry(i, n, capture)[0]

    def tiles_of(self, i, capture):
        return self._entry(i, capture["counts"][i], capture)[1]

    def cls_sites(self):
        return clip_sites(self.inner.vision_tower)

    def projector(self):
        return self.inner.multi_modal_projector

    def _build(self, image_size, n):
        """``(layout, tiles)``; the layout's source is read off the packing of position indices."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        config = self.model.config
        side = config.vision_config.image_size // config.vision_config.patch_size
        strategy = config.vision_feature_select_strategy
        per_tile = side * side + (strategy == "full")
        tiles = image_size_to_num_patches(image_size, config.image_grid_pinpoints, config.vision_config.image_size)
        indices = torch.arange(tiles * per_tile, dtype=torch.float32).view(tiles, per_tile, 1)
        packed, _ = self.inner.pack_image_features([indices], torch.tensor([image_size]), strategy,
                                                   image_newline=torch.tensor([-1.0]))
        prov = packed[0].squeeze(-1).long()
        if prov.numel() != n:
            raise RuntimeError(f"vtprune: LLaVA-NeXT packed {prov.numel()} tokens for an image of {n}")
        return packed_layout(prov, per_tile, side, int(strategy == "default"), tiles), tiles
