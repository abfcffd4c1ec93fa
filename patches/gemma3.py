"""Gemma 3 (``Gemma3ForConditionalGeneration``): a SigLIP grid per image, average-pooled k x k into
``mm_tokens_per_image`` tokens.

Two things of the language model's attention depend on where tokens are:

* an image's tokens attend to each other both ways (``token_type_ids`` mark them; a block is a run of
  image tokens);
* its sliding-window layers attend to the last ``sliding_window`` tokens.

``Gemma3Model`` builds both into per-layer-type masks before its language model runs, over the whole
prompt.  On a cut sequence the adapter builds them again, over the tokens the language model keeps, with
the model's own ``create_masks_for_generate``: an image's kept tokens remain one block, and **a sliding
window counts kept tokens** — what the KV cache holds (a sliding layer's cache keeps its last
``sliding_window`` entries), what vLLM's sliding-window attention counts, and what the stock model computes
when it is fed only the kept tokens at their original positions (the reference of the tests).  While the
prompt is shorter than the window this equals the stock model with the dropped tokens masked out.

No [CLS]: [CLS]-attention methods read the attention each patch *receives* in the tower's last layer (the
projector reads its output), summed over the k x k patches a token pools.
"""

from __future__ import annotations

import inspect

import torch

from vtprune.compat import cache_of
from vtprune.families.gemma import GEMMA3
from vtprune.layout import ImageLayout

from .base import Adapter
from .llava import clip_sites


def pooled_sources(patches: int, side: int) -> torch.Tensor:
    """``[side^2, k^2]``: the tower patches (raster positions in a ``patches`` x ``patches`` grid) that each
    token of a ``side`` x ``side`` average-pooled grid averages (k = patches / side)."""
    k = patches // side
    rows = torch.arange(side).repeat_interleave(side)[:, None] * k + torch.arange(k).repeat_interleave(k)
    cols = torch.arange(side).repeat(side)[:, None] * k + torch.arange(k).repeat(k)
    return rows * patches + cols


class Gemma3Adapter(Adapter):
    facts = GEMMA3
    types_key = "token_type_ids"  # the model's argument that marks image tokens (Gemma 4: mm_token_type_ids)

    def __init__(self, model):
        super().__init__(model)
        self._inner_call = None  # the 2-D mask and token_type_ids of the running Gemma3Model call
        self._built = None  # the masks Gemma3Model built for the language-model call now running
        self._cache_key = None  # the name create_masks_for_generate gives its cache argument

    # ------------------------------------------------------------------ layout and tower
    def layout(self, i, n, capture):
        config = self.model.config
        side = int(config.mm_tokens_per_image ** 0.5)
        patches = config.vision_config.image_size // config.vision_config.patch_size
        if n != side * side or patches % side:
            return ImageLayout.flat(n)
        layout = ImageLayout.from_grids([(side, side)])
        layout.source = pooled_sources(patches, side)
        return layout

    def cls_sites(self):
        return clip_sites(self.inner.vision_tower)

    def feature_layer(self):
        return self.tower_depth() - 1  # the projector pools the last layer's (post-normed) output

    # ------------------------------------------------------------------ masks
    def install(self, installed):
        installed.add(self.inner.register_forward_pre_hook(self._on_inner, with_kwargs=True),
                      self.inner.register_forward_hook(lambda *a: setattr(self, "_inner_call", None)))

    def _on_inner(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        self._inner_call = None if isinstance(mask, dict) or (mask is not None and mask.dim() != 2) else \
            (mask, kwargs.get(self.types_key))

    def lm_inputs(self, kwargs):
        """The language model gets the 2-D mask ``Gemma3Model`` was given (the cut reads a padding mask) in
        place of the masks it built; ``lm_masks`` puts them back or builds them anew."""
        self._built = None
        if self._inner_call is not None and isinstance(kwargs.get("attention_mask"), dict):
            self._built = kwargs["attention_mask"]
            kwargs["attention_mask"] = self._inner_call[0]

    def lm_masks(self, kwargs, call):
        """Gemma3Model's masks back where nothing changed; else built anew over the tokens the call keeps (their
        token types, the cache as long as the sequence: ``mask_cache``)."""
        built, self._built = self._built, None
        if built is None:
            return
        cache = cache_of(kwargs)
        q = kwargs["inputs_embeds"].shape[1]
        fits = call.past + q <= self.window()
        if not call.changed and not (fits and _uneven(cache)):
            kwargs["attention_mask"] = built
            return
        types = self._inner_call[1]
        if types is not None and call.cut is not None:  # the kept tokens' types; padding slots of the cut are text
            index, real = call.cut
            types = types.to(index.device).gather(1, index) * real
        cache = self.mask_cache(cache, call.past, q)
        build = type(self.model).create_masks_for_generate
        if self._cache_key is None:  # 5.25 renamed the argument
            self._cache_key = "cache" if "cache" in inspect.signature(build).parameters else "past_key_values"
        cache_key = self._cache_key
        kwargs["attention_mask"] = build(config=self.model.config, inputs_embeds=kwargs["inputs_embeds"],
                                         attention_mask=kwargs["attention_mask"], position_ids=kwargs.get("position_ids"),
                                         **{self.types_key: types, cache_key: cache})

    def mask_cache(self, cache, past, q):
        return _Sequence(cache, past) if cache is not None and past + q <= self.window() else cache

    def window(self) -> int:
        """The sliding window of the language model's sliding layers (tokens)."""
        text = self.model.config.get_text_config()
        window = getattr(text, "sliding_window", None)
        return window if window and "sliding_attention" in (text.layer_types or ()) else 1 << 62

    def exit_limit(self):
        return self.window()

    def reset(self):
        self._inner_call = self._built = None


def _uneven(cache) -> bool:
    """Whether the layers of a cache hold different numbers of tokens: an in-LLM exit cut the later ones."""
    layers = getattr(cache, "layers", None)
    if not layers:
        return False
    # (Gemma 4's shared layers hold no cache of their own)
    return len({layer.get_seq_length() for layer in layers if hasattr(layer, "get_seq_length")}) > 1


class _Sequence:
    """A cache as the mask builders see it: every layer holding the ``past`` tokens of the sequence.  After an
    in-LLM exit the later layers hold fewer; transformers sizes a layer type's mask on the first layer of that
    type, and the exit cuts every layer's mask from the sequence's (``vtprune.runtime.exit_inputs``)."""

    def __init__(self, cache, past: int):
        self._cache, self._past = cache, past

    def __getattr__(self, name):
        return getattr(self._cache, name)

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0):
        if getattr(self._cache, "is_compileable", False):  # a static cache's masks span its slots
            return self._cache.get_mask_sizes(query_length, layer_idx)
        return self._past + query_length, 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self._past

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._past
