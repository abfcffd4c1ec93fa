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
