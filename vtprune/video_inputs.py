"""Qwen video inputs without torchvision: what ``Qwen2VLVideoProcessor`` (Qwen2-VL, Qwen2.5-VL) and
``Qwen3VLVideoProcessor`` (Qwen3-VL) make of frames.

transformers' video processors need torchvision, which cannot load next to some torch builds (a CPU torch
from a local wheel, for one).  :func:`qwen_video` reproduces the processor's layout from uint8 frames:
each frame resized (bicubic, antialiased) to the sides ``smart_resize`` picks, rescaled and normalised,
the clip padded to a whole number of temporal patches by repeating its last frame, then cut into
``temporal x patch x patch`` patches in the order the vision tower's 2 x 2 merger reads them.  Qwen3-VL
bounds the whole clip's pixels (t h w) instead of a frame's, with 16-pixel patches and mean/std 0.5.
Frames are used as given (the processors' ``do_sample_frames=False``; Qwen3-VL samples at 2 fps by
default, and its prompt needs each slice's timestamp).  The resize runs
on uint8 through torch's own antialiased bicubic kernel, the one torchvision calls, so the result equals
the processor's (``tests/serving/test_video_inputs.py`` runs the real processor where torchvision loads).
Users with torchvision use the processor as usual.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# the processors' defaults: patch, min and max pixels (Qwen2: per frame; Qwen3: per clip), mean, std
PRESETS = {"qwen2_vl": (14, 128 * 28 * 28, 28 * 28 * 768, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
           "qwen3_vl": (16, 128 * 32 * 32, 32 * 32 * 768, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}
PRESETS["qwen2_5_vl"] = PRESETS["qwen2_vl"]


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280, utils_rounding: bool = False) -> tuple:
    """The ``(height, width)`` Qwen's processors resize to: each side a multiple of ``factor`` near the
    original, the area brought within ``[min_pixels, max_pixels]`` keeping the aspect ratio.  A side is kept
    at one ``factor`` at least where it is scaled down (transformers'); ``utils_rounding``: where it is first
    rounded instead (``qwen_vl_utils``')."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"a frame's aspect ratio must be under 200, got {height}x{width}")
    low = factor if utils_rounding else 0
    h, w = max(low, round(height / factor) * factor), max(low, round(width / factor) * factor)
    if h * w > max_pixels:
        scale = math.sqrt(height * width / max_pixels)
        low = 0 if utils_rounding else factor
        h = max(low, math.floor(height / scale / factor) * factor)
        w = max(low, math.floor(width / scale / factor) * factor)
    elif h * w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * scale / factor) * factor, math.ceil(width * scale / factor) * factor
    return h, w


def smart_resize_clip(frames: int, height: int, width: int, temporal: int = 2, factor: int = 32,
                      min_pixels: int = 128 * 32 * 32, max_pixels: int = 32 * 32 * 768) -> tuple:
    """Qwen3-VL's ``(height, width)``: as :func:`smart_resize`, the bounds on the clip's ``t h w`` (sides
    below ``factor`` first scaled up to it)."""
    if frames < temporal:
        raise ValueError(f"a Qwen3-VL clip needs at least {temporal} frames, got {frames}")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"a frame's aspect ratio must be under 200, got {height}x{width}")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    t = round(frames / temporal) * temporal
    if t * h * w > max_pixels:
        scale = math.sqrt(frames * height * width / max_pixels)
        h = max(factor, math.floor(height / scale / factor) * factor)
        w = max(factor, math.floor(width / scale / factor) * factor)
    elif t * h * w < min_pixels:
        scale = math.sqrt(min_pixels / (frames * height * width))
        h, w = math.ceil(height * scale / factor) * factor, math.ceil(width * scale / factor) * factor
    return h, w


def qwen_video(frames, family: str = "qwen2_vl", min_pixels: int | None = None, max_pixels: int | None = None,
               temporal_patch_size: int = 2, merge_size: int = 2, resize: bool = True) -> dict:
    """``{"pixel_values_videos": [t h w, 3 temporal patch^2], "video_grid_thw": [[t, h, w]]}`` of one clip,
    ``frames`` uint8 ``[T, 3, H, W]`` (a tensor or an array), as the ``family``'s video processor
    (``"qwen2_vl"``, ``"qwen2_5_vl"``, ``"qwen3_vl"``) lays them out with its defaults (``min_pixels`` /
    ``max_pixels``: its ``size`` shortest and longest edge).  ``resize=False`` is the processor's
    ``do_resize=False``: frames already sized (``qwen_vl_utils`` hands them over as floats in 0..255) are
    taken as they are, their sides a multiple of ``patch_size x merge_size``."""
    if family not in PRESETS:
        raise ValueError(f"qwen_video builds inputs for {', '.join(PRESETS)}, not {family!r}")
    patch_size, low, high, mean, std = PRESETS[family]
    min_pixels, max_pixels = min_pixels or low, max_pixels or high
    x = torch.as_tensor(frames)
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"frames must be [T, 3, H, W], got {tuple(x.shape)}")
    factor = patch_size * merge_size
    if not resize:
        if x.shape[-2] % factor or x.shape[-1] % factor:
            raise ValueError(f"frames of {x.shape[-2]}x{x.shape[-1]} are not a multiple of {factor} a side: "
                             "resize them (resize=True)")
        height, width = x.shape[-2:]
    elif family == "qwen3_vl":
        height, width = smart_resize_clip(x.shape[0], x.shape[-2], x.shape[-1], temporal_patch_size, factor,
                                          min_pixels, max_pixels)
    else:
        height, width = smart_resize(x.shape[-2], x.shape[-1], factor, min_pixels, max_pixels)
    if (height, width) != tuple(x.shape[-2:]):  # on uint8, as the processor resizes (torchvision's uint8 kernel)
        x = F.interpolate(x.to(torch.uint8).contiguous(), size=(height, width), mode="bicubic", antialias=True,
                          align_corners=False)
    x = (x.float() / 255.0 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    if pad := -x.shape[0] % temporal_patch_size:
        x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)])
    t, h, w = x.shape[0] // temporal_patch_size, height // patch_size, width // patch_size
    x = x.view(t, temporal_patch_size, 3, h // merge_size, merge_size, patch_size, w // merge_size, merge_size,
               patch_size)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (t, h-block, w-block, mh, mw, channel, temporal, ph, pw)
    return {"pixel_values_videos": x.reshape(t * h * w, 3 * temporal_patch_size * patch_size * patch_size),
            "video_grid_thw": torch.tensor([[t, h, w]])}
