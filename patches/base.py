"""What every family adapter provides.  Adapters know the model family, never the method."""

from __future__ import annotations

from typing import ClassVar

import torch

from vtprune.layout import ImageLayout


class Adapter:
    """Where a family's visual tokens are and how they map onto space.

    The core (``vtprune.session``) wraps ``model.model.get_image_features`` (to learn how many
    tokens each image has, whenever the tower runs: inside ``forward`` or, on transformers >= 5.23,
    in ``generate`` before it) and ``model.model.get_placeholder_mask`` (to learn where they are),
    and cuts the language model's inputs in a forward pre-hook.  An adapter turns those captures
    into per-image positions and layouts and fixes family-specific inputs of the cut.
    """

    family: ClassVar[str] = ""
    classes: ClassVar[tuple] = ()

    def __init__(self, model):
        self.model = model
        self.inner = model.model

    @property
    def language_model(self):
        return self.inner.language_model

    # ------------------------------------------------------------------ captures
    def capture(self, args, kwargs, output) -> dict:
        """Record what ``get_image_features(*args, **kwargs) -> output`` says about the images."""
        feats = output.pooler_output if hasattr(output, "pooler_output") else output
        if isinstance(feats, torch.Tensor) and feats.dim() == 3:
            feats = list(feats.unbind(0))
        elif isinstance(feats, torch.Tensor):
            feats = [feats]
        return {"features": list(feats), "counts": [int(f.shape[0]) for f in feats]}

    # ------------------------------------------------------------------ images
    def images(self, image_mask: torch.Tensor, capture: dict) -> list:
        """``[(row, positions, layout, features)]`` for every image, in the order the model scatters them."""
        where = image_mask.nonzero()
        counts = capture["counts"]
        total, batch = where.shape[0], image_mask.shape[0]
        if sum(counts) and sum(counts) != total and total % sum(counts) == 0 and batch % (total // sum(counts)) == 0:
            # generate() expanded the batch (beam search, num_return_sequences) after encoding the
            # images: rows are repeat-interleaved copies, each copy holds the same images.
            r = total // sum(counts)
            base = self.images(image_mask[::r], capture)
            copies = [(row * r + j, pos, layout, feat) for j in range(r) for row, pos, layout, feat in base]
            return sorted(copies, key=lambda img: img[0])
        if sum(counts) != total:
            raise RuntimeError(f"vtprune: {where.shape[0]} image tokens in the prompt but the vision tower "
                               f"produced {sum(counts)} features; call the model once per prompt")
        out, start = [], 0
        for i, n in enumerate(counts):
            seg = where[start:start + n]
            start += n
            row = int(seg[0, 0])
            if not bool((seg[:, 0] == row).all()):
                raise RuntimeError("vtprune: an image's tokens span two samples of the batch")
            out.append((row, seg[:, 1], self.layout(i, n, capture), capture["features"][i]))
        return out

    def layout(self, i: int, n: int, capture: dict) -> ImageLayout:
        """Geometry of image ``i`` (``n`` tokens)."""
        return ImageLayout.flat(n)

    # ------------------------------------------------------------------ cut
    def cut_extra(self, kwargs: dict, index: torch.Tensor, real: torch.Tensor):
        """Cut family-specific language-model kwargs (``index``/``real`` as in ``plan_cut``)."""

    def after_cut(self, session_state):
        """Fix family state after tokens were dropped (``session_state.dropped`` so far)."""

    def reset(self):
        """Undo what ``after_cut`` changed (called by ``unwrap``)."""

    def describe(self) -> dict:
        """Facts for ``vtprune info`` and error messages."""
        return {"family": self.family}
