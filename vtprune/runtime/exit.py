"""Visual tokens leaving the LLM at a decoder layer (``exit``, ``fastv``): the runtime.

Before decoder layer K (the first layer that no longer sees them) the dropped visual tokens are
removed from the hidden states, the layer's attention mask (4-D, rows and columns), the rotary
position embeddings and the position ids; every later layer gets the same cut inputs
(``vtprune.runtime.exit_inputs``).  Layers 0..K-1 keep their KV cache as computed; layers >= K only ever store
the kept tokens, so decode runs on a shorter cache there: each decode step's mask is cut to the
columns those layers hold.

Positions stay original (RoPE embeddings are gathered, not recomputed), so the result equals the
stock model in which, from layer K on, the dropped tokens are masked out of attention.

Batches: rows that keep fewer tokens are padded at the front with masked slots (as the pre-LLM
cut does), so every row exits at the same layer and the cache stays rectangular.

Stages (``pdrop``): a method may name several layers (``stage_layers``); before each, it decides on
the visual tokens still in the sequence, and that stage's cut composes with the earlier ones — each
plan addresses the prefill as it entered the language model, so a layer's KV cache holds exactly
the tokens that reached its stage.

A stage before layer 0 (``exit`` at layer 0, ``framefusion``'s merge on the input embeddings) masks its tokens in
layer 0 (prefill and decode steps) and cuts them from layer 1 on: layer 0's cache keeps the whole prompt, as the
sequence bookkeeping (``vtprune.runtime.sequences``) reads it.

Methods never see this runtime: they read a :class:`LayerView` (read-only) and return what leaves.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from vtprune.kernels import gather_seq

from .cut import plan_cut
from ..errors import NotApplicable
from .exit_inputs import cut_kwargs, cut_sequence_inputs, first_layer_attention, first_layer_mask, mask_exited
from .records import ExitRecord
from .stage import StageRuntime


@dataclass(frozen=True)
class LayerView:
    """What an in-LLM method reads when it decides (``observe``, ``drop``, ``decide``, ``compact_here``).

    ``visual`` / ``text`` [B, L]: the prefill's visual and real text tokens as it entered the language model
    (after the pre-LLM cut); ``embeds``: its input embeddings; ``cells`` [B, L] (methods with ``needs_cells``):
    each visual token's cell (``ImageLayout.cells``: a clip's tokens at one spot of its frames share one),
    unique per image and clip of a row, -1 for text; ``memo``: a dict that lives for one prefill, for
    methods that carry state from stage to stage; ``stage``: the layer before which tokens
    now leave, one of ``stage_layers``; ``index`` / ``real`` [B, L']: which prefill positions the layers
    see after the earlier stages' cuts (None before the first); ``scores``: what the method's ``observe``
    returned for layer ``stage - 1``; ``keys`` / ``hidden``: that layer's keys and output, over the
    sequence as the stage sees it; ``compact_from``: the layer from which the whole batch has exited
    (dynamic methods).
    """

    n_layers: int
    stage_layers: tuple
    language_model: object
    stage: int | None = None
    visual: torch.Tensor | None = None
    text: torch.Tensor | None = None
    embeds: torch.Tensor | None = None
    index: torch.Tensor | None = None
    real: torch.Tensor | None = None
    scores: object = None
    keys: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    compact_from: int | None = None
    cells: torch.Tensor | None = None
    memo: dict | None = None


def visual_cells(forward, visual: torch.Tensor) -> torch.Tensor:
    """[B, L] long: per position of a prefill (``visual`` [B, L]: its visual tokens after the pre-LLM cut) the
    cell its visual token shows (``ImageLayout.cells``, offset per image and clip of the row), -1 for text."""
    out = torch.full(visual.shape, -1, dtype=torch.long)
    for b in range(visual.shape[0]):
        where = visual[b].detach().cpu().nonzero().squeeze(1)
        keys, base = [], 0
        for layout, kept in zip(forward.layouts[b], forward.kept[b]):
            cells = layout.cells()
            keys.append(cells[kept] + base)
            base += int(cells.max()) + 1 if cells.numel() else 0
        keys = torch.cat(keys) if keys else torch.zeros(0, dtype=torch.long)
        if keys.numel() != where.numel():
            raise RuntimeError(f"vtprune: row {b} has {where.numel()} visual tokens in the language model, its images "
                               f"{keys.numel()}")
        out[b, where] = keys
    return out


def merged_states(hidden, merges):
    """``hidden`` with ``merges`` ``[(row, slot, feature)]`` written in (a copy; ``hidden`` itself when none)."""
    if not merges:
        return hidden
    hidden = hidden.clone()
    for b, slot, feature in merges:
        hidden[b, slot] = feature.to(hidden.dtype)
    return hidden


def with_hidden(args, kwargs, hidden):
    """A layer's positional arguments with ``hidden`` as its hidden states (or ``kwargs`` given it)."""
    if args:
        return (hidden, *args[1:])
    kwargs["hidden_states"] = hidden
    return args


class LayerExit(StageRuntime):
    """The stage runtime of an ``llm``-stage method (``exit``, ``fastv``, ``dart``, ``dyvte``, ``pdrop``,
    ``sparsevlm``).

    Per sequence it holds the *plans* of the cut (one per stage: which prefill positions the layers
    from the stage's on see) and, for dynamic methods, ``exit_at`` [B], the layer after which each row's
    visual tokens are masked while other rows still use them (``dyvte`` before the whole batch has
    exited).
    """

    def __init__(self, model, adapter, method, counts, route):
        self.route = route  # the wrap's attention router (fastv, dart observe layer k-1)
        self.method = method
        self.counts = counts
        self.language_model = adapter.language_model
        self.layers = layers = adapter.language_model.layers
        refusal = adapter.exit_refusal()
        if refusal is not None:
            raise NotApplicable(f"{method.name} cuts visual tokens inside the LLM; {refusal}")
        self.first = method.first_layer(len(layers))
        low = adapter.first_exit_layer()
        if self.first < low:
            raise NotApplicable(f"{method.name} layer={self.first} is too early for {adapter.family}: visual "
                                f"features are still added to the hidden states up to layer {low - 1}")
        ceiling = adapter.last_exit_layer()
        decisions = method.decision_layers(len(layers))
        latest = max(decisions) + 1 if decisions else max(method.stage_layers(len(layers)))
        if ceiling is not None and latest > ceiling[0]:
            raise NotApplicable(f"{method.name} cuts visual tokens before layer {latest}, too late for {adapter.family}: "
                                f"{ceiling[1]}; cut at layer {ceiling[0]} or earlier")
        self.sequence_inputs = adapter.sequence_inputs
        self.limit = adapter.exit_limit()
        self.family = adapter.family
        self.dynamic = bool(decisions)
        self.stage_layers = [] if self.dynamic else method.stage_layers(len(layers))
        self.record = None  # ExitRecord: what left in the last prefill (None: nothing yet)
        self.prefill_visual = None  # [B] visual tokens per row of the current prefill
        self.plans = []  # the cuts of the current sequence, one per stage: index/real (into the prefill), layer k
        self.decided = set()  # the stage layers the current prefill has decided
        self.calls = 0  # language-model calls so far (a plan knows the call that made it: its prefill)
        self.visual = None  # [B, L] visual tokens of the current prefill (None in other calls)
        self.seq_visual = None  # the same, kept for the decode steps of the sequence
        self.text = self.embeds = None
        self.exit_at = None  # [B] per-row exit layer (dynamic methods), large = not exited
        self.compact_from = None  # dynamic methods: the layer from which the whole batch has exited
        self.cache = {}  # per call: the cut kwargs of each stage's layers
        self.scores = self.keys = None  # what observe returned for layer k-1, and that layer's keys
        self.cells = None  # [B, L] each visual token's cell in the current prefill (methods with needs_cells)
        self.memo = {}  # a method's state across the stages of the current prefill
        self.past = self.q = 0

    def install(self) -> list:
        handles = [self.layers[i].register_forward_pre_hook(functools.partial(self._pre_layer, i), with_kwargs=True)
                   for i in range(self.first, len(self.layers))]
        for j in self.method.decision_layers(len(self.layers)):
            handles.append(self.layers[j].register_forward_hook(functools.partial(self._post_layer, j)))
        if self.method.needs_attention:
            for k in self.stage_layers:
                if k >= 1:  # (a stage before layer 0 has no earlier attention)
                    self.route.observe(k - 1, functools.partial(self.observe, k))
        return handles

    def view(self, **fields) -> LayerView:
        """The read-only view a method gets (``fields``: what this decision point adds)."""
        last = self.plans[-1] if self.plans else None
        return LayerView(n_layers=len(self.layers), stage_layers=tuple(self.stage_layers),
                         language_model=self.language_model, visual=self.visual, text=self.text, embeds=self.embeds,
                         index=last["index"] if last else None, real=last["real"] if last else None,
                         scores=self.scores, keys=self.keys, compact_from=self.compact_from, cells=self.cells,
                         memo=self.memo, **fields)

    # ------------------------------------------------------------------ per call
    def begin_call(self, call):
        """The call's visual and text tokens (after the pre-LLM cut), whether it starts a new
        sequence, the cache length before it and its length."""
        visual, q = call.visual, call.embeds.shape[1]
        self.cache = {}
        self.calls += 1
        self.past, self.q = call.past, q
        self.prefill_visual = None
        if call.fresh:
            self.scores = self.keys = self.exit_at = self.compact_from = None
            self.plans, self.decided = [], set()
            self.record = None
            self.visual = visual if visual is not None and bool(visual.any()) else None
            self.seq_visual, self.text = self.visual, call.text()
            self.embeds = call.embeds if self.visual is not None else None  # the prefill's input (sparsevlm)
            self.memo = {}
            self.cells = None
            if self.visual is not None and getattr(self.method, "needs_cells", False):
                self.cells = visual_cells(call.forward, self.visual)
            if self.visual is not None:
                self.exit_at = torch.full((visual.shape[0],), len(self.layers), device=visual.device)
                self.prefill_visual = visual.sum(1)
                self.record = ExitRecord(method=self.method.name)
        else:
            self.visual = None
        if self.limit is not None and (self.visual is not None or self.plans) and call.past + q > self.limit:
            raise ValueError(f"{self.method.name} cuts visual tokens inside the LLM, which on {self.family} works while "
                             f"the sequence fits its sliding window ({self.limit} tokens); this one has "
                             f"{call.past + q}: use a pre-LLM method (e.g. fastervlm, divprune) for longer prompts")

    def end_call(self, call, output):
        """Dynamic exits: the layers each row's visual tokens did not run (for ``visual_tokens_llm``)."""
        visual, self.prefill_visual = self.prefill_visual, None
        if visual is None or self.exit_at is None or not self.dynamic:
            return None
        n = len(self.layers)  # a row that left after layer j is absent from layers j+1 .. n-1
        gone = (n - 1 - self.exit_at.to(visual.device)).clamp(min=0)
        self.counts.left(float((visual * gone).sum()))
        self.record.exit_layers = [int(j) + 1 if j < n else None for j in self.exit_at.tolist()]
        return None

    def stats(self) -> dict:
        return self.record.stats() if self.record is not None else {}

    def observe(self, k, module, query, key, mask, scaling):
        """Layer k-1's attention (routed) before stage ``k`` is cut: the attention paid to each token."""
        if self.visual is None or k in self.decided or key.shape[2] < query.shape[2] \
                or query.shape[2] != self._width(k - 1):
            return
        key = key[:, :, :query.shape[2]]  # the prefill's keys (a static cache returns its unfilled slots too)
        if k == 1 and self._masked_first() is not None:  # layer 0 ran on every token: what stage 1 sees of it
            query, key, mask = first_layer_attention(self.plans[0], query, key, mask)
        self.keys = key.detach()
        self.scores = self.method.observe(self.view(stage=k), query, key, mask, scaling)

    def _post_layer(self, j, module, args, output):
        """Dynamic methods decide after layer ``j`` which rows' visual tokens may leave."""
        if self.visual is None or self.plans or self.compact_from is not None:
            return
        hidden = output[0] if isinstance(output, tuple) else output
        leave = self.method.decide(self.view(), j, hidden).to(self.exit_at.device)
        self.exit_at = torch.where(leave & (self.exit_at > j), torch.full_like(self.exit_at, j), self.exit_at)
        if bool((self.exit_at <= j).all()):
            self.compact_from = j + 1

    def plan_for(self, layer: int):
        """The current sequence's cut that applies to ``layer``'s keys (None before the first stage)."""
        chosen = None
        for plan in self.plans:
            if plan["k"] <= layer:
                chosen = plan
        return chosen

    def _first_stage(self):
        """The plan of a stage before layer 0 in the current sequence (masked there, cut from layer 1), or None."""
        return self.plans[0] if self.plans and self.plans[0]["k"] == 0 else None

    def _masked_first(self):
        """``_first_stage`` while its prefill runs, or None."""
        plan = self._first_stage()
        return plan if plan is not None and plan["call"] == self.calls else None

    def _width(self, layer: int | None = None) -> int:
        """The prefill's length as the layers now see it (after the stages cut so far; ``layer`` 0 under a stage
        before it: the whole prompt)."""
        if layer == 0 and self._masked_first() is not None:
            return self.q
        return self.plans[-1]["index"].shape[1] if self.plans else self.q

    def _wants_stage(self, i) -> bool:
        if self.visual is None or i in self.decided:
            return False
        if self.dynamic:
            return not self.plans and self.method.compact_here(self.view(), i)
        return i in self.stage_layers

    def _pre_layer(self, i, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if i == 0:
            self._stage(hidden, 0)
        first = self._first_stage()
        if first is not None and i == 0:
            if first["call"] == self.calls and first["merged"]:  # the prefill: merged tokens take their new states
                hidden = merged_states(hidden, first["merged"])
                args = with_hidden(args, kwargs, hidden)
            return args, first_layer_mask(first, kwargs, hidden.shape[1], self.past)
        if first is not None and i == 1 and first["call"] == self.calls and hidden.shape[1] == first["length"]:
            hidden = gather_seq(hidden, first["step"].to(hidden.device))  # the tokens masked in layer 0 leave
            args = with_hidden(args, kwargs, hidden)
        if i > 0:
            self._stage(hidden, i)
        plan = self.plan_for(i)
        if plan is not None:
            prefill = plan["call"] == self.calls
            # layers of one type get the same mask and position embeddings (Gemma's sliding and full layers differ)
            key = (plan["k"], id(kwargs.get("attention_mask")), id(kwargs.get("position_embeddings")))
            rows = hidden.shape[1] if prefill and i > plan["k"] and hidden.shape[1] < plan["index"].shape[1] else None
            if rows is not None:  # the model runs only the prefill's last rows here (Gemma 4's shared layers)
                key = (*key, rows)
            if key not in self.cache:
                self.cache[key] = cut_kwargs(kwargs, prefill, plan, self.past, self.q, rows)
            kwargs.update(self.cache[key])
            if prefill and self.sequence_inputs:
                args = cut_sequence_inputs(self.sequence_inputs, args, kwargs, plan, rows)
            if prefill and i == plan["k"] and i > 0:  # the stage's first layer in the prefill: cut the hidden states
                hidden = gather_seq(hidden, plan["step"].to(hidden.device))
                hidden = merged_states(hidden, plan["merged"])
                args = with_hidden(args, kwargs, hidden)
            return args, kwargs
        if self.exit_at is not None and self.seq_visual is not None and bool((self.exit_at < i).any()):
            kwargs["attention_mask"] = mask_exited(kwargs.get("attention_mask"), self.seq_visual, self.exit_at < i,
                                                   hidden.shape[1], self.past)
            return args, kwargs
        return None

    def _stage(self, hidden, i):
        """Stage ``i``'s decision, when the current prefill reaches it (its plan joins ``plans``)."""
        if self._wants_stage(i):
            self.decided.add(i)
            plan = self._make_plan(hidden, i)
            if plan is not None:
                self.plans.append(plan)

    def _make_plan(self, hidden, k):
        """Stage ``k``'s cut: the method decides on the visual tokens still in the sequence; ``step`` gathers
        the sequence as it enters layer k, ``index``/``real`` address the prefill (every stage so far)."""
        length = self.visual.shape[1]
        before = self.plans[-1] if self.plans else None
        if before is None:
            index = torch.arange(length, device=hidden.device).expand(hidden.shape[0], -1)
            real = torch.ones_like(index, dtype=torch.bool)
        else:
            index, real = before["index"].to(hidden.device), before["real"].to(hidden.device)
        visual = self.visual.to(hidden.device).gather(1, index) & real
        out = self.method.drop(self.view(stage=k, hidden=hidden), visual)
        drop, merges = out if isinstance(out, tuple) else (out, [])
        drop = visual & drop
        if not bool(drop.any()):
            return None
        keep_rows = [(~drop[b]).nonzero().squeeze(1) for b in range(drop.shape[0])]
        step, step_real = plan_cut(keep_rows, drop.shape[1], hidden.device)
        original = torch.zeros(drop.shape[0], length, dtype=torch.bool, device=hidden.device)
        original.scatter_(1, index, drop & real)
        left = self.record.note(original, k, len(self.layers), self.scores)
        self.counts.totals["exits"] += 1
        if not self.dynamic:  # dynamic exits are counted in end_call
            self.counts.left(left)
        merged = []  # (row, slot, feature): merged tokens replace kept ones' hidden states, at their slot in the cut
        for b, pos, feature, members in merges:  # sequence (a stage before layer 0: in the whole prompt, not yet cut)
            slot = int(pos) if k == 0 else int((step[b] == pos).nonzero()[0, 0])
            merged.append((b, slot, feature))
            self.record.merged.append((k, b, int(index[b, pos]), index[b, members.to(index.device)].tolist()))
        return {"index": index.gather(1, step), "real": real.gather(1, step) & step_real, "step": step,
                "length": length, "k": k, "call": self.calls, "merged": merged, "drop": original}
