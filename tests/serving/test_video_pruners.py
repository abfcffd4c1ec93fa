"""vtprune's ``evs`` and ``vidcom2`` keep exactly the tokens vLLM's own pruners keep (``--video-pruning-method
evs|vidcom2``) on the same clip features: their retention masks, computed by the installed vLLM (no engine is
started)."""

import os

import pytest

if os.environ.get("VTPRUNE_REQUIRE_VLLM") != "1":  # CI sets it: there a missing vLLM fails the run
    pytest.importorskip("vllm")

import torch  # noqa: E402
from vllm.multimodal.video_prune import evs, vidcom2  # noqa: E402

from vtprune.choose import Seen, choose  # noqa: E402
from vtprune.layout import ImageLayout  # noqa: E402
from vtprune.methods import EVS, VidCom2  # noqa: E402


def _clip(t, h, w, dim, dtype, seed):
    """Features of a clip whose tokens partly stay put between slices (ties and near-ties included)."""
    gen = torch.Generator().manual_seed(seed)
    x = [torch.randn(h * w, dim, generator=gen)]
    for _ in range(t - 1):
        moved = torch.rand(h * w, generator=gen) < 0.4
        x.append(torch.where(moved[:, None], torch.randn(h * w, dim, generator=gen), x[-1]))
    return torch.cat(x).to(dtype)


@pytest.mark.parametrize("ours,theirs", [(EVS, evs), (VidCom2, vidcom2)], ids=["evs", "vidcom2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("thw,rate", [((4, 8, 12), 0.75), ((6, 4, 4), 0.5), ((3, 6, 8), 0.9), ((8, 4, 6), 0.75),
                                      ((2, 4, 6), 0.75)])
def test_keeps_what_vllm_keeps(ours, theirs, dtype, thw, rate):
    t, h, w = thw  # temporal slices and the tower's patch grid (the merger halves each side)
    features = _clip(t, h // 2, w // 2, 16, dtype, seed=t * h + w)
    layout = ImageLayout.from_grids([(h // 2, w // 2)] * t)
    layout.frame, layout.media = layout.grid.clone(), "video"
    method = ours(keep=1 - rate)  # vLLM's rate is the share pruned
    method.validate()
    (choice,) = choose(method, [Seen(layout, features)], torch.Generator())
    vllm_kept = theirs.compute_retention_mask(features, torch.tensor(thw), 2, rate).nonzero().squeeze(1)
    assert torch.equal(choice.kept, vllm_kept)
    assert method.kept_count(layout) == vllm_kept.numel()
