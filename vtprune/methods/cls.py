"""[CLS]-attention selection before the LLM: FasterVLM, VTC-CLS, VisionZip."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import NotApplicable, OutOfRange
from ..scoring import total_budget
from .base import Selector, register, tile_budgets

def _check_source(source):
    if source not in (None, "cls", "received"):
        raise ValueError(f"source must be 'cls' (the [CLS] row) or 'received' (attention each token receives, "
                         f"the score Qwen towers use), got {source!r}")


SOURCE = "'cls' or 'received'; None: 'cls' where the tower has a [CLS] token, 'received' where it has none (Qwen)"


@register("fastervlm")
@dataclass
class FasterVLM(Selector):
    """Keep the tokens the vision encoder's [CLS] attends to most (FasterVLM, arXiv 2412.01818).

    Score: the post-softmax attention of the [CLS] query to the patch keys inside the tower layer
    whose output the projector consumes (``vision_feature_layer`` -2 → the penultimate layer),
    averaged over heads; the top ``keep`` per image are kept in their original order.
    ``vision_layer`` (0-based, negative counts from the end) overrides the layer.
    ``source="received"`` scores each token by the attention it receives from all tokens instead
    (the [CLS]-free score of the Qwen towers, the default there; available on every tower for
    comparison); ``source="cls"`` on a tower without [CLS] is not applicable.  Computed from the layer's q/k
    while the tower runs on SDPA; no eager attention.
    """

    paper: ClassVar[str] = "FasterVLM: Zhang et al. 2024, arXiv 2412.01818"
    ranges: ClassVar[dict] = {"vision_layer": "int tower layer, negative from the end; None: the layer the "
                                              "projector reads", "source": SOURCE}
    needs_cls: ClassVar[bool] = True
    vision_layer: int | None = None
    source: str | None = None

    def validate(self):
        super().validate()
        _check_source(self.source)

    def tower_layers(self, n_layers, feature_layer):
        return [feature_layer if self.vision_layer is None else self.vision_layer]

    def score(self, ctx):
        (layer,) = ctx.cls_attention
        return ctx.cls_attention[layer]


@register("vtc_cls")
@dataclass
class VTCCLS(Selector):
    """[CLS] attention of several tower layers ensembled (VTC-CLS, arXiv 2412.05819).

    Score: for every tower layer from ``start_layer`` up to and including the layer the projector
    reads, the [CLS] row's post-softmax attention to the patches averaged over heads, summed over
    the layers unweighted (as the VTC-CLS code does).  ``start_layer`` is 0-based; negative counts
    from the end of the tower (default -8: layer 16 of CLIP-L's 24, the VTC-CLS script default; on
    a tower of fewer than 8 layers it starts at layer 0).
    """

    paper: ClassVar[str] = "VTC-CLS: Wang et al. 2024, arXiv 2412.05819"
    ranges: ClassVar[dict] = {"start_layer": "int tower layer, negative from the end, up to the projector's layer",
                              "source": SOURCE}
    needs_cls: ClassVar[bool] = True
    start_layer: int = -8
    source: str | None = None

    def validate(self):
        super().validate()
        _check_source(self.source)

    def tower_layers(self, n_layers, feature_layer):
        start = max(0, n_layers + self.start_layer) if self.start_layer < 0 else self.start_layer
        if not 0 <= start <= feature_layer:
            raise OutOfRange(f"vtc_cls start_layer={self.start_layer} must lie before layer {feature_layer} "
                             f"(the projector reads layer {feature_layer} of {n_layers})")
        return list(range(start, feature_layer + 1))

    def score(self, ctx):
        per_layer = list(ctx.cls_attention.values())
        return [sum(layer[i] for layer in per_layer) for i in range(len(ctx.layouts))]


@register("visionzip")
@dataclass
class VisionZip(Selector):
    """Dominant tokens by [CLS] attention plus contextual tokens that merge the rest (VisionZip, arXiv 2412.04467).

    Per tile (a LLaVA image, each LLaVA-NeXT crop), of its ``keep`` tokens a share
    ``contextual_share`` are contextual, the rest dominant.  Dominant: the patches with the highest
    [CLS] attention in the layer the projector reads.  Contextual: among the remaining patches,
    targets taken at a uniform index stride; every other remaining patch joins the target whose key
    (that layer's keys averaged over heads, L2-normalised) is most similar; a contextual token is
    its target's feature plus the mean of the features that joined it, as the VisionZip code does.
    Merging happens on the tower features before the projector.  Differences from VisionZip: the
    [CLS] token itself is not fed to the LLM (the stock HF models drop it), and a contextual token
    sits at its target's position instead of after the dominant tokens, so positions stay original.
    An int ``keep`` counts tokens per tile.  With ``size_bias=True`` a contextual token weighs as many
    tokens as it merged (its target included) in the LLM's attention.
    """

    paper: ClassVar[str] = "VisionZip: Yang et al., CVPR 2025, arXiv 2412.04467"
    ranges: ClassVar[dict] = {"contextual_share": "float in [0, 1): the share of the budget merged into contextual "
                                                  "tokens"}
    needs_cls: ClassVar[bool] = True
    merges: ClassVar[bool] = True
    covers_all: ClassVar[bool] = True
    contextual_share: float = 0.15

    def validate(self):
        super().validate()
        if not 0.0 <= self.contextual_share < 1.0:
            raise ValueError(f"contextual_share must lie in [0, 1), got {self.contextual_share}")

    def tower_layers(self, n_layers, feature_layer):
        return [feature_layer]

    def kept_count(self, layout):  # a share of every tower tile
        if layout.cropped:
            raise NotApplicable("visionzip keeps a share of every tower tile, and some of a tile's tower tokens "
                                "never reach the LLM here (LLaVA-NeXT's unpadding), so the count depends on "
                                "which tokens it kept")
        return total_budget(tile_budgets(self.keep, layout)) + self.kept_newlines(layout)

    def split(self, k: int) -> tuple:
        """(dominant, contextual) token counts for a budget of ``k``."""
        contextual = min(k - 1, max(1, round(k * self.contextual_share))) if self.contextual_share > 0 and k > 1 else 0
        return k - contextual, contextual

    def merge(self, cls, keys, features, k: int):
        """Merge one batch of tiles: ``cls`` [tiles, T] [CLS] attention to the patches, ``keys`` [tiles, T, d],
        ``features`` [tiles, T, C].  Returns the new features, per tile the kept patch indices, and
        sizes [tiles, T] (the patches each kept patch stands for: 1 + those merged into it)."""
        dominant, contextual = self.split(min(k, features.shape[1]))
        out = features.clone()
        kept = []
        sizes = torch.ones(features.shape[:2], device=features.device)
        for t in range(features.shape[0]):
            top = torch.sort(cls[t], descending=True, stable=True).indices[:dominant]
            rest = torch.ones(features.shape[1], dtype=torch.bool, device=features.device)
            rest[top] = False
            rest = rest.nonzero().squeeze(1)
            chosen = [top]
            if contextual and rest.numel():
                step = max(1, rest.numel() // contextual)
                is_target = torch.zeros(rest.numel(), dtype=torch.bool, device=features.device)
                is_target[torch.arange(0, rest.numel(), step, device=features.device)[:contextual]] = True
                targets, others = rest[is_target], rest[~is_target]
                metric = torch.nn.functional.normalize(keys[t].float(), dim=-1)
                assign = (metric[others] @ metric[targets].T).argmax(1)
                sums = torch.zeros(targets.numel(), features.shape[2], device=features.device)
                sums.index_add_(0, assign, features[t, others].float())
                counts = torch.bincount(assign, minlength=targets.numel()).clamp(min=1)[:, None]
                out[t, targets] = (features[t, targets].float() + sums / counts).to(features.dtype)
                sizes[t, targets] += torch.bincount(assign, minlength=targets.numel()).float()
                chosen.append(targets)
            kept.append(torch.sort(torch.cat(chosen)).values)
        return out, kept, sizes

    def score(self, ctx):
        for i, selected in enumerate(ctx.tower_selected):
            ctx.budgets[i] = int((selected > 0).sum())
            if ctx.tower_sizes:
                ctx.sizes[i] = torch.where(selected > 0, ctx.tower_sizes[i], torch.ones_like(selected))
        return ctx.tower_selected
