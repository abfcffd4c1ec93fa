"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): LLaVA-NeXT's anyres layout on a SigLIP tower,
and videos.

* **Images.**  The base tile's grid, then the crops re-assembled into one unpadded grid with a newline token
  after every row.  Where that grid holds more than ``anyres_max_N`` tiles' worth of tokens the model shrinks
  it by bilinear interpolation (by ``ratio``, about sqrt(tokens / (N x side^2))): an interpolated token
  mixes up to four patches, and its source here is the patch nearest to where it samples.  The layout is
  read off the model's own ``pack_image_features``, packing each patch's (index, row, column) instead of
  its features.  In a prompt with several images (``batch_num_images``) an image is its base tile and one
  newline.
* **Videos.**  Each frame is a tower pass whose patch grid is halved by bilinear interpolation (``ceil(side /
  2)`` a side; at an even side a token averages 2 x 2 patches, its sources), the frames one after another and
  one newline after the last.
* No [CLS]: [CLS]-attention methods read the attention each patch receives in the layer the projector
  reads.  A trailing newline (after a base tile or a clip) ends the last row: it is kept when that row is.
"""

from __future__ import annotations

import math
import sys

import torch

from vtprune.errors import NotApplicable
from vtprune.families.llava_onevision import LLAVA_ONEVISION
from vtprune.layout import ImageLayout

from .llava_next import LlavaNextAdapter, packed_layout


def with_trailing_newline(layout: ImageLayout) -> ImageLayout:
    """``layout`` and one newline token after it, ending its last grid's last row."""
    last = int(layout.grid.max())
    row = int(layout.row[layout.grid == last].max())
    one = lambda value, t: torch.cat([t, torch.tensor([value], dtype=t.dtype)])  # noqa: E731
    out = ImageLayout(grid=one(last, layout.grid), row=one(row, layout.row), col=one(-1, layout.col),
                      newline=one(True, layout.newline), shapes=list(layout.shapes), cropped=layout.cropped,
                      media=layout.media)
    if layout.tile is not None:
        out.tile = one(-1, layout.tile)
    if layout.frame is not None:
        out.frame = one(-1, layout.frame)
    if layout.source is not None:
        out.source = torch.cat([layout.source, torch.full((1, layout.source.shape[1]), -1, dtype=torch.long)])
    return out


def halved_sources(side: int) -> torch.Tensor:
    """``[ceil(side/2)^2, 4]``: the patches of a ``side`` x ``side`` grid each token of its bilinear halving
    covers (raster positions; -1 past the edge)."""
    out = math.ceil(side / 2)
    r, c = torch.arange(out).repeat_interleave(out), torch.arange(out).repeat(out)
    rows = r[:, None] * 2 + torch.tensor([0, 0, 1, 1])
    cols = c[:, None] * 2 + torch.tensor([0, 1, 0, 1])
    return torch.where((rows < side) & (cols < side), rows * side + cols, -1)


def video_layout(side: int, frames: int) -> ImageLayout:
    """A clip of ``frames`` frames on a tower of ``side`` x ``side`` patches: each frame's halved grid (its tokens'
    sources: the patches each covers), one after another, and one newline after the last."""
    half = math.ceil(side / 2)
    layout = ImageLayout.from_grids([(half, half)] * frames)
    layout.frame = layout.grid.clone()
    layout.tile = layout.grid.clone()
    per_frame = halved_sources(side)
    layout.source = torch.cat([torch.where(per_frame >= 0, per_frame + f * side * side, -1) for f in range(frames)])
    return with_trailing_newline(layout)


def _tile(side: int) -> ImageLayout:
    layout = ImageLayout.from_grids([(side, side)])
    layout.source = torch.arange(side * side)[:, None]
    return layout


def packed_onevision_layout(config, image_size, grid_of, pack) -> tuple:
    """``(layout, tiles)`` of a LLaVA-OneVision image of ``image_size`` (height, width) with crops, from an engine's
    own packing: ``pack(values [tiles, patches, 3], newline [3]) -> [n, 3]`` packs each patch's (index, row,
    column) as the engine packs features (transformers' ``pack_image_features``, vLLM's
    ``_merge_image_patch_embeddings``); ``grid_of``: a module with ``get_anyres_image_grid_shape``.  Where the
    crop grid was interpolated, a token's source is the patch nearest to where it samples."""
    if config.vision_feature_select_strategy != "full":
        raise NotApplicable("LLaVA-OneVision's SigLIP tower has no [CLS] token to drop: vtprune lays out its images "
                            "with vision_feature_select_strategy='full' only")
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    per_tile = side * side
    nph, npw = grid_of.get_anyres_image_grid_shape(tuple(image_size), config.image_grid_pinpoints, vision.image_size)
    tiles = 1 + nph * npw
    patch = torch.arange(per_tile)
    values = [torch.stack([patch.float(), torch.zeros(per_tile), torch.zeros(per_tile)], -1)]
    for k in range(tiles - 1):  # crops in raster order of the nph x npw arrangement
        th, tw = divmod(k, npw)
        values.append(torch.stack([((k + 1) * per_tile + patch).float(), (th * side + patch // side).float(),
                                   (tw * side + patch % side).float()], -1))
    packed = pack(torch.stack(values), torch.tensor([-1.0, -1.0, -1.0]))
    newline = (packed == -1).all(-1)
    newline[:per_tile] = False
    r = packed[:, 1].round().long().clamp(0, nph * side - 1)
    c = packed[:, 2].round().long().clamp(0, npw * side - 1)
    crop = (1 + (r // side) * npw + c // side) * per_tile + (r % side) * side + c % side
    prov = torch.where(newline, -1, crop)
    prov[:per_tile] = patch
    return packed_layout(prov, per_tile, side, 0, tiles, tower=per_tile), tiles


class LlavaOnevisionAdapter(LlavaNextAdapter):
    facts = LLAVA_ONEVISION

    def capture(self, args, kwargs, output, medium="image"):
        if medium == "image":
            out = super().capture(args, kwargs, output, medium)
            per_sample = kwargs.get("batch_num_images")
            n = len(out["counts"])
            out["patched"] = [True] * n if per_sample is None else \
                [int(k) == 1 for k in per_sample for _ in range(int(k))]
            return out
        out = super(LlavaNextAdapter, self).capture(args, kwargs, output, medium)
        pixels = kwargs.get("pixel_values_videos", args[0] if args else None)
        out["frames"] = [int(pixels.shape[1])] * int(pixels.shape[0])
        return out

    def _side(self):
        vision = self.model.config.vision_config
        return vision.image_size // vision.patch_size

    def _entry(self, i, n, capture):
        key = (capture["image_sizes"][i], capture["patched"][i], n)
        if key not in self._cache:
            self._cache[key] = self._build(capture["image_sizes"][i], n, capture["patched"][i])
        return self._cache[key]

    def layout(self, i, n, capture):
        if capture.get("medium") == "video":
            return self._video_layout(i, n, capture)
        return self._entry(i, n, capture)[0]

    def tiles_of(self, i, capture):
        if capture.get("medium") == "video":
            return capture["frames"][i]
        return self._entry(i, capture["counts"][i], capture)[1]

    def _build(self, image_size, n, patched=True):
        """``(layout, tiles)``: the packing of each patch's (index, row, column) by the model itself."""
        config = self.model.config
        if not patched:
            layout = with_trailing_newline(_tile(self._side()))
            if layout.n != n:
                raise RuntimeError(f"vtprune: a LLaVA-OneVision image of {n} tokens is not one tile and a newline")
            return layout, 1

        def pack(values, newline):
            packed, _ = self.inner.pack_image_features([values], torch.tensor([image_size]), image_newline=newline,
                                                       vision_aspect_ratio=config.vision_aspect_ratio)
            return packed[0]

        layout, tiles = packed_onevision_layout(config, image_size, sys.modules[type(self.inner).__module__], pack)
        if layout.n != n:
            raise RuntimeError(f"vtprune: LLaVA-OneVision packed {layout.n} tokens for an image of {n}")
        return layout, tiles

    def _video_layout(self, i, n, capture):
        side, frames = self._side(), capture["frames"][i]
        layout = video_layout(side, frames)
        if layout.n != n:
            raise RuntimeError(f"vtprune: a LLaVA-OneVision clip of {frames} frames has {n} tokens, not "
                               f"{frames} x {math.ceil(side / 2)}^2 + 1")
        return layout

    def projector_sources(self, n_tower, n_projector, medium="image"):
        if medium == "video":
            raise NotApplicable("merging methods (visionzip) merge tower tokens before the projector, and "
                                "LLaVA-OneVision halves a clip's frames after it, which vtprune does not merge yet: "
                                "run them on images, or fastervlm/vispruner on clips")
        return super().projector_sources(n_tower, n_projector, medium)
