"""Everything ``vtprune.wrap`` attaches to one model: stage runtimes behind one protocol.

Each stage runtime is a ``vtprune.runtime.stage.StageRuntime`` (``install() -> hook handles``, ``begin_call(call)``,
``end_call(call, output) -> output or None``, ``stats() -> {section: dict}`` and ``remove()``, each doing
nothing unless the runtime needs it); for every language-model call the session builds a ``Call``
(``vtprune.runtime.records``) and hands it to them in order:

1. ``PreCut`` (``vtprune.runtime.precut``): the pre-LLM cut of selector methods, and the ``Forward`` record
   of every call with images (``vtprune.record(model)``); ``SizeBias`` (``vtprune.runtime.size_bias``) when the
   selector weighs its kept tokens (``summary``, ``size_bias``);
2. ``LayerExit`` (``vtprune.runtime.exit``): visual tokens leaving at a decoder layer (``llm``-stage methods);
3. the attention runtime of ``vhr``, ``var`` or ``zerotuning``.

Around them: ``Capture`` (the vision tower's runs and where the image tokens are), ``Generation``
(``generate``'s own token counting on a pruned cache), ``Loss`` (labels), ``Counts`` (totals) and
``Sequences`` (one ``CacheState`` per KV cache).  A wrap that can change nothing (``inert``:
selectors at ``keep=1.0``) steps aside inside ``torch.compile``; any other raises there.
"""

from __future__ import annotations

import copy
import dataclasses

import torch

from ..attention import AttentionRoute
from .size_bias import SizeBias
from .capture import Capture
from ..compat import cache_of, cache_of_output
from .counts import Counts
from .exit import LayerExit
from .generation import Generation
from .hooks import Installed
from .loss import Loss
from .precut import PreCut
from .records import Call
from .sequences import Sequences


def _first(configs, stage):
    chosen = [c for c in configs if c.stage == stage]
    return chosen[0] if chosen else None


ATTR = "_vtprune_session"  # the attribute of a wrapped model that holds its session


class Session:
    def __init__(self, model, adapter, configs, rewrap=None):
        self.model = model
        self.rewrap = rewrap  # (model, configs) -> the model wrapped alike: what a deep copy of the model gets
        self.adapter = adapter
        self.configs = configs
        self.selector = _first(configs, "select")
        self.layer_method = _first(configs, "llm")
        self.attn_method = _first(configs, "attention")
        layers = adapter.language_model.layers
        self.sequences = Sequences()
        self.route = AttentionRoute(model)  # one attention router per wrap, shared by the runtimes
        self.counts = Counts(model, adapter.language_model)
        self.capture = Capture(adapter, self.selector)
        self.precut = PreCut(adapter, self.selector, self.capture)
        self.bias = SizeBias(self.selector, layers, self.route,
                             lambda layer: self.layer_exit.plan_for(layer) if self.layer_exit else None) \
            if self.selector is not None and self.selector.weighs and not self.selector.inert else None
        self.layer_exit = LayerExit(model, adapter, self.layer_method, self.counts, self.route) \
            if self.layer_method else None
        self.attention = self.attn_method.runtime(model, layers, self.route) if self.attn_method else None
        self.generation = Generation(model, self.sequences, self.precut, lambda: self.inert)
        self.loss = Loss(model)
        self.installed = Installed()
        self.call = None  # the language-model call running now
        self.forward_cut = self.forward_length = None  # the cut of the current top-level forward

    @property
    def runtimes(self) -> list:
        return [r for r in (self.precut, self.bias, self.layer_exit, self.attention) if r is not None]

    @property
    def inert(self) -> bool:
        """True when nothing can be cut or changed (every method is a selector at ``keep=1.0``)."""
        return all(getattr(c, "inert", False) for c in self.configs)

    # ------------------------------------------------------------------ install / remove
    def install(self):
        self.capture.install()
        for runtime in self.runtimes:
            self.installed.add(*runtime.install())
        if self.route.needed:
            self.route.install()
        lm = self.adapter.language_model
        self.installed.add(lm.register_forward_pre_hook(self._lm_pre, with_kwargs=True),
                           lm.register_forward_hook(self._lm_post, with_kwargs=True),
                           self.model.register_forward_pre_hook(self._top_pre, with_kwargs=True),
                           self.model.register_forward_hook(self._top_post, with_kwargs=True))
        self.generation.install()
        self.adapter.install(self.installed)
        self.installed.wrap(self.model, "__deepcopy__", lambda _: self._deepcopy)

    def remove(self):
        self.route.remove()
        for runtime in reversed(self.runtimes):
            runtime.remove()
        self.installed.remove()
        self.generation.remove()
        self.capture.remove()

    def _deepcopy(self, memo):
        """``copy.deepcopy(model)``: the stock model is copied, and the copy wrapped alike (its own
        hooks and statistics, by the ``rewrap`` the API gave); the original keeps this session."""
        model = self.model
        self.remove()
        delattr(model, ATTR)
        try:
            clone = copy.deepcopy(model, memo)
        finally:
            self.install()
            setattr(model, ATTR, self)
        return self.rewrap(clone, [dataclasses.replace(c) for c in self.configs])

    def _skip_compiled(self) -> bool:
        """Inside ``torch.compile`` the hooks of an inert wrap step aside; a pruning wrap cannot run there."""
        if not torch.compiler.is_compiling():
            return False
        if self.inert:
            return True
        raise RuntimeError("vtprune: a model wrapped to prune cannot run under torch.compile (the number of kept "
                           "tokens decides the shapes); run it uncompiled — generate() does not compile it")

    # ------------------------------------------------------------------ top level (labels)
    def _top_pre(self, module, args, kwargs):
        if self._skip_compiled():
            return None
        self.forward_cut = self.forward_length = None
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
    def _lm_pre(self, module, args, kwargs):
        if self._skip_compiled():
            return None
        embeds = kwargs.get("inputs_embeds")
        image_mask, media, capture = self.capture.take(*(embeds.shape[:2] if embeds is not None else (-1, -1)))
        if embeds is None:
            return None
        state = self.sequences.state_for(cache_of(kwargs))
        call = Call(kwargs=kwargs, state=state, fresh=state.orig_len == 0, image_mask=image_mask, media=media,
                    capture=capture)
        q = embeds.shape[1]
        self.adapter.lm_inputs(kwargs)
        self.precut.begin_call(call)
        self.adapter.lm_masks(kwargs, call)
        if call.cut is not None:
            self.forward_cut, self.forward_length = call.cut, q
        if image_mask is not None:
            self.counts.add_call(call, self.precut.forward)
        for runtime in self.runtimes[1:]:
            runtime.begin_call(call)
        self.call = call
        return (args, kwargs) if call.changed else None

    def _lm_post(self, module, args, kwargs, output):
        if self._skip_compiled():
            return None
        call, self.call = self.call, None
        changed = None
        for runtime in self.runtimes[1:]:
            changed = runtime.end_call(call, changed if changed is not None else output) or changed
        cache = cache_of_output(output)
        if call is not None and cache is not None:
            self.sequences.set(cache, call.state)
        return changed

    # ------------------------------------------------------------------ reporting
    def record(self):
        """The ``Forward`` record of the last forward with images (None before one)."""
        record = self.precut.forward
        if record is not None:
            record.exit = self.layer_exit.record if self.layer_exit is not None else None
            record.tower_layers = list(self.capture.tower_layers)
        return record

    def stats(self) -> dict:
        sections = {}
        for runtime in self.runtimes:
            sections.update(runtime.stats())
        return self.counts.stats(self.record(), [c.name for c in self.configs], sections)
