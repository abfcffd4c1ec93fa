"""The runtime of a wrapped model: hooks, the pre-LLM cut, and cache bookkeeping.

How a forward pass is cut (all six families, any transformers 5.x that calls these methods):

1. ``model.model.get_image_features`` is wrapped: whenever the tower runs (inside ``forward``, or in
   ``generate`` before the prefill on transformers >= 5.23) the adapter records each image's token
   count and features.
2. ``model.model.get_placeholder_mask`` is wrapped: it tells where the image tokens are.
3. A forward pre-hook on the language model scores each image, keeps the best ``keep`` tokens per
   image and gathers ``inputs_embeds``, the attention mask (2-D; or 4-D / per-layer dicts, see
   ``vtprune.masks``) and the position ids (original values: RoPE positions are those of the full
   sequence, so the result equals the full sequence with the dropped tokens masked out).  Rows
   that keep fewer tokens are padded at the front with masked slots, like left padding.
4. The pre-hook also tracks each cache (``CacheState``, one per cache object): later calls on it
   get a compacted attention mask (``generate`` keeps passing the original-length mask) and,
   without ``position_ids``, original positions.  For a static cache ``generate``'s
   ``create_masks_for_generate`` is given the compacted 2-D mask.
5. ``labels`` / ``shift_labels`` are taken from the top-level call and the loss is computed on the
   cut sequence with the model's own ``loss_function`` (``vtprune.loss``).
6. A wrap that can change nothing (``inert``: selectors at ``keep=1.0``) steps aside inside
   ``torch.compile``; any other raises there, and ``generate`` does not auto-compile it.

In-LLM methods (``exit``, ``fastv``, ``dart``, ``dyvte``) run in ``vtprune.exit`` on decoder-layer
hooks; ``vhr`` runs in ``vtprune.vhr`` (it doubles the prefill batch in step 3 and undoes it in the
language model's post-hook), ``var`` in ``vtprune.var`` (decoder-layer pre-hooks find the sinks,
a routed attention function rewrites a few rows); ``self.vhr`` holds either attention runtime.
Vision-tower scores come from adapter hooks installed here.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import time
import weakref
from dataclasses import dataclass

import torch

from vtprune.kernels import gather_cut

from . import masks
from .attention import AttentionRoute, text_config
from .budget import tokens_to_keep
from .errors import NotApplicable
from .exit import LayerExit
from .loss import Loss
from .methods import ScoreContext
from .select import plan_cut, top_tokens


@dataclass
class CacheState:
    """Bookkeeping of one sequence of calls that share a KV cache."""

    orig_len: int = 0
    cache_len: int = 0
    dropped: int = 0
    mask: torch.Tensor | None = None
    slots: torch.Tensor | None = None  # [B, cache_len]: the original position each cache entry holds
    live: torch.Tensor | None = None  # [B, cache_len]: False on the padding slots of a cut
    tail: int = 0  # entries since the last cut (one per token): what a crop may take back

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

    def extend(self, batch: int, q: int, device, index=None, real=None):
        """Account for a call of ``q`` new tokens of which the cache keeps ``index`` [B, L'] (all when None).

        ``slots``/``live`` are tracked from the first cut on (before it, entry j holds position j)."""
        cut = index is not None
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


def _cache_of(kwargs):
    """The KV cache of a language-model call (``cache`` since transformers 5.24, ``past_key_values`` before)."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


class Session:
    """Everything ``vtprune.wrap`` attached to one model."""

    def __init__(self, model, adapter, configs):
        self.model = model
        self.adapter = adapter
        self.configs = configs
        selectors = [c for c in configs if c.stage == "select"]
        self.selector = selectors[0] if selectors else None
        layer_methods = [c for c in configs if c.stage == "llm"]
        self.layer_method = layer_methods[0] if layer_methods else None
        self.layer_exit = None
        attention = [c for c in configs if c.stage == "attention"]
        self.attn_method = attention[0] if attention else None
        self.vhr = None
        self.route = None
        self.exits = None
        self.generator = torch.Generator().manual_seed(int(getattr(self.selector, "seed", 0)))
        self.handles = []
        self.patched = []
        self.pending_mask = None
        self.pending_capture = None
        self.last_capture = None
        self.made_masks = ()
        self.state = None  # the sequence of the current call
        self.states = weakref.WeakKeyDictionary()  # cache object -> its sequence's CacheState
        self.forward_cut = None
        self.replacements = []
        self.loss = Loss(model)
        self.last = None
        self.totals = {"forwards": 0, "samples": 0, "visual_tokens_in": 0, "visual_tokens_out": 0,
                       "visual_tokens_llm": 0.0, "text_tokens": 0, "exits": 0}
        self.prefill_visual = None

    # ------------------------------------------------------------------ install / remove
    def install(self):
        inner = self.adapter.inner
        self._install_tower_hooks()
        self._install_layer_exit()
        if self.attn_method is not None:
            self.vhr = self.attn_method.runtime(self, self.adapter.language_model.layers)
            self.handles.extend(self.vhr.install())
        self._patch(inner, "get_image_features", self._after_features, before=self._before_features)
        self._patch(inner, "get_placeholder_mask", self._after_placeholder)
        lm = self.adapter.language_model
        self.handles.append(lm.register_forward_pre_hook(self._lm_pre, with_kwargs=True))
        self.handles.append(lm.register_forward_hook(self._lm_post, with_kwargs=True))
        self.handles.append(self.model.register_forward_pre_hook(self._top_pre, with_kwargs=True))
        self.handles.append(self.model.register_forward_hook(self._top_post, with_kwargs=True))
        if hasattr(self.model, "_valid_auto_compile_criteria"):
            self._wrap(self.model, "_valid_auto_compile_criteria", self._no_auto_compile)
        from transformers.masking_utils import create_masks_for_generate

        self._wrap(self.model, "create_masks_for_generate", self._generate_masks, default=create_masks_for_generate)
        self._wrap(self.model, "__deepcopy__", lambda _: self._deepcopy)
        self._wrap(self.model, "prepare_inputs_for_generation", self._continue_inputs)

    def _continue_inputs(self, original):
        """``generate`` continuing from a pruned cache (the whole conversation passed again) counts what
        to feed from the cache's length, which the cut made shorter: feed what follows the tokens the
        cache stands for."""
        @functools.wraps(original)  # generate reads its signature
        def prepare(input_ids, next_sequence_length=None, *args, **kwargs):
            past = kwargs.get("past_key_values")
            state = self._states_get(past) if past is not None and next_sequence_length else None
            if state is not None and state.dropped > 0:
                embeds = kwargs.get("inputs_embeds")
                total = embeds.shape[1] if embeds is not None and kwargs.get("is_first_iteration") else input_ids.shape[1]
                if next_sequence_length == total - state.cache_len and total > state.orig_len:
                    next_sequence_length = total - state.orig_len
            return original(input_ids, next_sequence_length, *args, **kwargs)

        return prepare

    def _deepcopy(self, memo):
        """``copy.deepcopy(model)``: the stock model is copied, and the copy wrapped alike (its own
        hooks and statistics); the original keeps this session."""
        from .api import _ATTR, wrap

        model = self.model
        self.remove()
        delattr(model, _ATTR)
        try:
            clone = copy.deepcopy(model, memo)
        finally:
            self.install()
            setattr(model, _ATTR, self)
        return wrap(clone, [dataclasses.replace(c) for c in self.configs])

    @property
    def inert(self) -> bool:
        """True when nothing can be cut or changed (every method is a selector at ``keep=1.0``)."""
        return all(getattr(c, "inert", False) for c in self.configs)

    def _skip_compiled(self) -> bool:
        """Inside ``torch.compile`` the hooks of an inert wrap step aside; a pruning wrap cannot run there."""
        if not torch.compiler.is_compiling():
            return False
        if self.inert:
            return True
        raise RuntimeError("vtprune: a model wrapped to prune cannot run under torch.compile (the number of kept "
                           "tokens decides the shapes); run it uncompiled — generate() does not compile it")

    def _no_auto_compile(self, original):
        @functools.wraps(original)
        def criteria(*args, **kwargs):
            return original(*args, **kwargs) if self.inert else False

        return criteria

    def _generate_masks(self, original):
        """``generate`` builds the 4-D masks of a static cache from its 2-D mask, which counts every
        token of the prompt: give it the mask of what the pruned cache holds."""
        @functools.wraps(original)
        def create_masks(*args, **kwargs):
            mask, past, embeds = kwargs.get("attention_mask"), kwargs.get("past_key_values"), kwargs.get("inputs_embeds")
            state = self._states_get(past) if past is not None else None
            compacted = state is not None and state.mask is not None and embeds is not None and (
                mask is None or isinstance(mask, torch.Tensor) and mask.dim() == 2
                and mask.shape[1] == state.orig_len + embeds.shape[1])
            if compacted:  # (no mask: the cut's padding slots still need masking)
                new = mask[:, state.orig_len:] if mask is not None else \
                    torch.ones(embeds.shape[:2], dtype=state.mask.dtype, device=state.mask.device)
                kwargs["attention_mask"] = torch.cat([state.mask.to(new.device, new.dtype), new], 1)
            out = original(*args, **kwargs)
            made = tuple(out.values()) if isinstance(out, dict) else (out,)
            self.made_masks = tuple(m for m in made if m is not None) if compacted else ()
            return out

        return create_masks

    def remove(self):
        # the attention runtime's route was installed last (it may call the exit's route): first out
        if self.vhr is not None and hasattr(self.vhr, "remove"):
            self.vhr.remove()
        if self.route is not None:
            self.route.remove()
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        for obj, name in self.patched:
            if name in vars(obj):
                delattr(obj, name)
        self.patched.clear()
        self.adapter.reset()

    def _install_layer_exit(self):
        if self.layer_method is None:
            return
        method = self.layer_method
        layers = self.adapter.language_model.layers
        low = self.adapter.first_exit_layer()
        if method.first_layer(len(layers)) < low:
            raise NotApplicable(f"{method.name} layer={method.first_layer(len(layers))} is too early for "
                             f"{self.adapter.family}: visual features are still added to the hidden states up "
                             f"to layer {low - 1}")
        self.layer_exit = LayerExit(self, method, layers)
        self.handles.extend(self.layer_exit.install())
        if method.needs_attention:
            self.route = AttentionRoute(self.model)
            self.route.observers[method.layer - 1] = self.layer_exit.observe
            self.route.install()

    def note_exit(self, drop, k):
        """Record what left the LLM in this prefill before layer ``k`` (for ``stats``)."""
        n_layers = len(self.adapter.language_model.layers)
        dropped = drop.sum(1).tolist()
        length = drop.shape[1]
        self.exits = {
            "mask": drop,
            "layer": k,
            "dropped": dropped,
            "llm_tokens": length,
            "llm_flops_saved": sum(dropped) * (n_layers - k) / (len(dropped) * length * n_layers),
        }
        self.totals["exits"] += 1
        if not self.layer_method.decision_layers(n_layers):  # dynamic exits are counted in _lm_post
            self.totals["visual_tokens_llm"] -= sum(dropped) * (n_layers - k) / n_layers

    def _install_tower_hooks(self):
        """Hooks on the vision-tower layers the selector reads ([CLS] attention or its substitute)."""
        self.tower_layers, self.tower_cls, self.tower_keys, self.tower_selected = [], {}, [], None
        if self.selector is None or not self.selector.needs_cls:
            return
        n = self.adapter.tower_depth()
        layers = self.selector.tower_layers(n, self.adapter.feature_layer())
        for layer in layers:
            if not -n <= layer < n:
                raise NotApplicable(f"vision-tower layer {layer} is out of range: the tower has {n} layers")
        self.tower_layers = sorted({layer % n for layer in layers})
        for layer in self.tower_layers:
            sink = functools.partial(lambda layer, scores: self.tower_cls.setdefault(layer, []).append(scores), layer)
            self.handles.extend(self.adapter.hook_tower(layer, sink, self.selector.tower_score))
        if self.selector.merges:
            projector = self.adapter.projector()
            self.handles.extend(self.adapter.hook_keys(self.tower_layers[-1], lambda keys: self.tower_keys.append(keys)))
            self.handles.append(projector.register_forward_pre_hook(self._on_projector))

    def _on_projector(self, module, args):
        """Let a merging method rewrite the per-patch tower features before the projector."""
        features = args[0]
        layer = self.tower_layers[-1]
        if features.dim() != 3 or not self.tower_keys or layer not in self.tower_cls:
            return None
        cls, keys = self.tower_cls[layer][-1], self.tower_keys[-1]
        sources = self.adapter.projector_sources(cls.shape[1], features.shape[1]).to(cls.device)  # [T, k]
        if cls.shape[0] != features.shape[0]:
            raise RuntimeError("vtprune: the projector input does not line up with the tower's tokens")
        # per projector token: the summed [CLS] attention and the mean key of the tower tokens it holds
        k = tokens_to_keep(self.selector.keep, features.shape[1])
        merged, kept = self.selector.merge(cls[:, sources].sum(-1), keys[:, sources].mean(-2), features, k)
        selected = torch.zeros_like(cls)
        for t, idx in enumerate(kept):
            selected[t, sources[idx].flatten()] = 1.0
        self.tower_selected = selected
        return (merged, *args[1:])

    def _wrap(self, obj, name, make, default=None):
        """Set ``obj.name`` (an instance attribute, removed by ``remove``) to ``make(original)``."""
        if name in vars(obj):
            raise ValueError(f"{type(obj).__name__}.{name} is already patched on this instance; "
                             "vtprune cannot wrap a model another tool has patched the same way")
        setattr(obj, name, make(getattr(obj, name, default)))
        self.patched.append((obj, name))

    def _patch(self, obj, name, after, before=None):
        if name in vars(obj):
            raise ValueError(f"{type(obj).__name__}.{name} is already patched on this instance; "
                             "vtprune cannot wrap a model another tool has patched the same way")
        original = getattr(obj, name)

        @functools.wraps(original)
        def patched(*args, **kwargs):
            if before is not None:
                before(args, kwargs)
            out = original(*args, **kwargs)
            after(args, kwargs, out)
            return out

        setattr(obj, name, patched)
        self.patched.append((obj, name))

    # ------------------------------------------------------------------ captures
    def _before_features(self, args, kwargs):
        self.tower_cls, self.tower_keys, self.tower_selected = {}, [], None

    def _after_features(self, args, kwargs, out):
        if isinstance(out, tuple) and not all(isinstance(t, torch.Tensor) for t in out):
            # a direct call with return_dict=False (forward and generate always ask for a ModelOutput)
            self.tower_cls, self.tower_keys, self.tower_selected = {}, [], None
            return
        self.pending_capture = self.adapter.capture(args, kwargs, out)
        self.pending_capture["cls"] = {layer: torch.cat(parts) for layer, parts in self.tower_cls.items()}
        self.pending_capture["selected"] = self.tower_selected
        self.tower_cls, self.tower_keys, self.tower_selected = {}, [], None

    def _after_placeholder(self, args, kwargs, out):
        if kwargs.get("video_features") is not None and not self.inert:
            raise ValueError("vtprune does not prune video inputs yet; pass images, or unwrap the model "
                             "(vtprune.unwrap(model)) to run videos")
        if kwargs.get("image_features") is None and len(args) < 3:
            return
        mask = out[0] if isinstance(out, tuple) else out
        self.pending_mask = mask[..., 0] if mask.dim() == 3 else mask

    # ------------------------------------------------------------------ top level (labels)
    def _top_pre(self, module, args, kwargs):
        if self._skip_compiled():
            return None
        self.forward_cut = None
        self.loss.take(kwargs)
        return args, kwargs

    def _top_post(self, module, args, kwargs, output):
        if self._skip_compiled() or self.loss.labels is None:
            return None
        logits = output[0] if isinstance(output, tuple) else output.logits
        cut = None if self.forward_cut is None else (*self.forward_cut, self.forward_length)
        loss = self.loss.compute(logits, cut)
        if isinstance(output, tuple):
            return (loss, *output)
        return type(output)(loss=loss, **{k: v for k, v in output.items() if k != "loss"})

    # ------------------------------------------------------------------ language model
    def _lm_post(self, module, args, kwargs, output):
        if self._skip_compiled():
            return None
        visual, self.prefill_visual = self.prefill_visual, None
        runtime = self.layer_exit
        if visual is not None and runtime is not None and runtime.exit_at is not None \
                and self.layer_method.decision_layers(len(runtime.layers)):
            n = len(runtime.layers)  # a row that left after layer j is absent from layers j+1 .. n-1
            gone = (n - 1 - runtime.exit_at.to(visual.device)).clamp(min=0)
            self.totals["visual_tokens_llm"] -= float((visual * gone).sum()) / n
        if self.vhr is not None:
            output = self.vhr.end_call(output) or output
        cache = getattr(output, "past_key_values", None)
        if cache is None:
            cache = getattr(output, "cache", None)
        if self.state is not None and cache is not None:
            self._states_set(cache, self.state)
        return output if self.vhr is not None else None

    def _lm_pre(self, module, args, kwargs):
        if self._skip_compiled():
            return None
        embeds = kwargs.get("inputs_embeds")
        image_mask, self.pending_mask = self.pending_mask, None
        if embeds is None:
            return None
        batch, q = embeds.shape[:2]
        if image_mask is not None and tuple(image_mask.shape) != (batch, q):
            image_mask = None
        state = self._state_for(_cache_of(kwargs))
        fresh = state.orig_len == 0
        if fresh:
            self.exits = None
        cut, changed = self._cut(kwargs, state, image_mask, embeds)
        if image_mask is not None:
            self._count(image_mask, self._visual_after_cut(kwargs, image_mask, cut), kwargs)
        if self.layer_exit is not None:
            self._begin_layer_exit(kwargs, image_mask, cut, fresh)
        if self.vhr is not None:
            self.vhr.begin_call(kwargs, self._visual_after_cut(kwargs, image_mask, cut), fresh)
            changed = changed or self.vhr.probing
        return (args, kwargs) if changed else None

    def _present(self, kwargs, q):
        """Bool [B, q]: the real (not padding) tokens of this language-model call, after the cut."""
        mask = kwargs.get("attention_mask")
        batch = kwargs["inputs_embeds"].shape[0]
        if masks.is_4d(mask) and masks.primary(mask) is not None:
            past = self.state.cache_len - q if self.state is not None else 0
            return masks.present(masks.primary(mask), past, q).expand(batch, q)
        if mask is None or masks.is_4d(mask):
            return torch.ones(batch, q, dtype=torch.bool, device=kwargs["inputs_embeds"].device)
        return mask[:, -q:].bool()

    def _count(self, before, after, kwargs):
        """Add one language-model call with images to ``totals`` (samples with visual tokens only)."""
        rows = before.any(1)
        if not bool(rows.any()):
            return
        text = int((self._present(kwargs, after.shape[1]).to(after.device) & ~after).sum())
        self.totals["text_tokens"] += text
        if self.last is not None:
            self.last["visual_llm"] = after.sum(1).tolist()
            self.last["text_tokens"] = text
        self.totals["forwards"] += 1
        self.totals["samples"] += int(rows.sum())
        self.totals["visual_tokens_in"] += int(before.sum())
        self.totals["visual_tokens_out"] += int(after.sum())
        self.totals["visual_tokens_llm"] += float(after.sum())
        self.prefill_visual = after.sum(1)

    @staticmethod
    def _visual_after_cut(kwargs, image_mask, cut):
        """Bool [B, q]: the visual tokens of this language-model call (after the pre-LLM cut)."""
        if image_mask is None:
            return None
        visual = image_mask.to(kwargs["inputs_embeds"].device)
        if cut is not None:
            index, real = cut
            visual = visual.gather(1, index) & real
        return visual

    def _cut(self, kwargs, state, image_mask, embeds):
        """The pre-LLM cut of one language-model call; returns ``(cut or None, kwargs changed)``."""
        batch, q = embeds.shape[:2]
        mask = kwargs.get("attention_mask")
        four_d = masks.is_4d(mask)
        if four_d:  # the chunk's padding: columns nobody attends to
            main = masks.primary(mask)
            prefix, chunk = None, None
            if main is not None:
                offset = state.orig_len if self._original_columns(main, state, q) else state.cache_len
                chunk = masks.present(main, offset, q).long().expand(batch, q)
        else:
            prefix, chunk = self._split_mask(mask, state, q)
        cut = None
        if self.selector is not None and image_mask is not None:
            cut = self._plan(image_mask, self._take_capture(), chunk, embeds.device)
        elif image_mask is not None:
            self._record_uncut(image_mask, self._take_capture())
        if cut is None and state.mask is None:  # nothing cut in this sequence: the call as it came
            state.extend(batch, q, embeds.device)
            return None, False
        start = time.perf_counter()
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = (torch.arange(q, device=embeds.device) + state.orig_len).expand(batch, q)
        elif positions.shape[-2] == 1 and batch > 1:
            positions = positions.expand(*positions.shape[:-2], batch, q)
        index = real = None
        if cut is not None:
            index, real = cut
            if self.replacements:  # merged tokens (pool) take their anchor token's place
                embeds = embeds.clone()
                for row, pos, feats in self.replacements:
                    embeds[row, pos.to(embeds.device)] = feats.to(embeds.device, embeds.dtype)
            embeds, chunk, positions = gather_cut(embeds, index, real, chunk, positions)
            self.adapter.cut_extra(kwargs, index, real)
            self.forward_cut = cut
            self.forward_length = q
        elif chunk is None:
            chunk = torch.ones(batch, q, dtype=torch.long, device=embeds.device)
        if prefix is None:
            prefix = state.mask if state.mask is not None else \
                torch.ones(batch, state.cache_len, dtype=chunk.dtype, device=chunk.device)
        full = torch.cat([prefix.to(chunk.device, chunk.dtype), chunk], dim=1)
        if four_d:
            mask = masks.apply(mask, functools.partial(self._cut_4d, state=state, cut=cut, q=q))
        kwargs.update(inputs_embeds=embeds, attention_mask=mask if four_d else full, position_ids=positions)
        state.extend(batch, q, embeds.device, index, real)
        state.mask = full
        if cut is not None:
            self.adapter.after_cut(state)
            self.last["time_gather_s"] = time.perf_counter() - start
        return cut, True

    def _original_columns(self, mask, state, q) -> bool:
        """Whether a 4-D mask of this call indexes the original sequence rather than the pruned cache
        (masks ``generate`` builds for a static cache are built on the pruned cache)."""
        return state.slots is not None and mask.shape[-1] == state.orig_len + q \
            and not any(mask is made for made in self.made_masks)

    def _cut_4d(self, mask, state, cut, q):
        """A 4-D mask of this call, re-indexed to the pruned cache and cut with this call's tokens."""
        if self._original_columns(mask, state, q):
            mask = masks.to_cache(mask, state.slots, state.live)
        elif mask.shape[-1] < state.cache_len + q:
            raise ValueError(f"a 4-D attention_mask with {mask.shape[-1]} key columns cannot cover this call: "
                             f"expected {state.orig_len + q} (the full sequence) or at least {state.cache_len + q} "
                             "(the pruned cache)")
        if cut is None:
            return mask
        return masks.cut_chunk(mask, cut[0], cut[1], state.cache_len, q)

    def _begin_layer_exit(self, kwargs, image_mask, cut, fresh):
        """Tell the in-LLM exit which tokens of this call are visual and which are text."""
        embeds = kwargs["inputs_embeds"]
        q = embeds.shape[1]
        text = None
        visual = self._visual_after_cut(kwargs, image_mask, cut)
        if visual is not None:
            text = self._present(kwargs, q).to(visual.device) & ~visual
        past = self.state.cache_len - q if self.state is not None else 0
        self.layer_exit.begin_call(visual, text, fresh, past, q)

    def _state_for(self, past):
        """The bookkeeping of the sequence whose cache is ``past`` (one per cache: calls may interleave)."""
        past_len = int(past.get_seq_length()) if past is not None else 0
        state = self._states_get(past)
        if state is not None and 0 < past_len < state.cache_len and past_len >= state.cache_len - state.tail:
            state.crop(past_len)  # the cache was cropped (assisted decoding drops rejected candidates)
        if past_len == 0 or state is None or state.cache_len != past_len:
            state = CacheState(orig_len=past_len, cache_len=past_len)
            self._states_set(past, state)
        self.state = state
        return state

    def _states_get(self, cache):
        try:
            return self.states.get(cache) if cache is not None else None
        except TypeError:  # a cache that cannot be weakly referenced: only the latest sequence is known
            return self.state

    def _states_set(self, cache, state):
        if cache is not None:
            try:
                self.states[cache] = state
            except TypeError:
                pass

    @staticmethod
    def _split_mask(mask, state, q):
        """The compacted mask of the cached tokens and the original mask of the new chunk."""
        if mask is None:
            return state.mask, None
        if mask.dim() != 2:
            raise ValueError(f"attention_mask must be a 2-D padding mask or a 4-D mask, got {mask.dim()}-D")
        if mask.shape[1] == state.orig_len + q:
            prefix, chunk = mask[:, :state.orig_len], mask[:, state.orig_len:]
        elif mask.shape[1] == state.cache_len + q:
            prefix, chunk = mask[:, :state.cache_len], mask[:, state.cache_len:]
        else:
            raise ValueError(f"attention_mask has {mask.shape[1]} columns; expected {state.orig_len + q} "
                             f"(the full sequence) or {state.cache_len + q} (the pruned cache) for this call")
        return (state.mask if state.mask is not None else prefix), chunk

    # ------------------------------------------------------------------ selection
    def _take_capture(self):
        """The tower's capture for this call: a fresh one, else the last one (``generate`` without a
        cache scatters the same image features again at every step without running the tower)."""
        capture, self.pending_capture = self.pending_capture, None
        if capture is not None:
            self.last_capture = capture
        return self.last_capture

    def _select(self, images, capture):
        """Scores, merged replacements and budgets of every image; a reused capture reuses its selection."""
        if capture is not None and "selection" in capture:
            return capture["selection"]
        ctx = ScoreContext(layouts=[img.layout for img in images], budgets=self._budgets(images),
                           rows=[img.row for img in images], features=[img.features for img in images],
                           generator=self.generator)
        if self.tower_layers:
            towers = (capture or {}).get("cls", {})
            if set(towers) != set(self.tower_layers):
                raise RuntimeError("vtprune: the vision tower ran without the [CLS] attention hooks firing")
            ctx.cls_attention = {layer: [self.adapter.tower_to_llm(img, towers[layer]) for img in images]
                                 for layer in self.tower_layers}
        if self.selector.merges:
            selected = (capture or {}).get("selected")
            if selected is None:
                raise RuntimeError("vtprune: the projector ran without the merging hook firing")
            ctx.tower_selected = [(self.adapter.tower_to_llm(img, selected) > 0).float() for img in images]
        scores = list(self.selector.score(ctx))
        first = {}
        for i, img in enumerate(images):  # copies of one image (an expanded batch) share its selection
            if img.features is not None:
                scores[i] = scores[first.setdefault(id(img.features), i)]
        selection = (scores, ctx.replacements, ctx.budgets)  # a method may set its own budgets (pool, visionzip)
        if capture is not None:
            capture["selection"] = selection
        return selection

    def _budgets(self, images) -> list:
        if self.selector.scope == "tile":
            return [self._tile_budgets(img.layout) for img in images]
        return [tokens_to_keep(self.selector.keep, img.layout.n_content) for img in images]

    def _plan(self, image_mask, capture, chunk_mask, device):
        """Score and select; returns ``(index, real)`` of the cut or ``None`` when all is kept.

        When image tokens are dropped, left padding (mask 0 before a row's first real token) is dropped
        too; other masked positions stay, masked, so that every position whose output the caller may
        read (right padding, the last position) keeps its place.
        """
        start = time.perf_counter()
        image_mask = image_mask.detach().cpu()
        batch, length = image_mask.shape
        images = self.adapter.images(image_mask, capture or {"counts": [], "features": []})
        scores, replacements, budgets = self._select(images, capture)
        kept = [top_tokens(s, img.layout, k) for s, img, k in zip(scores, images, budgets)]
        self.replacements = [(img.row, img.positions[idx], feats) for img, rep in zip(images, replacements)
                             if rep is not None for idx, feats in [rep]]
        drop = self._record(images, kept, batch, length, start, scores)
        if not drop.any():
            return None
        if chunk_mask is not None:  # left padding goes too (what follows the first real token stays, masked)
            pad = chunk_mask.detach().cpu() == 0
            drop |= pad & (~pad).long().cumsum(1).eq(0)
        index, real = plan_cut([(~drop[b]).nonzero().squeeze(1) for b in range(batch)], length, device)
        self.last["llm_length"] = index.shape[1]
        self.last["pad_slots"] = (~real).sum(1).tolist()
        return index, real

    def _record_uncut(self, image_mask, capture):
        """``last`` for a call with images that no pre-LLM method cuts (in-LLM and attention methods)."""
        start = time.perf_counter()
        image_mask = image_mask.detach().cpu()
        images = self.adapter.images(image_mask, capture or {"counts": [], "features": []})
        self._record(images, [torch.arange(img.layout.n) for img in images], *image_mask.shape, start, None)

    def _record(self, images, kept, batch, length, start, scores):
        """Fill ``last`` (what ``last_kept`` and ``stats`` report); returns the bool [B, L] drop mask."""
        drop = torch.zeros(batch, length, dtype=torch.bool)
        per_sample = [[] for _ in range(batch)]
        layouts_of = [[] for _ in range(batch)]
        for img, keep in zip(images, kept):
            gone = torch.ones(img.layout.n, dtype=torch.bool)
            gone[keep] = False
            drop[img.row, img.positions[gone]] = True
            per_sample[img.row].append(keep)
            layouts_of[img.row].append(img.layout)
        self.last = {"kept": per_sample, "layouts": layouts_of, "scores": scores,
                     "images": [(img.row, img.layout.n, k.numel()) for img, k in zip(images, kept)],
                     "length": length, "llm_length": length, "time_score_s": time.perf_counter() - start,
                     "time_gather_s": 0.0}
        return drop

    def _tile_budgets(self, layout) -> dict:
        content = ~layout.newline
        tiles = layout.tiles[content]
        return {int(t): tokens_to_keep(self.selector.keep, int((tiles == t).sum())) for t in tiles.unique() if t >= 0}

    # ------------------------------------------------------------------ reporting
    def _kv_token_bytes(self) -> int:
        """KV-cache bytes of one token over all the language model's layers (keys and values)."""
        config = text_config(self.model)
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        itemsize = next(self.adapter.language_model.parameters()).element_size()
        return 2 * len(self.adapter.language_model.layers) * kv_heads * head_dim * itemsize

    def _per_layer(self, base) -> list:
        """Per sample, the visual tokens each decoder layer sees in the last prefill (after every exit)."""
        runtime, n = self.layer_exit, len(self.adapter.language_model.layers)
        rows = [[v] * n for v in base]
        if runtime is None:
            return rows
        if runtime.exit_at is not None and self.layer_method.decision_layers(n):
            for b, j in enumerate(runtime.exit_at.tolist()[:len(rows)]):  # gone from layer j + 1 on
                rows[b] = [v if i <= j else 0 for i, v in enumerate(rows[b])]
        elif self.exits is not None:
            k = self.exits["layer"]
            for b, gone in enumerate(self.exits["dropped"][:len(rows)]):
                rows[b] = [v if i < k else v - gone for i, v in enumerate(rows[b])]
        return rows

    def stats(self) -> dict:
        out = {"method": "+".join(c.name for c in self.configs), "methods": [c.name for c in self.configs]}
        last = self.last
        if last is not None:
            samples = []
            for b in range(len(last["kept"])):
                imgs = [{"tokens_in": n, "tokens_out": k} for row, n, k in last["images"] if row == b]
                samples.append({"images": imgs, "tokens_in": sum(i["tokens_in"] for i in imgs),
                                "tokens_out": sum(i["tokens_out"] for i in imgs)})
            out.update({
                "samples": samples,
                "visual_tokens_in": sum(s["tokens_in"] for s in samples),
                "visual_tokens_out": sum(s["tokens_out"] for s in samples),
                "llm_sequence_in": last["length"],
                "llm_sequence_out": last["llm_length"],
                "time_score_s": last["time_score_s"],
                "time_gather_s": last["time_gather_s"],
            })
            out["kv_bytes_saved"] = self._kv_token_bytes() * len(last["kept"]) * (last["length"] - last["llm_length"])
            if "visual_llm" in last:
                layers = self._per_layer(last["visual_llm"])
                for sample, counts in zip(samples, layers):
                    sample["visual_tokens_per_layer"] = counts
                seen = sum(sum(c) / len(c) for c in layers if c)
                stock = out["visual_tokens_in"] + last["text_tokens"]
                out["llm_flops_saved"] = (out["visual_tokens_in"] - seen) / stock if stock else 0.0
        runtime = self.layer_exit
        if self.exits is not None or (runtime is not None and runtime.exit_at is not None):
            exits = self.exits or {}
            out["exit"] = {
                "method": self.layer_method.name,
                "layer": exits.get("layer"),
                "visual_tokens_dropped": exits.get("dropped"),
                "llm_flops_saved": exits.get("llm_flops_saved", 0.0),
            }
            if exits.get("dropped") is not None:
                n = len(self.adapter.language_model.layers)
                per_layer = self._kv_token_bytes() / n
                out["kv_bytes_saved"] = out.get("kv_bytes_saved", 0) + int(
                    per_layer * sum(exits["dropped"]) * (n - exits["layer"]))
            if runtime.exit_at is not None and self.layer_method.decision_layers(len(runtime.layers)):
                n = len(runtime.layers)
                # the first layer without the row's visual tokens (None: they never left)
                out["exit"]["exit_layers"] = [int(j) + 1 if j < n else None for j in runtime.exit_at.tolist()]
        attention = self.vhr.stats() if self.vhr is not None else {}
        if attention:
            out[self.attn_method.name] = {"method": self.attn_method.name, **attention}
        totals = dict(self.totals)
        stock = totals["visual_tokens_in"] + totals["text_tokens"]
        totals["llm_flops_saved"] = (totals["visual_tokens_in"] - totals["visual_tokens_llm"]) / stock if stock else 0.0
        out["totals"] = totals
        if last is None:
            out["forwards_with_images"] = 0
        return out
