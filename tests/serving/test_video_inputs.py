"""``vtprune.video_inputs.qwen_video`` equals what transformers' video processors make of the same frames
(``Qwen2VLVideoProcessor`` for Qwen2-VL and Qwen2.5-VL, ``Qwen3VLVideoProcessor``): this venv has torchvision,
the main one cannot load it next to its CPU torch."""

import os

import pytest

if os.environ.get("VTPRUNE_REQUIRE_VLLM") != "1":  # the serving venv: torchvision and the video processors
    pytest.importorskip("torchvision")

import torch  # noqa: E402
from transformers import Qwen2VLVideoProcessor, Qwen3VLVideoProcessor  # noqa: E402

from vtprune.video_inputs import qwen_video  # noqa: E402


@pytest.mark.parametrize("family,processor", [("qwen2_vl", Qwen2VLVideoProcessor), ("qwen3_vl", Qwen3VLVideoProcessor)])
@pytest.mark.parametrize("t,h,w", [(8, 224, 308), (5, 360, 640), (4, 120, 160), (6, 1080, 1920), (2, 448, 448),
                                   (4, 20, 300)])
def test_qwen_video_equals_the_processor(family, processor, t, h, w):
    frames = torch.randint(0, 256, (t, 3, h, w), generator=torch.Generator().manual_seed(t * h), dtype=torch.uint8)
    ref = processor()(videos=[frames], return_tensors="pt", do_sample_frames=False, cap_pixels_per_frame=False)
    ours = qwen_video(frames, family)
    assert torch.equal(ours["video_grid_thw"], ref["video_grid_thw"])
    torch.testing.assert_close(ours["pixel_values_videos"], ref["pixel_values_videos"], atol=1e-6, rtol=0)


def _processor(family, tokenizer):
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen3VLProcessor

    cls, video, patch = {"qwen2_vl": (Qwen2VLProcessor, Qwen2VLVideoProcessor, 14),
                         "qwen2_5_vl": (Qwen2_5_VLProcessor, Qwen2VLVideoProcessor, 14),
                         "qwen3_vl": (Qwen3VLProcessor, Qwen3VLVideoProcessor, 16)}[family]
    return cls(image_processor=Qwen2VLImageProcessor(patch_size=patch), tokenizer=tokenizer,
               video_processor=video(), chat_template=tokenizer.chat_template)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_qwen_processor_equals_the_processor(family):
    """``vtprune.qwen_processor.QwenProcessor`` against transformers' processor of the family (the toy video model's
    tokenizer, which has Qwen's vision tokens): two prompts left padded, two clips sized already (as qwen_vl_utils
    hands them over, floats, ``do_resize=False``), one of an odd frame count and sampled from a 30 fps source."""
    from transformers import AutoTokenizer

    from vtprune import toy_video
    from vtprune.qwen_processor import QwenProcessor

    tokenizer = AutoTokenizer.from_pretrained(toy_video.DEFAULT_PATH)
    side = 28 if family != "qwen3_vl" else 32
    g = torch.Generator().manual_seed(3)
    clips = [torch.randint(0, 256, (8, 3, 2 * side, 3 * side), generator=g).float(),
             torch.randint(0, 256, (5, 3, 4 * side, 2 * side), generator=g).float()]
    metadata = [{"fps": 2.0, "frames_indices": list(range(8)), "total_num_frames": 8},
                {"fps": 30.0, "frames_indices": [0, 14, 29, 44, 59], "total_num_frames": 60}]
    # Qwen3-VL: the bare video token (transformers before 5.25 keeps the chat template's outer
    # <|vision_start|>...<|vision_end|> around the expanded clip in some calls; 5.25 and vLLM drop it, as QwenProcessor)
    wrap = ("", "") if family == "qwen3_vl" else ("<|vision_start|>", "<|vision_end|>")
    texts = [f"<s> USER: {wrap[0]}<|video_pad|>{wrap[1]} what color ASSISTANT:",
             f"<s> USER: {wrap[0]}<|video_pad|>{wrap[1]} what ? ASSISTANT:"]
    options = dict(text=texts, videos=clips, video_metadata=metadata, padding=True, padding_side="left",
                   do_resize=False, do_sample_frames=False, return_tensors="pt")
    ref = _processor(family, tokenizer)(**options)
    ours = QwenProcessor(tokenizer, family)(**options)
    assert set(ours) == set(ref) - {"video_metadata"}
    for key in ours:
        if key != "pixel_values_videos":
            assert torch.equal(ours[key], torch.as_tensor(ref[key]).to(ours[key].dtype)), (key, ours[key], ref[key])
    torch.testing.assert_close(ours["pixel_values_videos"], ref["pixel_values_videos"], atol=1e-6, rtol=0)


def test_qwen_clips_resize_is_torchvisions_v1_resize():
    """``vtprune.eval.qwen_clips`` resizes frames as qwen_vl_utils does, through torchvision's v1 tensor resize
    (bicubic on floats, rounded back to uint8): equal to it here, where torchvision loads."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    from vtprune.eval import qwen_clips

    frames = torch.randint(0, 256, (4, 3, 90, 160), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
    for size in [(84, 140), (128, 224), (56, 112), (90, 160)]:
        ref = TF.resize(frames, list(size), interpolation=InterpolationMode.BICUBIC, antialias=True).float()
        assert torch.equal(qwen_clips.resize(frames, size), ref), size
