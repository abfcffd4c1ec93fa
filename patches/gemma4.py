"""Gemma 4 (``Gemma4ForConditionalGeneration``): a tower at the image's own aspect ratio, average-pooled k x k
into a grid of tokens, and a language model with Gemma 3's masks and two things of its own.

* **The tower.**  An image is a sequence of patches, each with its (x, y), padded with (-1, -1) to the
  batch's longest; the pooler averages each k x k block of the grid into one token, in raster order of the
  pooled grid (``_avg_pool_by_positions``).  The layout is read off each image's patch positions (so any
  aspect ratio and any padding are taken as the model takes them).  No [CLS]: [CLS]-attention methods read
  the attention each patch *receives* in the tower's last layer, from its normed queries and keys with the
  layer's 2-D rotary embedding, padding patches left out.
* **Masks.**  As Gemma 3 (``vtprune.patches.gemma3``): the masks ``Gemma4Model`` built over the whole prompt are
  built again over the kept tokens with the model's own ``create_masks_for_generate`` (image blocks attend both
  ways on the sliding-window layers where the config says so; a sliding window counts kept tokens).
* **Per-layer inputs** (the smaller models): every decoder layer adds a per-token embedding of its own
  (``per_layer_inputs`` [B, L, layers, d]); the cut gathers it with the tokens, and an in-LLM exit cuts each
  later layer's slice (``sequence_inputs``).
* **Shared keys and values** (the smaller models): the last ``num_kv_shared_layers`` layers attend with the
  keys and values of the last earlier layer of their type (the "store" layers).  An in-LLM exit must happen at
  or before the first store layer, so that a sharing layer and the layer it reads hold the same tokens
  (``last_exit_layer``).

A clip is its frames pooled as images, one tower row each, its tokens between timestamps.  And where the sequence
is shorter than the prompt, ``Gemma4ForConditionalGeneration`` takes it for one it cut itself and runs its
vocabulary head over every row, whatever ``logits_to_keep`` asks: the adapter hands it the last rows.
"""

from __future__ import annotations

import sys

import torch

from vtprune import tower_scores
from vtprune.families.gemma import GEMMA4
from vtprune.kernels import gather_seq
from vtprune.layout import ImageLayout

from .gemma3 import Gemma3Adapter


def pooled_layout(positions: torch.Tensor, k: int, n: int) -> ImageLayout:
    """The layout of an image's ``n`` tokens from its tower row's patch ``positions`` [P, 2] ((x, y), -1 on
    padding) pooled ``k`` x ``k``: a raster grid whose token j averages the patches of its block
    (``source`` [n, k^2]: their places in the row)."""
    valid = (positions >= 0).all(-1)
    where = valid.nonzero().squeeze(1)
    x, y = positions[where, 0].long(), positions[where, 1].long()
    cols = int(x.max()) // k + 1
    rows = int(y.max()) // k + 1
    if rows * cols != n or where.numel() != n * k * k:
        return ImageLayout.flat(n)
    kernel = x // k + cols * (y // k)
    order = torch.argsort(kernel * where.numel() + torch.arange(where.numel()), stable=True)
    layout = ImageLayout.from_grids([(rows, cols)])
    layout.source = where[order].view(n, k * k)
    return layout


class Gemma4Adapter(Gemma3Adapter):
    facts = GEMMA4
    types_key = "mm_token_type_ids"
    sequence_inputs = (1,)  # a decoder layer's per_layer_input (positional) runs along the sequence

    def __init__(self, model):
        super().__init__(model)
        self._numbered = False  # the running Gemma4Model call numbered positions itself

    def capture(self, args, kwargs, output, medium="image"):
        out = super().capture(args, kwargs, output, medium)
        name = "image_position_ids" if medium == "image" else "video_position_ids"
        positions = kwargs.get(name, args[1] if len(args) > 1 else None)
        out["positions"] = positions.detach().cpu() if positions is not None else None
        if medium == "video":  # a clip's frames are consecutive rows of the tower batch
            frames = kwargs.get("num_frames_per_video", args[2] if len(args) > 2 else None)
            if positions is not None and positions.dim() == 4:  # transformers < 5.19: [clips, frames, patches, 2]
                frames = [positions.shape[1]] * positions.shape[0]
                out["positions"] = out["positions"].flatten(0, 1)
            out["frames"] = [int(f) for f in frames] if frames is not None else [1] * len(out["counts"])
        return out

    def tiles_of(self, i, capture):
        return capture["frames"][i] if capture.get("medium") == "video" else 1

    def layout(self, i, n, capture):
        positions = capture.get("positions")
        k = self.model.config.vision_config.pooling_kernel_size
        if positions is None:
            return ImageLayout.flat(n)
        if capture.get("medium") != "video":
            return pooled_layout(positions[i], k, n) if i < positions.shape[0] else ImageLayout.flat(n)
        first = sum(capture["frames"][:i])
        rows = positions[first:first + capture["frames"][i]]
        per_frame = [pooled_layout(row, k, int((row >= 0).all(-1).sum()) // (k * k)) for row in rows]
        if sum(f.n for f in per_frame) != n or any(f.source is None for f in per_frame):
            return ImageLayout.flat(n)
        layout = ImageLayout.from_grids([shape for f in per_frame for shape in f.shapes])
        layout.frame = layout.grid.clone()
        layout.source = torch.cat([f.source + t * rows.shape[1] for t, f in enumerate(per_frame)])
        return layout

    # ------------------------------------------------------------------ tower
    def _layers(self):
        return self.inner.vision_tower.encoder.layers

    def tower_depth(self):
        return len(self._layers())

    def feature_layer(self):
        return self.tower_depth() - 1  # the pooler reads the last layer's output

    def hook_tower(self, layer, sink, kind="received"):
        """The ``vtprune.tower_scores`` formula ``kind`` on the layer's queries and keys (after their norms,
        with the layer's 2-D rotary embedding), each image's real patches attending among themselves; padding
        patches score 0."""
        self.refuse_cls(kind)
        attn = self._layers()[layer].self_attn
        rope = sys.modules[type(attn).__module__].apply_multidimensional_rope
        box = {}

        def on_attn(module, args, kwargs):
            box.update(pe=kwargs["position_embeddings"], positions=kwargs["position_ids"])

        def on_keys(module, args, k):
            q = box.pop("q")
            cos, sin = box["pe"]
            positions = box["positions"]
            q, k = rope(q, cos, sin, positions), rope(k, cos, sin, positions)  # [B, P, heads, d]
            if k.shape[2] != q.shape[2]:
                k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
            valid = (positions != -1).all(-1)
            scores = torch.zeros(q.shape[:2], dtype=torch.float32, device=q.device)
            for b in range(q.shape[0]):
                where = valid[b].nonzero().squeeze(1)
                scores[b, where] = tower_scores.received(q[b, where], k[b, where], [(0, where.numel())], attn.scaling)
            sink(scores)

        return [attn.register_forward_pre_hook(on_attn, with_kwargs=True),
                attn.q_norm.register_forward_hook(lambda module, args, out: box.update(q=out)),
                attn.k_norm.register_forward_hook(on_keys)]

    # ------------------------------------------------------------------ language model
    def install(self, installed):
        super().install(installed)
        installed.add(self.language_model.register_forward_hook(self._last_rows, with_kwargs=True))

    @staticmethod
    def _last_rows(module, args, kwargs, output):
        """The language model's output cut to the ``logits_to_keep`` last rows: ``Gemma4ForConditionalGeneration``
        cuts it only when it is as long as the prompt (else it takes it for cut already), and a pruned one is not."""
        keep = kwargs.get("logits_to_keep", 0)
        hidden = getattr(output, "last_hidden_state", None)
        if isinstance(keep, int) and keep > 0 and hidden is not None and hidden.shape[1] > keep:
            output.last_hidden_state = hidden[:, -keep:]
        return output

    def _on_inner(self, module, args, kwargs):
        super()._on_inner(module, args, kwargs)
        self._numbered = kwargs.get("position_ids") is None

    def lm_inputs(self, kwargs):
        """As Gemma 3; and where the caller gave no positions, ``Gemma4Model`` numbered them from the cache's length,
        which a cut shortened: the language model gets none, and the cut numbers them from the sequence's."""
        super().lm_inputs(kwargs)
        if self._numbered and self._inner_call is not None:
            kwargs["position_ids"] = None

    def cut_extra(self, kwargs, index, real):
        per_layer = kwargs.get("per_layer_inputs")
        if per_layer is not None:
            kwargs["per_layer_inputs"] = gather_seq(per_layer, index)

    def last_exit_layer(self):
        attention = [layer.self_attn for layer in self.language_model.layers]
        reuse = [i for i, attn in enumerate(attention) if getattr(attn, "is_kv_shared_layer", False)]
        if not reuse:  # (later releases mark store layers whether or not any layer reuses them)
            return None
        store = min(i for i, attn in enumerate(attention) if getattr(attn, "store_full_length_kv", False))
        return store, (f"its layers from {reuse[0]} on reuse the keys and values of layers from {store} on, "
                       "which must hold the same tokens")
