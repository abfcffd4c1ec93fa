"""The `pool` and `divprune` baselines against independent references."""

import pytest
import torch
from reference import drop_mask, masked_forward

import vtprune
from vtprune.layout import ImageLayout
from vtprune.methods import ScoreContext, get
from vtprune.scoring import pool_grid, pool_windows
from vtprune.testing import IMAGE_TOKEN, tiny_inputs, tiny_model


@pytest.mark.parametrize("h,w,k", [(24, 24, 144), (24, 24, 58), (27, 27, 64), (27, 27, 29), (5, 9, 7)])
def test_pool_windows_equal_adaptive_avg_pool(h, w, k):
    layout = ImageLayout.from_grids([(h, w)])
    features = torch.randn(h * w, 6)
    anchors, members = pool_windows(layout, k)
    r, c = pool_grid(h, w, k)
    assert r * c <= k and anchors.numel() == r * c
    ref = torch.nn.functional.adaptive_avg_pool2d(features.T.reshape(1, 6, h, w), (r, c))  # [1, 6, r, c]
    ours = torch.stack([features[m].mean(0) for m in members])  # windows in raster order
    torch.testing.assert_close(ours, ref[0].reshape(6, -1).T, atol=1e-6, rtol=1e-6)
    # the anchor is each window's top-left cell
    assert all(int(a) == int(m.min()) for a, m in zip(anchors, members))


@pytest.mark.parametrize("h,w,k,grid", [(16, 16, 26, (5, 5)), (16, 16, 13, (3, 4)), (16, 16, 128, (8, 16)),
                                         (24, 24, 58, (7, 8)), (24, 24, 144, (12, 12)), (4, 4, 2, (1, 2)),
                                         (20, 30, 150, (10, 15))])
def test_pool_windows_stay_compact(h, w, k, grid):
    """The most windows no more than twice as long as wide (16 x 16 to 26 tokens: 5 x 5, not 2 x 13 strips of
    8 x 1.2 cells; to 128: 8 x 16 pairs)."""
    assert pool_grid(h, w, k) == grid
    r, c = grid
    assert 1 / 2 - 1e-9 <= (h / r) / (w / c) <= 2 + 1e-9
    better = [(a, b) for a in range(1, h + 1) for b in range(1, w + 1)
              if r * c < a * b <= k and 1 / 2 - 1e-9 <= (h / a) / (w / b) <= 2 + 1e-9]
    assert not better


def test_pool_on_constant_grid_returns_the_constant():
    layout = ImageLayout.from_grids([(6, 6)])
    ctx = ScoreContext(layouts=[layout], budgets=[9], rows=[0], features=[torch.full((36, 4), 2.5)],
                       generator=torch.Generator())
    scores = get("pool")(keep=9).score(ctx)[0]
    idx, feats = ctx.replacements[0]
    assert int(scores.sum()) == 9 == idx.numel() and ctx.budgets[0] == 9
    assert torch.equal(feats, torch.full((9, 4), 2.5))


def test_pooled_model_equals_stock_fed_pooled_embeddings():
    model = tiny_model("llava")
    inputs = tiny_inputs(model, "llava", images_per_row=(1, 2))
    captured = {}
    handle = model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: captured.update(embeds=k["inputs_embeds"].clone()), with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    vtprune.wrap(model, "pool", keep=4)
    with torch.no_grad():
        logits = model(**inputs).logits
    kept = vtprune.last_kept(model)
    vtprune.unwrap(model)
    # reference: replace each window's first token with the window mean (4x4 grid pooled to 2x2)
    embeds = captured["embeds"]
    for b in range(embeds.shape[0]):
        pos = (inputs["input_ids"][b] == IMAGE_TOKEN).nonzero().squeeze(1)
        for image in pos.split(16):
            grid = embeds[b, image].T.reshape(1, -1, 4, 4)
            pooled = torch.nn.functional.adaptive_avg_pool2d(grid, (2, 2))[0].reshape(grid.shape[1], -1).T
            embeds[b, image[torch.tensor([0, 2, 8, 10])]] = pooled
    assert all(k.tolist() == [0, 2, 8, 10] for row in kept for k in row)
    drop = drop_mask(inputs["input_ids"], kept)
    with torch.no_grad():
        ref = model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"] * (~drop).long()).logits
    torch.testing.assert_close(logits[:, -1], ref[:, -1], atol=1e-5, rtol=0)


def _divprune_brute_force(features, k):
    """The DivPrune greedy written out with explicit loops (cosine distance)."""
    n = features.shape[0]
    f = features / features.norm(dim=1, keepdim=True)
    d = [[1.0 - float(f[i] @ f[j]) for j in range(n)] for i in range(n)]
    first = max(range(n), key=lambda j: (min(d[i][j] for i in range(n) if i != j), -j))
    chosen = [first]
    while len(chosen) < k:
        rest = [j for j in range(n) if j not in chosen]
        chosen.append(max(rest, key=lambda j: (min(d[i][j] for i in chosen), -j)))
    return chosen


@pytest.mark.parametrize("seed", range(4))
def test_divprune_equals_brute_force(seed):
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(12, 5, generator=gen)
    layout = ImageLayout.flat(12)
    ctx = ScoreContext(layouts=[layout], budgets=[5], rows=[0], features=[features], generator=gen)
    scores = get("divprune")(keep=5).score(ctx)[0]
    ours = torch.argsort(scores, descending=True)[:5].tolist()  # selection order
    assert ours == _divprune_brute_force(features.double(), 5)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "llava_next"])
def test_divprune_runs_exact_on_families(family):
    model = tiny_model(family)
    inputs = tiny_inputs(model, family, images_per_row=(1, 2))
    vtprune.wrap(model, "divprune", keep=0.3)
    with torch.no_grad():
        logits = model(**inputs).logits
        again = model(**inputs).logits
    kept = vtprune.last_kept(model)
    vtprune.unwrap(model)
    assert torch.equal(logits, again)  # deterministic
    ref = masked_forward(model, inputs, drop_mask(inputs["input_ids"], kept))
    torch.testing.assert_close(logits[:, -1], ref[:, -1], atol=1e-5, rtol=0)
