"""Videos in vLLM on the Qwen3-VL family (Qwen3-VL, Qwen3-VL-MoE, Qwen3.5, Qwen3.5-MoE), pruned by vtprune's method
through vLLM's own video-pruning path (EVS's: ``--video-pruning-rate``); Qwen2-VL and Qwen2.5-VL size and select a
clip here too (``count``, ``select``), and lay it out with vtprune's own rows (``vtprune.serving.qwen``).

vLLM sizes a pruned clip's prompt with ``compute_retained_tokens_count(tokens_per_frame, num_frames, q)`` and
picks its tokens with ``compute_retention_mask(features, grid, spatial_merge_size, q)``, both read from its
``qwen3_vl`` module; from the mask it rebuilds the clip's sequence (every frame's timestamp and start and end
tokens, the kept tokens of each frame) with their unpruned (t, h, w) positions — what the HF wrap's
``positions="original"`` keeps.  ``install`` puts vtprune's count and selection in place of EVS's while a
vtprune-served processor sizes a prompt (``request_keep.serving``) and while a vtprune-served model embeds a
clip (``MODEL``); anywhere else vLLM's own functions run.  The method selects on the clip's layout (one grid
per temporal slice), on the merger's features, or side by side with the deepstack ones for methods that score
them stacked (``evs``, ``vidcom2``), as on the HF path.

A clip is served when its kept count follows from its frames and tokens per frame (what vLLM tells the count),
and the method keeps tokens as they are: not ``pool``'s merged windows, summary tokens or ``size_bias``, nor
methods that read the tower's attention (refused per request, with an HTTP 400: the server's images still
serve).
"""

from __future__ import annotations

import contextvars
import functools

import torch

from ..layout import ImageLayout
from . import clips, request_keep

MODEL = contextvars.ContextVar("vtprune_video_model", default=None)  # the served model embedding a clip


@functools.lru_cache(maxsize=256)
def clip_layout(slices: int, grid) -> ImageLayout:
    """A clip of ``slices`` temporal slices on the (rows, columns) ``grid`` each (cached: read it, do not change
    it; a request's processor and the model's embedding ask for the same few shapes again and again)."""
    layout = ImageLayout.from_grids([tuple(grid)] * slices)
    layout.frame, layout.media = layout.grid.clone(), "video"
    return layout


def count(config, per_frame: int, frames: int) -> int:
    """vtprune's kept count of a clip of ``frames`` slices of ``per_frame`` tokens, for the request being processed;
    ``ValueError`` where the clip cannot be served."""
    asked = request_keep.current(config)
    wide = clip_layout(frames, (1, per_frame))
    if clips.servable(asked) is None and asked.kept_count(wide) != asked.kept_count(clip_layout(frames, (per_frame, 1))):
        return clips.refuse(asked, f"{asked.name}'s count depends on each frame's grid, which vLLM does not pass when "
                            "it sizes a clip", wide)
    return clips.kept_count(config, wide)


def select(model, features: torch.Tensor, thw, merge: int) -> torch.Tensor:
    """The kept tokens of one clip (bool over its tokens in raster order) by the served ``model``'s method
    (``clips.select``)."""
    t, h, w = (int(v) for v in thw)
    main = features[:, :getattr(model, "visual_dim", None)]  # (Qwen3-VL's rows carry the deepstack features after)
    kept = clips.select(model, clip_layout(t, (h // merge, w // merge)), features, main)
    mask = torch.zeros(features.shape[0], dtype=torch.bool, device=features.device)
    mask[kept.to(features.device)] = True
    return mask


def install():
    """Put vtprune's count and selection in vLLM's ``qwen3_vl`` module, each running vLLM's own outside vtprune's
    scope (once per process)."""
    from vllm.model_executor.models import qwen3_vl

    if getattr(qwen3_vl.compute_retention_mask, "vtprune", False):
        return
    stock_count, stock_mask = qwen3_vl.compute_retained_tokens_count, qwen3_vl.compute_retention_mask

    def compute_retained_tokens_count(tokens_per_frame: int, num_frames: int, q: float) -> int:
        config = request_keep.serving()
        if config is None:  # a token budget sized outside a request (vLLM's estimates): every token, the bound
            return tokens_per_frame * num_frames
        return count(config, tokens_per_frame, num_frames)

    def compute_retention_mask(video_embeds, video_size_thw, spatial_merge_size, q):
        model = MODEL.get()
        if model is None:
            return stock_mask(video_embeds, video_size_thw, spatial_merge_size=spatial_merge_size, q=q)
        return select(model, video_embeds, video_size_thw, spatial_merge_size)

    compute_retained_tokens_count.vtprune = compute_retention_mask.vtprune = True
    compute_retained_tokens_count.stock, compute_retention_mask.stock = stock_count, stock_mask
    qwen3_vl.compute_retained_tokens_count = compute_retained_tokens_count
    qwen3_vl.compute_retention_mask = compute_retention_mask
