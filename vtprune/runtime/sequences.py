"""The bookkeeping of every sequence a wrapped model runs: one ``CacheState`` per KV cache.

A cut makes the cache shorter than the sequence it stands for.  Later calls on that cache pass
masks, positions and token counts in one coordinate system or the other; the state maps between
them: ``orig_len`` tokens of the sequence are held by ``cache_len`` cache entries, entry ``j``
holding original position ``slots[:, j]`` (``live`` False on the padding slots of a cut).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch


@dataclass
class CacheState:
    """Bookkeeping of one sequence of calls that share a KV cache."""

    orig_len: int = 0
    cache_len: int = 0
    dropped: int = 0
    mask: torch.Tensor | None = None  # [B, cache_len]: the compacted 2-D mask of the cache (after a cut)
    slots: torch.Tensor | None = None  # [B, cache_len]: the original position each cache entry holds
    live: torch.Tensor | None = None  # [B, cache_len]: False on the padding slots of a cut
    tail: int = 0  # entries since the last cut (one per token): what a crop may take back
    bias: torch.Tensor | None = None  # [B, cache_len]: log(size) of each entry's key (vtprune.runtime.size_bias), 0 for most
    shift: torch.Tensor | None = None  # [B]: real tokens cut so far, what positions="renumber" takes off

    def crop(self, length: int):
        """The cache was cut back to ``length`` entries, dropping only uncut tokens (its tail)."""
        gone = self.cache_len - length
        self.orig_len -= gone
        self.cache_len = length
        self.tail -= gone
        if self.mask is not None:
            self.mask = self.mask[:, :length]
        if self.slots is not None:
            self.slots, self.live = self.slots[:, :length], self.live[:, :length]
        if self.bias is not None:
            self.bias = self.bias[:, :length]

    def extend(self, batch: int, q: int, device, index=None, real=None, bias=None):
        """Account for a call of ``q`` new tokens of which the cache keeps ``index`` [B, L'] (all when None),
        their keys biased by ``bias`` [B, L'] (None: 0).

        ``slots``/``live`` are tracked from the first cut on (before it, entry j holds position j)."""
        cut = index is not None
        if bias is not None or self.bias is not None:
            width = index.shape[1] if cut else q
            old = self.bias if self.bias is not None else torch.zeros(batch, self.cache_len, device=device)
            new = bias if bias is not None else torch.zeros(batch, width, device=device)
            self.bias = torch.cat([old.to(device).expand(batch, -1), new.to(device, old.dtype)], 1)
        if cut and self.slots is None:
            self.slots = torch.arange(self.cache_len, device=device).expand(batch, -1)
            self.live = torch.ones(batch, self.cache_len, dtype=torch.bool, device=device)
        if self.slots is not None:
            if index is None:
                index = torch.arange(q, device=device).expand(batch, q)
                real = torch.ones(batch, q, dtype=torch.bool, device=device)
            self.slots = torch.cat([self.slots.to(device).expand(batch, -1), index.to(device) + self.orig_len], 1)
            self.live = torch.cat([self.live.to(device).expand(batch, -1), real.to(device)], 1)
        self.orig_len += q
        self.cache_len += index.shape[1] if cut else q
        if cut:  # the call's last positions that every row kept, 1:1 (text after the images)
            width = index.shape[1]
            same = index.to(device) == torch.arange(q - width, q, device=device)
            self.tail = int(same.flip(1).long().cumprod(1).sum(1).min())
        else:
            self.tail += q
        self.dropped = self.orig_len - self.cache_len


class Sequences:
    """``CacheState`` per cache object (weakly held), so that calls on several caches may interleave."""

    def __init__(self):
        self.current = None  # the state of the call running now
        self._states = weakref.WeakKeyDictionary()

    def get(self, cache):
        try:
            return self._states.get(cache) if cache is not None else None
        except TypeError:  # a cache that cannot be weakly referenced: only the latest sequence is known
            return self.current

    def set(self, cache, state):
        if cache is not None:
            try:
                self._states[cache] = state
            except TypeError:
                pass

    def state_for(self, past) -> CacheState:
        """The state of the sequence whose cache is ``past`` (a new one for an empty or unknown cache)."""
        past_len = int(past.get_seq_length()) if past is not None else 0
        state = self.get(past)
        if state is not None and 0 < past_len < state.cache_len and past_len >= state.cache_len - state.tail:
            state.crop(past_len)  # the cache was cropped (assisted decoding drops rejected candidates)
        if past_len == 0 or state is None or state.cache_len != past_len:
            state = CacheState(orig_len=past_len, cache_len=past_len)
            self.set(past, state)
        self.current = state
        return state
