"""The kept-token overlay marks exactly the kept cells."""

import numpy as np
import pytest
import torch
from PIL import Image

import vtprune
from vtprune.testing import tiny_inputs, tiny_model
from vtprune.viz import overlay


def _bright_cells(picture, rows, cols):
    a = np.asarray(picture, dtype=np.float32).mean(-1)
    h, w = a.shape[0] // rows, a.shape[1] // cols
    return {r * cols + c for r in range(rows) for c in range(cols) if a[r * h + 2:(r + 1) * h - 2, c * w + 2:(c + 1) * w - 2].mean() > 150}


def test_overlay_from_indices():
    image = Image.new("RGB", (40, 40), (255, 255, 255))
    out = overlay(image, torch.tensor([0, 5, 15]), shape=(4, 4))
    assert out.size == image.size
    assert _bright_cells(out, 4, 4) == {0, 5, 15}
    with pytest.raises(ValueError, match="shape"):
        overlay(image, torch.tensor([0]))


@pytest.mark.parametrize("family,grid,shape", [("llava", 0, (4, 4)), ("llava_next", 1, None)])
def test_overlay_from_wrapped_model(family, grid, shape):
    model = tiny_model(family)
    inputs = tiny_inputs(model, family)
    image = Image.new("RGB", (112, 56) if family == "llava_next" else (56, 56), (255, 255, 255))
    with vtprune.wrapped(model, "random", keep=0.3, seed=1):
        with torch.no_grad():
            model(**inputs)
        layout = vtprune.record(model).layouts[0][0]
        kept = vtprune.last_kept(model)[0][0]
        out = overlay(image, model, grid=grid)
        with pytest.raises(ValueError, match="grid 5"):
            overlay(image, model, grid=5)
    rows, cols = layout.shapes[grid]
    in_grid = (layout.grid == grid) & ~layout.newline
    expected = {int(layout.row[i]) * cols + int(layout.col[i]) for i in kept.tolist() if in_grid[i]}
    assert expected and _bright_cells(out, rows, cols) == expected


def _mean(picture, rows, cols, cell):
    a = np.asarray(picture, dtype=np.float32)
    h, w = a.shape[0] // rows, a.shape[1] // cols
    r, c = divmod(cell, cols)
    return a[r * h + 3:(r + 1) * h - 3, c * w + 3:(c + 1) * w - 3].reshape(-1, 3).mean(0)


def test_pool_windows_and_summary_tokens_are_drawn_as_what_they_stand_for():
    """A pool window's other cells are half-dimmed, not dropped; a summary token is outlined in orange and its
    group half-dimmed; every other dropped cell stays dimmed."""
    from vtprune.viz import HALF, SUMMARY

    model = tiny_model("llava")
    inputs = tiny_inputs(model, "llava")
    image = Image.new("RGB", (56, 56), (200, 200, 200))
    with vtprune.wrapped(model, "pool", keep=4):
        with torch.no_grad():
            model(**inputs)
        last = vtprune.record(model)
        out = overlay(image, model)
    windows = last.merged[0][0]
    assert len(windows) == 4 and sorted(len(m) for _, m in windows) == [4, 4, 4, 4]  # 4x4 grid: 2x2 windows
    for anchor, members in windows:
        assert abs(_mean(out, 4, 4, anchor)[0] - 200) < 2
        for m in members:
            if m != anchor:
                assert abs(_mean(out, 4, 4, int(m))[0] - int(200 * HALF)) < 2
    with vtprune.wrapped(model, "random", keep=6, summary=2, seed=0):
        with torch.no_grad():
            model(**inputs)
        last = vtprune.record(model)
        out = overlay(image, model)
    groups, kept = last.summaries[0][0], {int(i) for i in last.kept[0][0]}
    assert len(groups) == 2
    pixels = np.asarray(out)
    h = pixels.shape[0] // 4
    members = set()
    for pos, group in groups:
        r, c = divmod(int(pos), 4)
        assert tuple(pixels[r * h, c * h]) == SUMMARY  # the outline's corner
        members |= {int(m) for m in group} - kept
    for cell in range(16):
        expected = 200 if cell in kept else int(200 * HALF) if cell in members else 50
        assert abs(_mean(out, 4, 4, cell)[0] - expected) < 2, cell
