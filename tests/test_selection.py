"""Layouts the adapters report, the uniform lattice, and the LLaVA-NeXT newline rule."""

import pytest
import torch

import vtprune
from vtprune import families
from vtprune.choose import top_tokens
from vtprune.runtime.cut import plan_cut
from vtprune.layout import ImageLayout
from vtprune.patches import adapter_for
from vtprune.scoring import lattice, share_budget, uniform_scores
from vtprune.testing import tiny_inputs, tiny_model


@pytest.mark.parametrize("h,w,k", [(24, 24, 144), (24, 24, 58), (24, 24, 1), (4, 6, 24), (3, 17, 10), (1, 9, 4)])
def test_lattice_is_even_and_distinct(h, w, k):
    pts = lattice(h, w, k)
    assert pts.numel() == k == pts.unique().numel()
    assert int(pts.min()) >= 0 and int(pts.max()) < h * w
    if (h, w, k) == (24, 24, 144):  # a 12 x 12 lattice with stride 2 in both directions
        assert sorted(set((pts // w).tolist())) == list(range(1, 24, 2))
        assert sorted(set((pts % w).tolist())) == list(range(1, 24, 2))


def test_share_budget_is_proportional_and_capped():
    assert share_budget([576, 576], 10) == [5, 5]
    assert sum(share_budget([576, 1200, 3], 100)) == 100
    assert share_budget([2, 100], 50)[0] <= 2


def test_uniform_scores_cover_every_grid():
    layout = ImageLayout.from_grids([(4, 4), (4, 4), (4, 4)])
    s = uniform_scores(layout, 6)
    assert int(s.sum()) == 6
    assert [int(s[layout.grid == g].sum()) for g in range(3)] == [2, 2, 2]


def test_top_tokens_order_ties_and_budget():
    layout = ImageLayout.flat(6)
    keep = top_tokens(torch.tensor([0.1, 0.9, 0.5, 0.9, 0.0, 0.2]), layout, 3)
    assert keep.tolist() == [1, 2, 3]
    assert top_tokens(torch.zeros(6), layout, 2).tolist() == [0, 1]  # ties: earlier first
    with pytest.raises(ValueError, match="scores"):
        top_tokens(torch.zeros(5), layout, 2)


def test_plan_cut_pads_short_rows_at_front():
    index, real = plan_cut([torch.tensor([0, 2, 3]), torch.tensor([1])], 4, "cpu")
    assert index.tolist() == [[0, 2, 3], [0, 0, 1]]
    assert real.tolist() == [[True, True, True], [False, False, True]]


def test_llava_next_layout_matches_packing_and_keeps_newlines_of_kept_rows():
    model = tiny_model("llava_next")
    inputs = tiny_inputs(model, "llava_next", image_specs=[(50, 100)])
    with vtprune.wrapped(model, "uniform", keep=0.3):
        with torch.no_grad():
            model(**inputs)
        adapter = adapter_for(model)
        capture = adapter.capture((), {"image_sizes": inputs["image_sizes"]},
                                          model.model.get_image_features(pixel_values=inputs["pixel_values"],
                                                                         image_sizes=inputs["image_sizes"]))
        layout = adapter.layout(0, capture["counts"][0], capture)
        kept = vtprune.last_kept(model)[0][0]
    n = capture["counts"][0]
    assert layout.n == n and layout.shapes[0] == (4, 4)
    rows, cols = layout.shapes[1]
    assert int(layout.newline.sum()) == rows and 16 + rows * (cols + 1) == n
    # newline positions: the last token of every crop row
    assert layout.newline.nonzero().squeeze(1).tolist() == [16 + (r + 1) * (cols + 1) - 1 for r in range(rows)]
    kept_mask = torch.zeros(n, dtype=torch.bool)
    kept_mask[kept] = True
    for r in range(rows):
        in_row = (layout.grid == 1) & (layout.row == r) & ~layout.newline
        nl = (layout.grid == 1) & (layout.row == r) & layout.newline
        assert bool(kept_mask[nl].all()) == bool(kept_mask[in_row].any())


def test_internvl_images_are_runs_of_tiles():
    model = tiny_model("internvl")
    inputs = tiny_inputs(model, "internvl", images_per_row=(2,), image_specs=[3, 2])
    with vtprune.wrapped(model, "uniform", keep=0.5):
        with torch.no_grad():
            model(**inputs)
        stats = vtprune.stats(model)
    assert [i["tokens_in"] for i in stats["samples"][0]["images"]] == [12, 8]
    assert [i["tokens_out"] for i in stats["samples"][0]["images"]] == [6, 4]


def test_qwen_layout_follows_grid():
    model = tiny_model("qwen2_5_vl")
    inputs = tiny_inputs(model, "qwen2_5_vl", image_specs=[(8, 12)])
    with vtprune.wrapped(model, "uniform", keep=6):
        with torch.no_grad():
            model(**inputs)
        kept = vtprune.last_kept(model)[0][0]
    # a 4 x 6 LLM grid; 6 points of a 2 x 3 lattice: rows 1 and 3, columns 1, 3, 5
    assert sorted(kept.tolist()) == [r * 6 + c for r in (1, 3) for c in (1, 3, 5)]


@pytest.mark.parametrize("family", ["llava_next", "internvl"])
def test_tile_scope_gives_every_tile_its_share(family):
    model = tiny_model(family)
    inputs = tiny_inputs(model, family)
    with vtprune.wrapped(model, "fastervlm", keep=0.25, scope="tile"):
        with torch.no_grad():
            model(**inputs)
        layout = vtprune.record(model).layouts[0][0]
        kept = vtprune.last_kept(model)[0][0]
    content = ~layout.newline
    tiles = layout.tiles
    for t in tiles[content].unique().tolist():
        members = int((content & (tiles == t)).sum())
        got = int((content[kept] & (tiles[kept] == t)).sum())
        assert got == int(0.25 * members + 0.5) or (got == 1 and members < 4)
    with pytest.raises(ValueError, match="scope"):
        vtprune.wrap(model, "random", scope="crop")


@pytest.mark.parametrize("family", ["llava", "llava_next", "internvl", "qwen2_5_vl"])
def test_kept_count_is_what_every_selector_keeps(family):
    """``Selector.kept_count(layout)`` (what vLLM sizes a prompt by) is the number of tokens the HF wrap keeps,
    for every registered selector where it says the count is known; where not, it says why."""
    import vtprune
    from vtprune.errors import NotApplicable
    from vtprune.methods import get
    from vtprune.testing import tiny_inputs, tiny_model

    model = tiny_model(family)
    inputs = tiny_inputs(model, family, images_per_row=(1,))
    options = {"newlines": "all"} if family == "llava_next" else {}
    checked = 0
    for name in vtprune.methods.available():
        cls = get(name)
        if cls.stage != "select" or (cls.merges and families.get(family).merges_before_projector):
            continue
        for extra in ({}, {"summary": 2}, {"scope": "tile"}, {"scope": "frame"}):
            if extra.get("summary") and cls.covers_all or extra.get("scope") and cls.temporal:
                continue
            with vtprune.wrapped(model, name, keep=0.25, **options, **extra):
                with torch.no_grad():
                    model(**inputs)
                kept = vtprune.last_kept(model)[0][0]
                layout = vtprune.record(model).layouts[0][0]
                config = vtprune.api.methods_of(model)[0]
            try:
                count = config.kept_count(layout)
            except NotApplicable as err:  # the count depends on the selection (fastvid's segments): it says so
                assert "depends" in str(err), (name, extra)
                continue
            assert count == kept.numel(), (name, extra)
            checked += 1
    assert checked >= 20
    rows = get("uniform")(keep=0.25)
    if family == "llava_next":
        with pytest.raises(NotApplicable, match="newlines='all'"):
            rows.kept_count(layout)
