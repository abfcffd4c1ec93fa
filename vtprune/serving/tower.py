"""The vision-tower side of a served [CLS] method (FasterVLM, VTC-CLS, VisionZip), free of vLLM.

An engine binding feeds ``on_qkv`` with each hooked tower layer's queries and keys (a batch of
images, ``[images, T, heads x d]``), and, for merging methods, lets ``on_projector`` rewrite the
per-patch features before the projector.  ``image(i, n)`` (one tile per image: LLaVA) or
``tiles(start, count, layout)`` (LLaVA-NeXT's base and crops, InternVL's tiles) then hands an image's scores, mapped onto
its LLM tokens, to ``vtprune.serving.select.select`` — the same scores, merge and selection as the HF
wrap (``vtprune.tower_scores``, ``vtprune.runtime.capture.merge_tiles``, ``vtprune.patches.base.scores_on_tokens``).
"""

from __future__ import annotations

import torch

from vtprune.patches.base import scores_on_tokens

from ..runtime.capture import merge_tiles
from ..tower_scores import SCORES, head_mean, leading_sources, per_tile


def hook_qkv(tap, config, layers):
    """Feed ``tap`` from the fused q/k/v projection (``self_attn.qkv_proj``) of the vLLM tower ``layers`` (CLIP's or
    SigLIP's encoder layers) the method reads."""
    for layer in tap.layers:
        if layer >= len(layers):
            raise ValueError(f"{config.name} reads vision-tower layer {layer}, past the {len(layers)} layers vLLM "
                             "builds for the layer the projector reads")
        attn = layers[layer].self_attn
        if attn.num_heads_per_partition != attn.num_heads:
            raise ValueError(f"{config.name} averages the tower's attention over all heads; vLLM splits them over "
                             "tensor-parallel ranks here: serve it with tensor_parallel_size=1 or "
                             "mm_encoder_tp_mode='data'")

        def on_qkv(module, args, out, layer=layer, heads=attn.num_heads, scale=attn.scale):
            q, k, _ = out[0].chunk(3, dim=-1)
            tap.on_qkv(layer, q, k, heads, scale)

        attn.qkv_proj.register_forward_hook(on_qkv)


def tap_received(config, layers, n_layers: int, feature_layer: int, default_score: str):
    """A ``TowerTap`` on a tower without [CLS] (SigLIP's: Gemma 3, LLaVA-OneVision), fed by ``hook_qkv``: the attention
    each patch receives, in ``layers`` (vLLM's) of a tower of ``n_layers`` whose projector reads ``feature_layer``."""
    tap = TowerTap(config, n_layers, feature_layer, default_score=default_score)
    if tap.kind != "received":
        raise ValueError(f"{config.name}: the SigLIP tower has no [CLS] token; it reads the attention each patch "
                         "receives instead (source='received', the default here)")
    hook_qkv(tap, config, layers)
    return tap


class TowerTap:
    def __init__(self, config, n_layers: int, feature_layer: int, default_score: str = "cls"):
        self.config = config
        self.kind = config.tower_score or default_score
        layers = config.tower_layers(n_layers, feature_layer)
        for layer in layers:
            if not -n_layers <= layer < n_layers:
                raise ValueError(f"vision-tower layer {layer} is out of range: the tower has {n_layers} layers")
        self.layers = sorted({layer % n_layers for layer in layers})
        self.sources = None  # [n, w]: the tower tokens each projector token holds (None: one each, after [CLS])
        self.clear()

    def clear(self):
        self.scores, self.keys, self.selected, self.sizes = {}, None, None, None

    def on_qkv(self, layer: int, q, k, heads: int, scale: float):
        """Tower layer ``layer`` ran on a batch of images: its queries and keys [images, T, heads x d]."""
        self.scores[layer] = per_tile(q, k, heads, scale, self.kind)
        if self.config.merges and layer == self.layers[-1]:
            self.keys = head_mean(k, heads)

    def on_segments(self, layer: int, q, k, bounds, scale: float):
        """Tower layer ``layer`` ran on images packed in one sequence (Qwen): its queries and keys [S, heads, d]
        as its attention reads them (rotary applied), each segment ``bounds[i] .. bounds[i + 1]`` (an image, or
        a window) attending within itself.  A second call before ``clear`` continues the sequence."""
        scores = SCORES[self.kind](q, k, list(zip(bounds[:-1], bounds[1:])), scale)[None]
        old = self.scores.get(layer)
        self.scores[layer] = scores if old is None else torch.cat([old, scores], 1)

    def on_projector(self, features):
        """Merged per-patch features [images, n, C] (merging methods): each projector token holds the tower
        tokens ``sources`` names (by default one each, after ``T - n`` leading tower tokens, [CLS]); the
        features as they are for the others."""
        if not self.config.merges:
            return features
        cls = self.scores.get(self.layers[-1])
        if cls is None or self.keys is None or cls.shape[0] != features.shape[0]:
            raise RuntimeError("vtprune: the projector input does not line up with the tower run it follows")
        sources = self.sources
        if sources is None:
            sources = leading_sources(cls.shape[1], features.shape[1])
        merged, self.selected, self.sizes = merge_tiles(self.config, cls, self.keys, features, sources.to(cls.device))
        return merged

    def _ran(self):
        if set(self.scores) != set(self.layers):
            raise ValueError(f"vtprune {self.config.name} reads the vision tower's attention, which did not run for "
                             "these images (precomputed image embeddings cannot be pruned by [CLS] methods)")

    def image(self, i: int, n: int) -> dict:
        """Image ``i``'s tower scores on its ``n`` LLM tokens (its last ``n`` tower tokens)."""
        self._ran()
        out = {"cls": {layer: s[i, -n:].float().cpu() for layer, s in self.scores.items()}}
        if self.selected is not None:
            out["selected"], out["sizes"] = self.selected[i, -n:].cpu(), self.sizes[i, -n:].cpu()
        return out

    def tiles(self, start: int, count: int, layout) -> dict:
        """The tower scores of an image encoded as tiles ``start .. start + count - 1`` of the tower batch,
        on its LLM tokens by ``layout.source`` (LLaVA-NeXT: base and crops packed, newlines 0)."""
        self._ran()
        out = {"cls": {layer: scores_on_tokens(s[start:start + count].float().cpu(), layout)
                       for layer, s in self.scores.items()}}
        if self.selected is not None:
            out["selected"] = scores_on_tokens(self.selected[start:start + count].float().cpu(), layout)
            out["sizes"] = scores_on_tokens(self.sizes[start:start + count].float().cpu(), layout)
        return out
