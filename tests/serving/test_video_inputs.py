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
