"""InternVL (``InternVLForConditionalGeneration``): tiles of ``image_seq_length`` tokens after pixel shuffle.

The model is not told which tiles belong to which image; the prompt wraps each image's tiles in
``<img> ... </img>``, so an image is a contiguous run of image tokens.  Each tile is its own square
grid (the 2x2 pixel shuffle already merged the tower's patches).
"""

from __future__ import annotations

import math

import torch

from vtprune.layout import ImageLayout

from .base import Adapter


class InternVLAdapter(Adapter):
    family = "internvl"
    classes = ("InternVLForConditionalGeneration",)

    def images(self, image_mask, capture):
        per_tile = self.model.config.image_seq_length
        side = math.isqrt(per_tile)
        feats = torch.cat(capture["features"], 0) if capture else None
        out, used = [], 0
        for row in range(image_mask.shape[0]):
            pos = image_mask[row].nonzero().squeeze(1)
            if pos.numel() == 0:
                continue
            breaks = (pos[1:] != pos[:-1] + 1).nonzero().squeeze(1) + 1
            for run in torch.tensor_split(pos, breaks.tolist()):
                n = run.numel()
                if n % per_tile:
                    raise RuntimeError(f"vtprune: an InternVL image run of {n} tokens is not a whole number of "
                                       f"{per_tile}-token tiles")
                grids = [(side, side)] * (n // per_tile) if side * side == per_tile else [(1, per_tile)] * (n // per_tile)
                flat = feats[used:used + n] if feats is not None else None
                used += n
                out.append((row, run, ImageLayout.from_grids(grids), flat))
        return out
