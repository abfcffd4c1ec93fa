"""Where an image's visual tokens sit in space: the geometry adapters describe and methods read."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass
class ImageLayout:
    """Geometry of one image's visual tokens, in the order the stock model feeds them to the LLM.

    An image is one or more 2-D grids (LLaVA: one; LLaVA-NeXT: the base image and the grid of
    re-assembled crops; InternVL: one per tile; Qwen: one per temporal frame).  For every token:
    ``grid`` is its grid id (-1 for a token outside every grid, e.g. a [CLS] fed to the LLM),
    ``row``/``col`` its cell, and ``newline`` marks LLaVA-NeXT's row-separator tokens (their
    ``row`` is the row they end, ``col`` is -1).

    ``source`` ([n, k], optional) says which vision-tower tokens each LLM token was made from:
    indices into the image's tower outputs flattened over its tiles, ``tile * N + position``
    ([CLS] at position 0 where the tower has one), -1 for none (a newline).  LLaVA: one source per
    token; InternVL: the 4 patches its pixel shuffle merged.

    ``tile`` (optional) is the tower pass (LLaVA-NeXT crop, InternVL tile) each token comes from,
    -1 for none; when unset the grid id stands for it.  ``cropped``: some tower tokens of a tile never
    reach the LLM (LLaVA-NeXT's unpadding).

    ``media``: ``"image"`` or ``"video"`` (then it describes a clip); ``frame`` (optional): each token's
    temporal slice (Qwen: a temporal patch of two input frames), -1 for none; unset, the whole item
    is one frame.
    """

    grid: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    newline: torch.Tensor
    shapes: list
    source: torch.Tensor | None = None
    tile: torch.Tensor | None = None
    cropped: bool = False
    media: str = "image"
    frame: torch.Tensor | None = None

    @property
    def tiles(self) -> torch.Tensor:
        """Per token, the tile (tower pass) it comes from: ``tile`` where set, else the grid id."""
        return self.tile if self.tile is not None else self.grid

    @property
    def frames(self) -> torch.Tensor:
        """Per token, its temporal slice: ``frame`` where set, else 0 (a still image is one frame)."""
        return self.frame if self.frame is not None else torch.zeros_like(self.grid)

    def scoped(self, scope: str) -> "ImageLayout":
        """This layout with the parts a ``scope="frame"`` budget is shared over as its tiles."""
        if scope != "frame":
            return self
        frames = self.frames.clone()
        frames[self.newline] = -1
        return dataclasses.replace(self, tile=frames)

    def cells(self) -> torch.Tensor:
        """Per token, its cell: a clip's tokens at one (row, column) of its frames share one across frames;
        every other token (a still image's, a newline, a token outside the grids) has its own.  Values lie in
        ``[0, rows x columns + n)``."""
        width = int(self.col.max()) + 1 if self.n else 1
        span = (int(self.row.max()) + 1) * width if self.n else 0
        own = span + torch.arange(self.n)
        if self.frame is None or self.media != "video":
            return own
        shared = (self.frame >= 0) & (self.grid >= 0) & ~self.newline
        return torch.where(shared, self.row * width + self.col, own)

    @property
    def n(self) -> int:
        return self.grid.numel()

    @property
    def n_content(self) -> int:
        return int((~self.newline).sum())

    @classmethod
    def from_grids(cls, shapes, lead: int = 0) -> "ImageLayout":
        """Layout of ``lead`` grid-less tokens followed by each (h, w) grid in raster order."""
        grid, row, col = [torch.full((lead,), -1)], [torch.full((lead,), -1)], [torch.full((lead,), -1)]
        for g, (h, w) in enumerate(shapes):
            grid.append(torch.full((h * w,), g))
            row.append(torch.arange(h).repeat_interleave(w))
            col.append(torch.arange(w).repeat(h))
        grid, row, col = torch.cat(grid), torch.cat(row), torch.cat(col)
        return cls(grid, row, col, torch.zeros_like(grid, dtype=torch.bool), [tuple(s) for s in shapes])

    @classmethod
    def flat(cls, n: int) -> "ImageLayout":
        """Layout of ``n`` tokens with no known geometry (a 1 x n grid)."""
        return cls.from_grids([(1, n)])
