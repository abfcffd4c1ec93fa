"""The runtime of a wrapped model: hooks, the pre-LLM cut, and cache bookkeeping.

How a forward pass is cut (all six families, any transformers 5.x that calls these methods):

1. ``model.model.get_image_features`` is wrapped: whenever the tower runs (inside ``forward``, or in
   ``generate`` before the prefill on transformers >= 5.23) the adapter records each image's token
   count and features.
2. ``model.model.get_placeholder_mask`` is wrapped: it tells where the image tokens are.
3. A forward pre-hook on the language model scores each image, keeps the best ``keep`` tokens per
   image and gathers ``inputs_embeds``, the 2-D attention mask and the position ids (original
   values: RoPE positions are those of the full sequence, so the result equals the full sequence
   with the dropped tokens masked out).  Rows that keep fewer tokens are padded at the front with
   masked slots, like left padding.
4. The pre-hook also tracks the cache: later calls on the same cache get a compacted attention mask
   (``generate`` keeps passing the original-length mask) and, without ``position_ids``, original
   positions.
5. ``labels`` are taken from the top-level call and the loss is recomputed on the cut sequence with
   the model's own ``loss_function``.

In-LLM methods (``exit``, ``fastv``, ``dart``, ``dyvte``) run in ``vtprune.exit`` on decoder-layer
hooks; ``vhr`` runs in ``vtprune.vhr`` (it doubles the prefill batch in step 3 and undoes it in the
language model's post-hook), ``var`` in ``vtprune.var`` (decoder-layer pre-hooks find the sinks,
a routed attention function rewrites a few rows); ``self.vhr`` holds either attention runtime.
Vision-tower scores come from adapter hooks installed here.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch

from vtprune.kernels import gather_cut

from .attention import AttentionRoute, text_config
from .budget import tokens_to_keep
from .exit import LayerExit
from .methods import ScoreContext
from .select import plan_cut, top_tokens


@dataclass
class CacheState:
    """Bookkeeping of one sequence of calls that share a KV cache."""

    orig_len: int = 0
    cache_len: int = 0
    dropped: int = 0
    mask: torch.Tensor | None = None
    cache: object = None


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
        self.state = None
        self.forward_cut = None
        self.replacements = []
        self.labels = None
        self.loss_kwargs = {}
        self.last = None
        self.totals = {"forwards": 0, "samples": 0, "visual_tokens_in": 0, "visual_tokens_out": 0,
                       "visual_tokens_llm": 0.0, "exits": 0, "llm_flops_saved": 0.0}
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
            raise ValueError(f"{method.name} layer={method.first_layer(len(layers))} is too early for "
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
        self.totals["llm_flops_saved"] += self.exits["llm_flops_saved"]
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
                raise ValueError(f"vision-tower layer {layer} is out of range: the tower has {n} layers")
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

    def _before_features(self, args, kwargs):
        self.tower_cls, self.tower_keys, self.tower_selected = {}, [], None

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
    def _after_features(self, args, kwargs, out):
        self.pending_capture = self.adapter.capture(args, kwargs, out)
        self.pending_capture["cls"] = {layer: torch.cat(parts) for layer, parts in self.tower_cls.items()}
        self.pending_capture["selected"] = self.tower_selected
        self.tower_cls, self.tower_keys, self.tower_selected = {}, [], None

    def _after_placeholder(self, args, kwargs, out):
        if kwargs.get("video_features") is not None:
            raise ValueError("vtprune does not prune video inputs yet; pass images, or unwrap the model "
                             "(vtprune.unwrap(model)) to run videos")
        if kwargs.get("image_features") is None and len(args) < 3:
            return
        mask = out[0] if isinstance(out, tuple) else out
        self.pending_mask = mask[..., 0] if mask.dim() == 3 else mask

    # ------------------------------------------------------------------ top level (labels)
    def _top_pre(self, module, args, kwargs):
        self.forward_cut = None
        self.labels = kwargs.pop("labels", None)
        self.loss_kwargs = {k: kwargs[k] for k in ("num_items_in_batch",) if k in kwargs}
        return args, kwargs

    def _top_post(self, module, args, kwargs, output):
        labels, self.labels = self.labels, None
        if labels is None:
            return None
        if self.forward_cut is not None:
            index, real = self.forward_cut
            labels = labels.gather(1, index.to(labels.device)).masked_fill(~real.to(labels.device), -100)
        logits = output[0] if isinstance(output, tuple) else output.logits
        loss = module.loss_function(logits=logits, labels=labels, vocab_size=module.config.text_config.vocab_size,
                                    **self.loss_kwargs)
        if isinstance(output, tuple):
            return (loss, *output)
        return type(output)(loss=loss, **{k: v for k, v in output.items() if k != "loss"})

    # ------------------------------------------------------------------ language model
    def _lm_post(self, module, args, kwargs, output):
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
            self.state.cache = cache
        return output if self.vhr is not None else None

    def _lm_pre(self, module, args, kwargs):
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
            self._count(image_mask, self._visual_after_cut(kwargs, image_mask, cut))
        if self.layer_exit is not None:
            self._begin_layer_exit(kwargs, image_mask, cut, fresh)
        if self.vhr is not None:
            self.vhr.begin_call(kwargs, self._visual_after_cut(kwargs, image_mask, cut), fresh)
            changed = changed or self.vhr.probing
        return (args, kwargs) if changed else None

    def _count(self, before, after):
        """Add one language-model call with images to ``totals`` (samples with visual tokens only)."""
        rows = before.any(1)
        if not bool(rows.any()):
            return
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
        prefix, chunk = self._split_mask(kwargs.get("attention_mask"), state, q)
        cut = None
        if self.selector is not None and image_mask is not None:
            capture, self.pending_capture = self.pending_capture, None
            cut = self._plan(image_mask, capture, chunk, embeds.device)
        if cut is None and state.mask is None:
            state.orig_len += q
            state.cache_len += q
            return None, False
        start = time.perf_counter()
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = (torch.arange(q, device=embeds.device) + state.orig_len).expand(batch, q)
        elif positions.shape[-2] == 1 and batch > 1:
            positions = positions.expand(*positions.shape[:-2], batch, q)
        if cut is not None:
            index, real = cut
            if self.replacements:  # merged tokens (pool) take their anchor token's place
                embeds = embeds.clone()
                for row, pos, feats in self.replacements:
                    embeds[row, pos.to(embeds.device)] = feats.to(embeds.device, embeds.dtype)
            embeds, chunk, positions = gather_cut(embeds, index, real, chunk, positions)
            self.adapter.cut_extra(kwargs, index, real)
            self.forward_cut = cut
        elif chunk is None:
            chunk = torch.ones(batch, q, dtype=torch.long, device=embeds.device)
        if prefix is None:
            prefix = torch.ones(batch, state.cache_len, dtype=chunk.dtype, device=chunk.device)
        full = torch.cat([prefix.to(chunk.device, chunk.dtype), chunk], dim=1)
        kwargs.update(inputs_embeds=embeds, attention_mask=full, position_ids=positions)
        state.orig_len += q
        state.cache_len += embeds.shape[1]
        state.dropped = state.orig_len - state.cache_len
        state.mask = full
        if cut is not None:
            self.adapter.after_cut(state)
            self.last["time_gather_s"] = time.perf_counter() - start
        return cut, True

    def _begin_layer_exit(self, kwargs, image_mask, cut, fresh):
        """Tell the in-LLM exit which tokens of this call are visual and which are text."""
        embeds = kwargs["inputs_embeds"]
        q = embeds.shape[1]
        text = None
        visual = self._visual_after_cut(kwargs, image_mask, cut)
        if visual is not None:
            mask = kwargs.get("attention_mask")
            present = mask[:, -q:].bool() if mask is not None and mask.dim() == 2 else torch.ones_like(visual)
            text = present & ~visual
        past = self.state.cache_len - q if self.state is not None else 0
        self.layer_exit.begin_call(visual, text, fresh, past, q)

    def _state_for(self, past):
        past_len = past.get_seq_length() if past is not None else 0
        state = self.state
        if past_len == 0:
            state = CacheState(cache=past)
        elif state is None or state.cache_len != past_len or (state.cache is not None and state.cache is not past):
            state = CacheState(orig_len=past_len, cache_len=past_len, cache=past)
        self.state = state
        return state

    @staticmethod
    def _split_mask(mask, state, q):
        """The compacted mask of the cached tokens and the original mask of the new chunk."""
        if mask is None:
            return state.mask, None
        if mask.dim() != 2:
            raise ValueError("vtprune cannot cut a custom 4-D attention mask; pass a 2-D padding mask")
        if mask.shape[1] == state.orig_len + q:
            prefix, chunk = mask[:, :state.orig_len], mask[:, state.orig_len:]
        elif mask.shape[1] == state.cache_len + q:
            prefix, chunk = mask[:, :state.cache_len], mask[:, state.cache_len:]
        else:
            raise ValueError(f"attention_mask has {mask.shape[1]} columns; expected {state.orig_len + q} "
                             f"(the full sequence) or {state.cache_len + q} (the pruned cache) for this call")
        return (state.mask if state.mask is not None else prefix), chunk

    # ------------------------------------------------------------------ selection
    def _plan(self, image_mask, capture, chunk_mask, device):
        """Score and select; returns ``(index, real)`` of the cut or ``None`` when all is kept.

        When image tokens are dropped, padding positions (mask 0) of the chunk are dropped too.
        """
        start = time.perf_counter()
        image_mask = image_mask.detach().cpu()
        batch, length = image_mask.shape
        images = self.adapter.images(image_mask, capture or {"counts": [], "features": []})
        layouts = [img.layout for img in images]
        if self.selector.scope == "tile":
            budgets = [self._tile_budgets(layout) for layout in layouts]
        else:
            budgets = [tokens_to_keep(self.selector.keep, layout.n_content) for layout in layouts]
        ctx = ScoreContext(layouts=layouts, budgets=budgets, rows=[img.row for img in images],
                           features=[img.features for img in images], generator=self.generator)
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
        kept = [top_tokens(s, layout, k) for s, layout, k in zip(scores, layouts, budgets)]
        self.replacements = [(img.row, img.positions[idx], feats) for img, rep in zip(images, ctx.replacements)
                             if rep is not None for idx, feats in [rep]]
        drop = torch.zeros(batch, length, dtype=torch.bool)
        per_sample = [[] for _ in range(batch)]
        layouts_of = [[] for _ in range(batch)]
        for (row, pos, layout, _, _), keep in zip(images, kept):
            gone = torch.ones(layout.n, dtype=torch.bool)
            gone[keep] = False
            drop[row, pos[gone]] = True
            per_sample[row].append(keep)
            layouts_of[row].append(layout)
        self.last = {"kept": per_sample, "layouts": layouts_of, "scores": scores, "images": [(img.row, img.layout.n, k.numel()) for img, k in zip(images, kept)],
                     "length": length, "time_score_s": time.perf_counter() - start, "time_gather_s": 0.0}
        if not drop.any():
            self.last["llm_length"] = length
            return None
        if chunk_mask is not None:
            drop |= chunk_mask.detach().cpu() == 0
        index, real = plan_cut([(~drop[b]).nonzero().squeeze(1) for b in range(batch)], length, device)
        self.last["llm_length"] = index.shape[1]
        self.last["pad_slots"] = (~real).sum(1).tolist()
        return index, real

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

    def stats(self) -> dict:
        out = {}
        last = self.last
        if last is not None:
            samples = []
            for b in range(len(last["kept"])):
                imgs = [{"tokens_in": n, "tokens_out": k} for row, n, k in last["images"] if row == b]
                samples.append({"images": imgs, "tokens_in": sum(i["tokens_in"] for i in imgs),
                                "tokens_out": sum(i["tokens_out"] for i in imgs)})
            out.update({
                "method": self.selector.name if self.selector else None,
                "samples": samples,
                "visual_tokens_in": sum(s["tokens_in"] for s in samples),
                "visual_tokens_out": sum(s["tokens_out"] for s in samples),
                "llm_sequence_in": last["length"],
                "llm_sequence_out": last["llm_length"],
                "time_score_s": last["time_score_s"],
                "time_gather_s": last["time_gather_s"],
            })
            out["kv_bytes_saved"] = self._kv_token_bytes() * len(last["kept"]) * (last["length"] - last["llm_length"])
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
            out[self.attn_method.name] = attention
        if out:
            out["totals"] = dict(self.totals)
        return out or {"forwards_with_images": 0, "totals": dict(self.totals)}
