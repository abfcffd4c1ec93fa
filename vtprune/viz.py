"""Pictures of what was kept: dropped patches dimmed, kept patches outlined, merged patches half-dimmed."""

from __future__ import annotations

import torch

SUMMARY = (255, 150, 30)  # a summary token's outline (orange); kept tokens are outlined in white
HALF = 0.6  # the brightness of a token merged into a kept one (a pool window, a summary token's group)


def overlay(image, model_or_kept, sample: int = 0, image_index: int = 0, grid: int = 0, shape=None,
            dim: float = 0.25):
    """Return a copy of PIL ``image`` with the visual tokens that were dropped dimmed.

    ``model_or_kept`` is a wrapped model (its last forward pass is read: ``sample``, ``image_index``)
    or a LongTensor of kept token indices of an image with one grid of ``shape=(rows, cols)``.
    An image with several grids draws grid ``grid`` over the whole picture: LLaVA-NeXT 0 = the
    base image, 1 = the crops re-assembled (finer); Qwen one grid per frame; InternVL one per tile
    (only the thumbnail/single tile covers the whole picture).

    From a wrapped model, a token that a kept token stands for (a ``pool`` window's other cells, the
    members of a summary token's group) is half-dimmed rather than dimmed, and a summary token is
    outlined in orange (``SUMMARY``) instead of white.
    """
    from PIL import Image, ImageDraw

    summary, merged = set(), set()
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
        groups = [(pos, members, True) for pos, members in _of(last.summaries, sample, image_index)]
        groups += [(pos, members, False) for pos, members in _of(last.merged, sample, image_index)]
        for pos, members, is_summary in groups:
            if is_summary and int(pos) in cell_of:
                summary.add(int(pos))
            merged |= {int(m) for m in members if int(m) in cell_of} - cells
    img = image.convert("RGB")
    out = Image.eval(img, lambda v: int(v * dim))
    draw = ImageDraw.Draw(out)
    cw, ch = img.width / w, img.height / h

    def box(i):
        r, c = cell_of[i]
        return round(c * cw), round(r * ch), round((c + 1) * cw), round((r + 1) * ch)

    for i in merged:
        b = box(i)
        out.paste(Image.eval(img.crop(b), lambda v: int(v * HALF)), b[:2])
    for i in cells:
        b = box(i)
        out.paste(img.crop(b), b[:2])
        draw.rectangle((b[0], b[1], b[2] - 1, b[3] - 1), outline=SUMMARY if i in summary else (255, 255, 255),
                       width=2 if i in summary else 1)
    return out


def _of(per_sample, sample, image_index) -> list:
    if not per_sample or sample >= len(per_sample) or image_index >= len(per_sample[sample]):
        return []
    return per_sample[sample][image_index] or []
