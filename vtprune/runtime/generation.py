"""``generate`` on a pruned cache: the three places where it counts tokens itself.

Instance attributes only (removed by ``unwrap``), each keeping the original's signature:

* ``create_masks_for_generate`` builds a static cache's 4-D masks from the 2-D mask, which counts
  every token of the prompt: it is given the mask of what the pruned cache holds.
* ``prepare_inputs_for_generation``: continuing from a pruned cache (the whole conversation passed
  again) ``generate`` counts what to feed from the cache's length, which the cut made shorter: it
  feeds what follows the tokens the cache stands for.
* ``_valid_auto_compile_criteria``: a pruning wrap is not compiled automatically (the number of
  kept tokens decides the shapes).
"""

from __future__ import annotations

import functools

import torch

from ..compat import CACHE_KEYS, cache_of
from .hooks import Installed


class Generation:
    def __init__(self, model, sequences, precut, inert):
        self.model = model
        self.sequences = sequences
        self.precut = precut  # where the masks built on the pruned cache are announced
        self.inert = inert  # () -> bool
        self.installed = Installed()

    def install(self) -> list:
        from transformers.masking_utils import create_masks_for_generate

        if hasattr(self.model, "_valid_auto_compile_criteria"):
            self.installed.wrap(self.model, "_valid_auto_compile_criteria", self._no_auto_compile)
        self.installed.wrap(self.model, "create_masks_for_generate", self._masks, default=create_masks_for_generate)
        self.installed.wrap(self.model, "prepare_inputs_for_generation", self._continue)
        return []

    def remove(self):
        self.installed.remove()

    def _no_auto_compile(self, original):
        @functools.wraps(original)
        def criteria(*args, **kwargs):
            return original(*args, **kwargs) if self.inert() else False

        return criteria

    def _masks(self, original):
        @functools.wraps(original)
        def create_masks(*args, **kwargs):
            mask, past, embeds = kwargs.get("attention_mask"), cache_of(kwargs), kwargs.get("inputs_embeds")
            state = self.sequences.get(past) if past is not None else None
            compacted = state is not None and state.mask is not None and embeds is not None and (
                mask is None or isinstance(mask, torch.Tensor) and mask.dim() == 2
                and mask.shape[1] == state.orig_len + embeds.shape[1])
            if compacted:  # (no mask: the cut's padding slots still need masking)
                new = mask[:, state.orig_len:] if mask is not None else \
                    torch.ones(embeds.shape[:2], dtype=state.mask.dtype, device=state.mask.device)
                kwargs["attention_mask"] = torch.cat([state.mask.to(new.device, new.dtype), new], 1)
            key = next((k for k in CACHE_KEYS if kwargs.get(k) is not None), None)  # its name moved in 5.25
            if state is not None and embeds is not None and key is not None:
                kwargs[key] = self.precut.adapter.mask_cache(past, state.cache_len, embeds.shape[1])
            out = original(*args, **kwargs)
            made = tuple(out.values()) if isinstance(out, dict) else (out,)
            self.precut.made_masks = tuple(m for m in made if m is not None) if compacted else ()
            return out

        return create_masks

    def _continue(self, original):
        @functools.wraps(original)  # generate reads its signature
        def prepare(input_ids, *args, **kwargs):
            # generate passes next_sequence_length by keyword (a family's override may take other
            # arguments in its place: Gemma 3's use_cache)
            step = kwargs.get("next_sequence_length")
            past = cache_of(kwargs)
            state = self.sequences.get(past) if past is not None and step else None
            if state is not None and state.dropped > 0:
                embeds = kwargs.get("inputs_embeds")
                total = embeds.shape[1] if embeds is not None and kwargs.get("is_first_iteration") else input_ids.shape[1]
                if step == total - state.cache_len and total > state.orig_len:
                    kwargs["next_sequence_length"] = total - state.orig_len
            return original(input_ids, *args, **kwargs)

        return prepare
