"""vtprune's ``evs`` keeps exactly the tokens vLLM's own EVS keeps (``--video-pruning-method evs``) on the same
clip features: its retention mask, computed by the installed vLLM (no engine is started)."""

import os

import pytest

if os.environ.get("VTPRUNE_REQUIRE_VLLM") != "1":  # CI sets it: there a missing vLLM fails the run
    pytest.importorskip("vllm")

import torch  # noqa: E402
from vllm.multimodal.video_prune.evs import compute_retention_mask  # noqa: E402

from vtprune.choose import Seen, choose  # noqa: E402
from vtprune.layout import ImageLayout  # noqa: E402
from vtprune.methods import EVS  # noqa: E402


def _clip(t, h, w, dim, dtype, seed):
    """Features of a clip whose tokens partly stay put between slices (ties and near-ties included)."""
    gen = torch.Generator().manual_seed(seed)
    x = [torch.randn(h * w, dim, generator=gen)]
    for _ in range(t - 1):
        moved = torch.rand(h * w, generator=gen) < 0.4
        x.append(torch.where(moved[:, None], torch.randn(h * w, dim, generator=gen), x[-1]))
    return torch.cat(x).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("thw,rate", [((4, 8, 12), 0.75), ((6, 4, 4), 0.5), ((3, 6, 8), 0.9), ((2, 4, 6), 0.75)])
def test_evs_keeps_what_vllm_evs_keeps(dtype, thw, rate):
    t, h, w = thw  # temporal slices and the tower's patch grid (the merger halves each side)
    features = _clip(t, h // 2, w // 2, 16, dtype, seed=t * h)
    layout = ImageLayout.from_grids([(h // 2, w // 2)] * t)
    layout.frame, layout.media = layout.grid.clone(), "video"
    evs = EVS(keep=1 - rate)
    evs.validate()
    (choice,) = choose(evs, [Seen(layout, features)], torch.Generator())
    vllm_kept = compute_retention_mask(features, torch.tensor(thw), 2, rate).nonzero().squeeze(1)
    assert torch.equal(choice.kept, vllm_kept)
    assert evs.kept_count(layout) == vllm_kept.numel()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("thw,rate", [((4, 8, 12), 0.75), ((6, 4, 4), 0.5), ((3, 6, 8), 0.9), ((8, 4, 6), 0.75)])
def test_vidcom2_keeps_what_vllm_vidcom2_keeps(dtype, thw, rate):
    from vllm.multimodal.video_prune.vidcom2 import compute_retention_mask as vidcom2_mask

    from vtprune.methods import VidCom2

    t, h, w = thw
    features = _clip(t, h // 2, w // 2, 16, dtype, seed=t * w)
    layout = ImageLayout.from_grids([(h // 2, w // 2)] * t)
    layout.frame, layout.media = layout.grid.clone(), "video"
    method = VidCom2(keep=1 - rate)
    method.validate()
    (choice,) = choose(method, [Seen(layout, features)], torch.Generator())
    vllm_kept = vidcom2_mask(features, torch.tensor(thw), 2, rate).nonzero().squeeze(1)
    assert torch.equal(choice.kept, vllm_kept)
    assert method.kept_count(layout) == vllm_kept.numel()
