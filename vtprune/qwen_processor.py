"""A Qwen processor that needs no torchvision: what ``Qwen2VLProcessor``, ``Qwen2_5_VLProcessor`` and
``Qwen3VLProcessor`` make of text, images and clips, for machines where transformers' video processors cannot
load (they need torchvision; see :mod:`vtprune.video_inputs`).

    processor = QwenProcessor(tokenizer, "qwen3_vl")
    batch = processor(text=[prompt], videos=[frames], video_metadata=[{"fps": 2.0, "frames_indices": [...]}],
                      padding=True, padding_side="left", return_tensors="pt")

It is called as the real processor is (``text``, ``images``, ``videos``, ``video_metadata``, ``padding``,
``padding_side``, ``do_resize``, ``return_tensors``) and returns the same keys: ``input_ids``,
``attention_mask``, ``mm_token_type_ids`` (1 on image tokens, 2 on video tokens), ``pixel_values_videos`` and
``video_grid_thw`` (:func:`vtprune.video_inputs.qwen_video`), Qwen2.5-VL's ``second_per_grid_ts`` (temporal
patch / the clip's sampled fps), and the image processor's outputs where one is given.  Each clip's
placeholder is expanded as the processor expands it:

- Qwen2-VL, Qwen2.5-VL: ``<|video_pad|>`` becomes one pad per token (``t h w / merge^2``);
- Qwen3-VL: ``<|vision_start|><|video_pad|><|vision_end|>`` (or a bare ``<|video_pad|>``) becomes, for each
  temporal slice, its timestamp ``<2.5 seconds>`` (the mean time of its frames, from the clip's
  ``frames_indices`` and ``fps``) then ``<|vision_start|>``, the slice's pads and ``<|vision_end|>``.

Anything else (``apply_chat_template``, ``batch_decode``, ``pad_token_id``...) is the tokenizer's.
``tests/serving/test_video_inputs.py`` checks it against the real processors where torchvision loads.
"""

from __future__ import annotations

import os
import re

import torch

from .video_inputs import PRESETS, qwen_video

IMAGE_PAD, VIDEO_PAD, VISION_START, VISION_END = "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"
# the sampling and sizing options callers pass along with frames already sampled and sized (qwen_vl_utils' and
# lmms-eval's): the real processor takes them and, with ``do_sample_frames=False`` and ``do_resize=False``, does
# nothing with them either
SAMPLING_OPTIONS = {"do_sample_frames", "fps", "nframes", "min_frames", "max_frames", "min_pixels", "max_pixels",
                    "total_pixels", "return_metadata"}


def slice_times(frames_indices, fps: float, temporal_patch_size: int = 2) -> list:
    """Each temporal slice's time in seconds (Qwen3-VL's processor): the frame indices padded to whole slices
    by repeating the last, over ``fps``, the mean of each slice's first and last frame."""
    indices = list(frames_indices)
    if pad := -len(indices) % temporal_patch_size:
        indices += [indices[-1]] * pad
    times = [i / fps for i in indices]
    return [(times[i] + times[i + temporal_patch_size - 1]) / 2 for i in range(0, len(times), temporal_patch_size)]


def stamp(seconds: float) -> str:
    """A Qwen3-VL temporal slice's timestamp text, as its processor writes it."""
    return f"<{seconds:.1f} seconds>"


def clip_text(times, per_slice: int) -> str:
    """A Qwen3-VL clip's expanded placeholder: for each temporal slice (``times``, seconds) its ``stamp``, then
    ``<|vision_start|>``, its ``per_slice`` pads and ``<|vision_end|>``."""
    return "".join(stamp(t) + VISION_START + VIDEO_PAD * per_slice + VISION_END for t in times)


def _get(metadata, key, default=None):
    if metadata is None:
        return default
    value = metadata.get(key) if isinstance(metadata, dict) else getattr(metadata, key, None)
    return default if value is None else value


class QwenProcessor:
    """The processor of a Qwen family (``"qwen2_vl"``, ``"qwen2_5_vl"``, ``"qwen3_vl"``) over ``tokenizer``;
    images need ``image_processor`` (``Qwen2VLImageProcessorPil`` loads without torchvision).  ``min_pixels``
    / ``max_pixels`` bound a clip as the video processor's ``size`` does (used where ``do_resize`` is on)."""

    def __init__(self, tokenizer, family: str, image_processor=None, chat_template=None, min_pixels=None,
                 max_pixels=None, merge_size: int = 2, temporal_patch_size: int = 2):
        if family not in PRESETS:
            raise ValueError(f"QwenProcessor is for {', '.join(PRESETS)}, not {family!r}")
        self.tokenizer, self.family, self.image_processor = tokenizer, family, image_processor
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.merge_size, self.temporal_patch_size = merge_size, temporal_patch_size
        vocab = tokenizer.get_vocab()
        missing = [t for t in (IMAGE_PAD, VIDEO_PAD, VISION_START, VISION_END) if t not in vocab]
        if missing:
            raise ValueError(f"the tokenizer has no {', '.join(missing)}: not a Qwen tokenizer")
        self.image_token_id, self.video_token_id = vocab[IMAGE_PAD], vocab[VIDEO_PAD]

    def __getattr__(self, name):
        if name == "tokenizer":  # not set yet (unpickling)
            raise AttributeError(name)
        return getattr(self.tokenizer, name)

    def apply_chat_template(self, conversation, **kwargs):
        kwargs.setdefault("chat_template", self.chat_template)
        return self.tokenizer.apply_chat_template(conversation, **kwargs)

    def __call__(self, text=None, images=None, videos=None, video_metadata=None, padding=False, padding_side=None,
                 return_tensors=None, do_resize=True, **kwargs):
        from transformers import BatchFeature

        unknown = sorted(set(kwargs) - SAMPLING_OPTIONS)
        if unknown:
            raise TypeError(f"QwenProcessor got unexpected options {unknown}")
        if text is None:
            raise ValueError("QwenProcessor needs text (the prompts with their image and video placeholders)")
        texts = [text] if isinstance(text, str) else list(text)
        data, image_runs, clip_runs = {}, [], []
        if images:
            if self.image_processor is None:
                raise ValueError("images need an image processor: QwenProcessor(..., image_processor="
                                 "Qwen2VLImageProcessorPil(...))")
            data.update(self.image_processor(images=images, do_resize=do_resize, return_tensors="pt"))
            merge = self.merge_size ** 2
            image_runs = [IMAGE_PAD * int(g.prod() // merge) for g in data["image_grid_thw"]]
        if videos is not None and len(videos):
            metadata = list(video_metadata) if video_metadata is not None else [None] * len(videos)
            if len(metadata) != len(videos):
                raise ValueError(f"{len(videos)} clips and {len(metadata)} video_metadata")
            clips = [qwen_video(torch.as_tensor(v), self.family, self.min_pixels, self.max_pixels,
                                self.temporal_patch_size, self.merge_size, resize=do_resize) for v in videos]
            data["pixel_values_videos"] = torch.cat([c["pixel_values_videos"] for c in clips])
            data["video_grid_thw"] = torch.cat([c["video_grid_thw"] for c in clips])
            clip_runs = [self._clip_run(c["video_grid_thw"][0], m, len(v)) for c, m, v in zip(clips, metadata, videos)]
            if self.family == "qwen2_5_vl":
                data["second_per_grid_ts"] = torch.tensor([self.temporal_patch_size / self._sampled_fps(m)
                                                           for m in metadata])
        texts = self._expand(texts, image_runs, clip_runs)
        encoded = self.tokenizer(texts, padding=padding, padding_side=padding_side, return_tensors="pt")
        ids = encoded["input_ids"]
        data = {"input_ids": ids, "attention_mask": encoded["attention_mask"],
                "mm_token_type_ids": (ids == self.image_token_id).long() + 2 * (ids == self.video_token_id).long(),
                **data}
        return BatchFeature(data, tensor_type=return_tensors)

    @staticmethod
    def _sampled_fps(metadata):
        """transformers' ``VideoMetadata.sampled_fps``: the clip's frames over its source's, times its fps."""
        fps = _get(metadata, "fps")
        indices, total = _get(metadata, "frames_indices"), _get(metadata, "total_num_frames")
        if fps is None:
            return 24.0
        if indices is None or total is None:
            return float(fps)
        return len(indices) / total * fps

    def _clip_run(self, grid, metadata, frames):
        t, h, w = (int(v) for v in grid)
        per_slice = h * w // self.merge_size ** 2
        if self.family != "qwen3_vl":
            return VIDEO_PAD * (t * per_slice)
        fps = _get(metadata, "fps", 24.0)
        times = slice_times(_get(metadata, "frames_indices", range(frames)), fps, self.temporal_patch_size)
        return clip_text(times[:t], per_slice)

    def _expand(self, texts, image_runs, clip_runs):
        images, clips = iter(image_runs), iter(clip_runs)
        trio = re.escape(VISION_START + VIDEO_PAD + VISION_END) + "|" if self.family == "qwen3_vl" else ""
        pattern = re.compile(trio + re.escape(IMAGE_PAD) + "|" + re.escape(VIDEO_PAD))

        def run(match):
            source, kind = (images, "image") if match.group(0) == IMAGE_PAD else (clips, "clip")
            try:
                return next(source)
            except StopIteration:
                raise ValueError(f"more {kind} placeholders in the text than {kind}s given") from None

        out = [pattern.sub(run, t) for t in texts]
        left = len(list(images)) + len(list(clips))
        if left:
            raise ValueError(f"{left} images or clips given without a placeholder in the text")
        return out


def load(path, family: str, **image_options) -> QwenProcessor:
    """``QwenProcessor`` of a model folder: its tokenizer, its chat template, and its image processor's settings
    (``Qwen2VLImageProcessorPil``, which needs no torchvision, given ``image_options`` such as ``min_pixels``,
    as ``AutoProcessor.from_pretrained`` passes them on) where it has a ``preprocessor_config.json``."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(path)
    try:
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(path, **image_options)
    except OSError:  # no image processor settings (the toy video model): clips only
        image_processor = None
    template = getattr(tokenizer, "chat_template", None)
    jinja = os.path.join(str(path), "chat_template.jinja")
    if template is None and os.path.exists(jinja):
        with open(jinja) as f:
            template = f.read()
    return QwenProcessor(tokenizer, family, image_processor=image_processor, chat_template=template)
