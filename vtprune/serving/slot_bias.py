"""Summary tokens and ``size_bias`` in vLLM: each kept visual token's ``log(size)`` added to its key's
attention logit for every query, in the chosen decoder layers — as ``vtprune.runtime.size_bias`` does on the HF path.

The bias travels as one more column of an image's kept rows (``select.with_bias``); ``Weighing``, the
first base of every pruned class, reads it off in ``embed_input_ids`` (which vLLM's model runner calls
once per step with the step's tokens in order) before vLLM's own embedding merge.  ``SlotBias`` then
keeps a bias per KV-cache slot: each layer's cache write stores the step's biases at the slots its
tokens go to, so decode steps, later prefill chunks and prefix-cache hits see them too.  After vLLM's
CPU attention kernel has run, the requests whose context holds a biased key are recomputed in torch
from the paged cache with the bias added; a step without one runs the kernel alone.  CPU attention
backend only (the kernel takes no per-key bias); its cache layout is checked on the first write.
"""

from __future__ import annotations

import collections
import functools

import torch


class Weighing:
    """Mixed in first: strips the bias column off the multimodal embeddings before vLLM merges them, and queues
    each image's budget (``vtprune.serving.request_keep``) for ``keep_rows``."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("embed_multimodal")
        if own is not None:  # a binding's: its images' budgets first
            @functools.wraps(own)
            def embed_multimodal(self, **inputs):
                from .request_keep import FIELD, FIELD_VIDEO, decode

                self.vtprune_budgets = collections.deque(decode(self.vtprune_config, inputs.pop(FIELD, None)))
                self.vtprune_video_budgets = collections.deque(decode(self.vtprune_config,
                                                                      inputs.pop(FIELD_VIDEO, None)))
                return own(self, **inputs)

            cls.embed_multimodal = embed_multimodal

    def embed_input_ids(self, input_ids, multimodal_embeddings=None, *args, is_multimodal=None, **kwargs):
        bias = getattr(self, "vtprune_bias", None)
        if bias is not None and multimodal_embeddings is not None:
            multimodal_embeddings = bias.strip(multimodal_embeddings, is_multimodal, input_ids.shape[0])
        return super().embed_input_ids(input_ids, multimodal_embeddings, *args, is_multimodal=is_multimodal,
                                       **kwargs)


def biased_attention(query, keys, values, bias, scale: float) -> torch.Tensor:
    """Causal attention of one request's ``query`` [T, H, d] (its last T positions) over its ``keys`` /
    ``values`` [L, H_kv, d], ``bias`` [L] added to every query's logits; float32 [T, H, d]."""
    t, heads, _ = query.shape
    n = keys.shape[0]
    group = heads // keys.shape[1]
    keys = keys.float().repeat_interleave(group, 1)
    values = values.float().repeat_interleave(group, 1)
    logits = torch.einsum("thd,lhd->htl", query.float(), keys) * scale + bias.float()[None, None, :]
    allowed = torch.arange(n)[None, :] <= torch.arange(t)[:, None] + (n - t)
    logits = logits.masked_fill(~allowed.to(logits.device), float("-inf"))
    return torch.einsum("htl,lhd->thd", logits.softmax(-1), values)


def read_cache(kv_cache, slots):
    """(keys, values) [len(slots), H_kv, d] at KV-cache ``slots`` of one layer's vLLM CPU cache
    [blocks, H_kv, block, 2 d]: per block and head, the keys as [d, block], then the values as [block, d]."""
    blocks, heads, size, width = kv_cache.shape
    d = width // 2
    keys = kv_cache.view(blocks, heads, 2, size * d)[:, :, 0].view(blocks, heads, d, size)
    values = kv_cache.view(blocks, heads, 2 * size, d)[:, :, size:]
    block, offset = slots // size, slots % size
    return keys[block, :, :, offset], values[block, :, offset, :]


class SlotBias:
    """The per-slot bias of a served model's decoder layers ``layers`` (those the config biases)."""

    def __init__(self, layers):
        self.layers = set(layers)
        self.step = None  # float [tokens]: the bias of this step's tokens, in the runner's order
        self.slots = None  # float [cache blocks x block size]: the bias of the key in each KV-cache slot
        self.memo = (None, [])
        self.recorded = None  # (step biases, slot mapping) last recorded: every layer of a step writes the same slots
        self.checked = False
        self.biased_calls = 0

    @classmethod
    def for_model(cls, model, config):
        """Bind to every decoder attention layer of vLLM ``model`` (its CPU backend's cache write and forward)."""
        from vllm.model_executor.layers.attention.attention import Attention
        from vllm.model_executor.models.utils import extract_layer_index

        from ..attention import pick_layers

        found = {}
        for module in model.modules():
            if isinstance(module, Attention):
                found[extract_layer_index(module.layer_name)] = module
        if not found:
            raise ValueError(f"{config.name} summary/size_bias: no decoder attention layer found in the served model")
        out = cls(pick_layers(f"{config.name} bias", config.bias_layers, lambda n: list(range(n)), max(found) + 1))
        for layer_id, module in found.items():
            out._bind(config, layer_id, module.impl)
        return out

    def _bind(self, config, layer_id, impl):
        name = type(impl).__name__
        if name != "CPUAttentionBackendImpl":
            raise ValueError(f"{config.name} summary/size_bias adds a bias inside attention, which vtprune serving "
                             f"does on vLLM's CPU attention backend only (this engine runs {name})")
        unsupported = [what for what, on in (("ALiBi", impl.alibi_slopes is not None),
                                             ("a sliding window", impl.sliding_window != -1),
                                             ("a logit soft cap", bool(impl.logits_soft_cap)),
                                             ("attention sinks", impl.sinks is not None),
                                             (f"a {impl.kv_cache_dtype} KV cache", impl.kv_cache_dtype != "auto"))
                       if on]
        if unsupported:
            raise ValueError(f"{config.name} summary/size_bias in vLLM does not run with {unsupported[0]}")
        update, forward = impl.do_kv_cache_update, impl.forward

        def do_kv_cache_update(layer, key, value, kv_cache, slot_mapping):
            update(layer, key, value, kv_cache, slot_mapping)
            self.record(kv_cache, slot_mapping, key, value)

        def biased_forward(layer, query, key, value, kv_cache, attn_metadata, *args, **kwargs):
            output = forward(layer, query, key, value, kv_cache, attn_metadata, *args, **kwargs)
            if attn_metadata is not None and layer_id in self.layers:
                self.rebias(impl, query, kv_cache, attn_metadata, output)
            return output

        impl.do_kv_cache_update = do_kv_cache_update
        impl.forward = biased_forward

    def strip(self, embeddings, is_multimodal, length: int) -> list:
        """The multimodal embeddings without their bias column; the step's biases noted."""
        rows = [e[:, :-1] for e in embeddings]
        step = torch.zeros(length)
        if rows:
            where = is_multimodal[:length].cpu().bool()
            step[where] = torch.cat([e[:, -1] for e in embeddings]).float().cpu()
        self.step = step
        return rows

    def record(self, kv_cache, slot_mapping, key, value):
        """A layer wrote this step's keys and values at ``slot_mapping``: store their biases there (once a step:
        the step's layers share its slot mapping)."""
        if self.recorded is not None and self.recorded[0] is self.step and self.recorded[1] is slot_mapping:
            return
        self.recorded = (self.step, slot_mapping)
        total = kv_cache.shape[0] * kv_cache.shape[2]
        if self.slots is None or self.slots.numel() != total:
            self.slots = torch.zeros(total)
        slots = slot_mapping.cpu().long()
        bias = torch.zeros(slots.numel())
        if self.step is not None:
            m = min(slots.numel(), self.step.numel())
            bias[:m] = self.step[:m]
        real = slots >= 0
        self.slots[slots[real]] = bias[real]
        if not self.checked and bool(real.any()):
            keys, values = read_cache(kv_cache, slots[real].to(kv_cache.device))
            n = int(real.sum())
            if not (torch.equal(keys, key[:n].to(keys.dtype)) and torch.equal(values, value[:n].to(values.dtype))):
                raise RuntimeError("vtprune summary/size_bias reads vLLM's CPU KV cache back, and this CPU's cache "
                                   "layout is not the one it knows (keys [d, block], values [block, d] per block "
                                   "and head): serve without summary tokens / size_bias here")
            self.checked = True

    def _biased_requests(self, meta, block_size: int) -> list:
        """``[(request, slots, bias)]`` of the requests whose context holds a biased key (once per step)."""
        if self.memo[0] is meta:
            return self.memo[1]
        out = []
        starts = meta.query_start_loc.cpu()
        lengths = meta.seq_lens.cpu()
        tables = meta.block_table.cpu()
        for r in range(starts.numel() - 1):
            n = int(lengths[r])
            blocks = tables[r, :(n + block_size - 1) // block_size].long()
            slots = (blocks[:, None] * block_size + torch.arange(block_size)).flatten()[:n]
            bias = self.slots[slots]
            if bool(bias.any()):
                out.append((r, slots, bias))
        self.memo = (meta, out)
        return out

    def rebias(self, impl, query, kv_cache, meta, output):
        """Recompute, with the bias, the rows of ``output`` of the requests that see a biased key."""
        if self.slots is None:
            return
        requests = self._biased_requests(meta, kv_cache.shape[2])
        if not requests:
            return
        self.biased_calls += 1
        starts = meta.query_start_loc.cpu()
        out = output.view(output.shape[0], impl.num_heads, -1)
        for r, slots, bias in requests:
            a, b = int(starts[r]), int(starts[r + 1])
            if a == b:
                continue
            keys, values = read_cache(kv_cache, slots.to(kv_cache.device))
            out[a:b] = biased_attention(query[a:b], keys, values, bias.to(query.device), impl.scale).to(out.dtype)
