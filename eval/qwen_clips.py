"""``process_vision_info`` without torchvision: what ``qwen_vl_utils`` (lmms-eval's Qwen classes read images and
clips through it) makes of a chat's images and videos, for machines where it cannot import.

``qwen_vl_utils`` imports torchvision, which cannot load next to some torch builds (a CPU torch from a local
wheel).  The plugin's Qwen classes (``vtprune.eval.lmms``) call this function in its place there; elsewhere
they use ``qwen_vl_utils`` itself.  Its definitions (``qwen_vl_utils.vision_process``, 0.0.14), rewritten:

- a clip's frames: the ``video_start``..``video_end`` range (default the whole clip), ``nframes`` of them
  (``nframes`` rounded to even, or ``fps`` -- default 2 -- times the clip's length, within ``min_frames``
  4..``max_frames`` and the clip, floored to even), at ``linspace(first, last, nframes).round()``;
- each frame resized (torchvision's v1 resize: bicubic, antialiased, on floats, rounded to 0..255) to
  ``smart_resize`` of its sides: multiples of ``2 x image_patch_size``, its area within ``min_pixels`` (128 tokens) and ``max_pixels`` (768 tokens, and at
  most 2 x ``total_pixels`` / ``nframes``), returned as floats in 0..255 with the clip's metadata (source fps,
  the frames' indices, its frame count) for the processor's ``do_sample_frames=False, do_resize=False``;
- an image: RGB (transparent pixels on white), resized by PIL to ``smart_resize`` within 4..16384 tokens.

Clips are read with decord (which lmms-eval needs).
``tests/test_eval.py`` checks this against ``qwen_vl_utils`` itself, loaded beside a stand-in torchvision.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from vtprune import video_inputs

SPATIAL_MERGE = 2
IMAGE_MIN_TOKENS, IMAGE_MAX_TOKENS = 4, 16384
VIDEO_MIN_TOKENS, VIDEO_MAX_TOKENS = 128, 768
FPS, FRAME_FACTOR, FPS_MIN_FRAMES, FPS_MAX_FRAMES = 2.0, 2, 4, 768


def model_seq_len() -> int:
    return int(float(os.environ.get("MODEL_SEQ_LEN", 128000)))


def smart_resize(height, width, factor, min_pixels=None, max_pixels=None) -> tuple:
    """qwen_vl_utils' ``(height, width)``: multiples of ``factor`` (at least one) near the original, the area
    brought within ``[min_pixels, max_pixels]`` (default 4..16384 tokens) keeping the aspect ratio."""
    max_pixels = IMAGE_MAX_TOKENS * factor ** 2 if max_pixels is None else max_pixels
    min_pixels = IMAGE_MIN_TOKENS * factor ** 2 if min_pixels is None else min_pixels
    if max_pixels < min_pixels:
        raise ValueError(f"max_pixels ({max_pixels}) is below min_pixels ({min_pixels})")
    return video_inputs.smart_resize(height, width, factor, min_pixels, max_pixels, utils_rounding=True)


def frame_count(element: dict, total_frames: int, video_fps: float) -> int:
    """How many frames of the clip the model gets (qwen_vl_utils' ``smart_nframes``)."""
    if "fps" in element and "nframes" in element:
        raise ValueError("a clip takes fps or nframes, not both")
    if "nframes" in element:
        n = round(element["nframes"] / FRAME_FACTOR) * FRAME_FACTOR
    else:
        fps = element.get("fps", FPS)
        low = math.ceil(element.get("min_frames", FPS_MIN_FRAMES) / FRAME_FACTOR) * FRAME_FACTOR
        high = math.floor(element.get("max_frames", min(FPS_MAX_FRAMES, total_frames)) / FRAME_FACTOR) * FRAME_FACTOR
        n = min(min(max(total_frames / video_fps * fps, low), high), total_frames)
        n = math.floor(n / FRAME_FACTOR) * FRAME_FACTOR
    if not FRAME_FACTOR <= n <= total_frames:
        raise ValueError(f"a clip of {total_frames} frames cannot give {n}: nframes must be within "
                         f"[{FRAME_FACTOR}, {total_frames}] (lower nframes / max_num_frames)")
    return n


def frame_range(element: dict, total_frames: int, video_fps: float) -> tuple:
    """``(first, last, count)`` of the frames inside ``video_start``..``video_end`` (seconds)."""
    start, end = element.get("video_start"), element.get("video_end")
    if start is None and end is None:
        return 0, total_frames - 1, total_frames
    duration = total_frames / video_fps
    first = math.ceil(max(0.0, min(start, duration)) * video_fps) if start is not None else 0
    last = min(math.floor(max(0.0, min(end, duration)) * video_fps), total_frames - 1) if end is not None \
        else total_frames - 1
    if first >= last:
        raise ValueError(f"video_start {start} s is not before video_end {end} s in a clip of {duration:.2f} s")
    return first, last, last - first + 1


def resize(frames: torch.Tensor, size) -> torch.Tensor:
    """``frames`` [n, 3, H, W] (uint8) resized to ``size`` as torchvision's v1 resize does, which qwen_vl_utils calls:
    bicubic on floats, antialiased, clamped and rounded back to 0..255 (not torch's uint8 kernel, which the v2
    resize of transformers' processors runs: they differ by a few levels); floats."""
    out = F.interpolate(frames.float(), size=tuple(size), mode="bicubic", antialias=True, align_corners=False)
    return out.clamp(0, 255).round()


def fetch_video(element: dict, image_patch_size: int = 14) -> tuple:
    """``(frames float [n, 3, h, w] in 0..255, metadata, sample fps)`` of one chat element ``{"video": path, ...}``."""
    if not isinstance(element["video"], str):
        raise ValueError("a clip given as a list of frames needs qwen_vl_utils (and torchvision); pass a file path")
    import decord

    path = element["video"][7:] if element["video"].startswith("file://") else element["video"]
    if not os.path.exists(path):
        raise FileNotFoundError(f"no clip at {path}")
    reader = decord.VideoReader(path)
    total, video_fps = len(reader), reader.get_avg_fps()
    first, last, total = frame_range(element, total, video_fps)
    n = frame_count(element, total, video_fps)
    idx = torch.linspace(first, last, n).round().long().tolist()
    frames = torch.as_tensor(reader.get_batch(idx).asnumpy()).permute(0, 3, 1, 2)
    factor = image_patch_size * SPATIAL_MERGE
    min_pixels = element.get("min_pixels", VIDEO_MIN_TOKENS * factor ** 2)
    total_pixels = element.get("total_pixels", model_seq_len() * factor ** 2 * 0.9)
    max_pixels = max(min(VIDEO_MAX_TOKENS * factor ** 2, total_pixels / n * FRAME_FACTOR), int(min_pixels * 1.05))
    max_pixels = min(element.get("max_pixels", max_pixels), max_pixels)
    if "resized_height" in element and "resized_width" in element:
        size = smart_resize(element["resized_height"], element["resized_width"], factor)
    else:
        size = smart_resize(frames.shape[-2], frames.shape[-1], factor, min_pixels, max_pixels)
    frames = resize(frames, size)
    metadata = {"fps": video_fps, "frames_indices": idx, "total_num_frames": total, "video_backend": "decord"}
    return frames, metadata, n / max(total, 1e-6) * video_fps


def fetch_image(element: dict, image_patch_size: int = 14):
    """The PIL image of one chat element ``{"image": path or PIL image, ...}``, resized as the model takes it."""
    from PIL import Image

    image = element["image"] if "image" in element else element["image_url"]
    if isinstance(image, str):
        if image.startswith(("http://", "https://", "data:")):
            raise ValueError("an image given by URL needs qwen_vl_utils (and torchvision); pass a file path")
        image = Image.open(image[7:] if image.startswith("file://") else image)
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.split()[3])
        image = background
    else:
        image = image.convert("RGB")
    factor = image_patch_size * SPATIAL_MERGE
    if "resized_height" in element and "resized_width" in element:
        height, width = smart_resize(element["resized_height"], element["resized_width"], factor)
    else:
        height, width = smart_resize(image.height, image.width, factor,
                                     element.get("min_pixels", IMAGE_MIN_TOKENS * factor ** 2),
                                     element.get("max_pixels", IMAGE_MAX_TOKENS * factor ** 2))
    return image.resize((width, height))


def _elements(conversations):
    if isinstance(conversations[0], dict):
        conversations = [conversations]
    out = []
    for conversation in conversations:
        for message in conversation:
            if isinstance(message["content"], list):
                out += [e for e in message["content"] if "image" in e or "image_url" in e or "video" in e
                        or e.get("type", "text") in ("image", "image_url", "video")]
    return out


def process_vision_info(conversations, return_video_kwargs=False, return_video_metadata=False, image_patch_size=14):
    """``qwen_vl_utils.process_vision_info``: ``(images, clips[, video kwargs])`` of one chat or a batch of
    chats, each clip ``(frames, metadata)`` with ``return_video_metadata``, ``None`` where there are none."""
    images, clips, fps = [], [], []
    for element in _elements(conversations):
        if "image" in element or "image_url" in element:
            images.append(fetch_image(element, image_patch_size))
        elif "video" in element:
            frames, metadata, sample_fps = fetch_video(element, image_patch_size)
            clips.append((frames, metadata) if return_video_metadata else frames)
            fps.append(sample_fps)
        else:
            raise ValueError("a chat element of type image or video needs an image, image_url or video key")
    kwargs = {"do_sample_frames": False}
    if not return_video_metadata:
        kwargs["fps"] = fps
    out = (images or None, clips or None)
    return (*out, kwargs) if return_video_kwargs else out
