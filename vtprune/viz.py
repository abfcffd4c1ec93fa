"""Pictures of what was kept: dropped patches dimmed, kept patches outlined."""

from __future__ import annotations

import torch


def overlay(image, model_or_kept, sample: int = 0, image_index: int = 0, grid: int = 0, shape=None,
            dim: float = 0.25):
    """Return a copy of PIL ``image`` with the visual tokens that were dropped dimmed.

    ``model_or_kept`` is a wrapped model (its last forward pass is read: ``sample``, ``image_index``)
    or a LongTensor of kept token indices of an image with one grid of ``shape=(rows, cols)``.
    An image with several grids draws grid ``grid`` over the whole picture: LLaVA-NeXT 0 = the
    base image, 1 = the crops re-assembled (finer); Qwen one grid per frame; InternVL one per tile
    (only the thumbnail/single tile covers the whole picture).
    """
    from PIL import Image, ImageDraw

    if isinstance(model_or_kept, torch.Tensor):
        if shape is None:
            raise ValueError("overlay(image, kept_indices) needs shape=(rows, cols)")
        kept, (h, w) = model_or_kept, shape
        cells = {int(i) for i in kept}
        cell_of = {i: (i // w, i % w) for i in range(h * w)}
    else:
        from .api import record

        last = record(model_or_kept)
        kept = last.kept[sample][image_index]
        layout = last.layouts[sample][image_index]
        if not 0 <= grid < len(layout.shapes):
            raise ValueError(f"grid {grid} does not exist: this image has {len(layout.shapes)} grid(s)")
        h, w = layout.shapes[grid]
        first = (layout.grid == grid) & ~layout.newline
        cell_of = {int(i): (int(layout.row[i]), int(layout.col[i])) for i in first.nonzero().squeeze(1)}
        cells = {int(i) for i in kept if int(i) in cell_of}
    img = image.convert("RGB")
    out = Image.eval(img, lambda v: int(v * dim))
    draw = ImageDraw.Draw(out)
    cw, ch = img.width / w, img.height / h
    for i in cells:
        r, c = cell_of[i]
        box = (round(c * cw), round(r * ch), round((c + 1) * cw), round((r + 1) * ch))
        out.paste(img.crop(box), box[:2])
        draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), outline=(255, 255, 255))
    return out
