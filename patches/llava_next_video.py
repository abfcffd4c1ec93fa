"""LLaVA-NeXT-Video (``LlavaNextVideoForConditionalGeneration``): LLaVA-NeXT's images, and videos.

A video of F frames is F tower passes (one per frame); each frame's patch grid (CLIP's side x side,
[CLS] dropped) is pooled by ``LlavaNextVideoPooler`` (stride s: average, max or a strided conv) to a
(side/s) x (side/s) grid before the projector, and the frames' grids follow one another with no
newline.  An LLM token's sources are the s x s tower patches its pooling window covers.
"""

from __future__ import annotations

import torch

from vtprune.families.llava import LLAVA_NEXT_VIDEO
from vtprune.errors import NotApplicable
from vtprune.layout import ImageLayout

from .llava_next import LlavaNextAdapter


def pooled_sources(side: int, stride: int, skip: int) -> torch.Tensor:
    """``[(side // stride)^2, stride^2]``: the tower tokens (positions in a frame's sequence, ``skip`` leading
    [CLS]) each pooled token covers, in raster order of the pooled grid."""
    out = side // stride
    r, c = torch.arange(out).repeat_interleave(out), torch.arange(out).repeat(out)
    dr, dc = torch.arange(stride).repeat_interleave(stride), torch.arange(stride).repeat(stride)
    return (r[:, None] * stride + dr) * side + c[:, None] * stride + dc + skip


class LlavaNextVideoAdapter(LlavaNextAdapter):
    facts = LLAVA_NEXT_VIDEO

    def _video_grid(self):
        config = self.model.config
        side = config.vision_config.image_size // config.vision_config.patch_size
        if config.vision_feature_select_strategy != "default":
            raise NotApplicable("LLaVA-NeXT-Video pools a frame's patches as a square grid, which it can only do "
                                "without the [CLS] token (vision_feature_select_strategy='default')")
        return side, config.spatial_pool_stride

    def capture(self, args, kwargs, output, medium="image"):
        if medium == "image":
            return super().capture(args, kwargs, output, medium)
        out = super(LlavaNextAdapter, self).capture(args, kwargs, output, medium)
        # transformers < 5.23 returns each clip's frames apart ([frames, n, D]); later releases one row per token
        out["features"] = [f.flatten(0, -2) for f in out["features"]]
        out["counts"] = [int(f.shape[0]) for f in out["features"]]
        pixels = kwargs.get("pixel_values_videos", args[0] if args else None)
        out["frames"] = [int(pixels.shape[1])] * int(pixels.shape[0])
        return out

    def layout(self, i, n, capture):
        if capture.get("medium") != "video":
            return super().layout(i, n, capture)
        side, stride = self._video_grid()
        frames, pooled = capture["frames"][i], side // stride
        if frames * pooled * pooled != n:
            raise RuntimeError(f"vtprune: a LLaVA-NeXT-Video clip of {frames} frames has {n} tokens, not "
                               f"{frames} x {pooled}^2")
        layout = ImageLayout.from_grids([(pooled, pooled)] * frames)
        layout.frame = layout.grid.clone()
        per_frame = pooled_sources(side, stride, skip=1)
        layout.source = torch.cat([per_frame + f * (side * side + 1) for f in range(frames)])
        return layout

    def tiles_of(self, i, capture):
        if capture.get("medium") == "video":
            return capture["frames"][i]
        return super().tiles_of(i, capture)

    def projector_sources(self, n_tower, n_projector, medium="image"):
        config = self.model.config
        side = config.vision_config.image_size // config.vision_config.patch_size
        stride = config.spatial_pool_stride
        if n_tower == side * side + 1 and n_projector == (side // stride) ** 2:  # a pooled video frame
            raise NotApplicable("merging methods (visionzip) merge tower tokens before the projector, and LLaVA-NeXT-"
                                "Video pools a clip's frames there first, which vtprune does not merge yet: run them "
                                "on images, or fastervlm/vispruner on clips")
        return super().projector_sources(n_tower, n_projector, medium)
