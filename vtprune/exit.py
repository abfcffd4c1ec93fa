"""Visual tokens leaving the LLM at a decoder layer (``exit``, ``fastv``): the runtime.

Before decoder layer K (the first layer that no longer sees them) the dropped visual tokens are
removed from the hidden states, the layer's attention mask (4-D, rows and columns), the rotary
position embeddings and the position ids; every later layer gets the same cut inputs.  Layers
0..K-1 keep their KV cache as computed; layers >= K only ever store the kept tokens, so decode
runs on a shorter cache there: each decode step's mask is cut to the columns those layers hold.

Positions stay original (RoPE embeddings are gathered, not recomputed), so the result equals the
stock model in which, from layer K on, the dropped tokens are masked out of attention.

Batches: rows that keep fewer tokens are padded at the front with masked slots (as the pre-LLM
cut does), so every row exits at the same layer and the cache stays rectangular.

Stages (``pdrop``): a method may name several layers (``stage_layers``); before each, it decides on
the visual tokens still in the sequence, and that stage's cut composes with the earlier ones — each
plan addresses the prefill as it entered the language model, so a layer's KV cache holds exactly
the tokens that reached its stage.
"""

from __future__ import annotations

import functools

import torch

from vtprune.kernels import gather_positions, gather_seq

from .attention import allowed_keys
from .compat import cache_of
from .errors import NotApplicable
from .records import Exit
from .cut import plan_cut


class LayerExit:
    """The stage runtime of an ``llm``-stage method (``exit``, ``fastv``, ``dart``, ``dyvte``).

    Per sequence it holds: ``k``, the layer from which the dropped tokens are physically gone (the
    *plan* of the cut), and for dynamic methods ``exit_at`` [B], the layer after which each row's
    visual tokens are masked while other rows still use them (``dyvte`` before the whole batch
    has exited).  Methods read what they need from it: ``scores`` (fastv), ``keys``/``hidden``/
    ``language_model`` (dart), ``visual``/``text`` (dyvte).
    """

    def __init__(self, model, adapter, method, counts, route):
        self.model = model
        self.route = route  # the wrap's attention router (fastv, dart observe layer k-1)
        self.method = method
        self.counts = counts
        self.language_model = adapter.language_model
        self.layers = layers = adapter.language_model.layers
        self.first = method.first_layer(len(layers))
        low = adapter.first_exit_layer()
        if self.first < low:
            raise NotApplicable(f"{method.name} layer={self.first} is too early for {adapter.family}: visual "
                                f"features are still added to the hidden states up to layer {low - 1}")
        self.stage_layers = [] if self.dynamic else method.stage_layers(len(layers))
        self.record = None  # Exit: what left in the last prefill (None: nothing yet)
        self.prefill_visual = None  # [B] visual tokens per row of the current prefill
        self.plans = []  # the cuts of the current sequence, one per stage: index/real (into the prefill), layer k
        self.decided = set()  # the stage layers the current prefill has decided
        self.stage = None  # the stage layer being decided (staged methods read it in ``drop``)
        self.calls = 0  # language-model calls so far (a plan knows the call that made it: its prefill)
        self.visual = None  # [B, L] visual tokens of the current prefill (None in other calls)
        self.seq_visual = None  # the same, kept for the decode steps of the sequence
        self.text = None
        self.exit_at = None  # [B] per-row exit layer (dynamic methods), large = not exited
        self.compact_from = None  # dynamic methods: the layer from which the whole batch has exited
        self.cache = {}  # per call: the cut kwargs of each stage's layers
        self.scores = None  # fastv: [B, L] attention paid to each token at layer k-1
        self.keys = self.hidden = None  # dart: layer k-1's keys and output
        self.embeds = None  # the prefill's input embeddings
        self.merges = None  # set by a method's drop: [(row, position, feature, member positions)] merged tokens
        self.past = self.q = 0

    def install(self) -> list:
        handles = [self.layers[i].register_forward_pre_hook(functools.partial(self._pre_layer, i), with_kwargs=True)
                   for i in range(self.first, len(self.layers))]
        for j in self.method.decision_layers(len(self.layers)):
            handles.append(self.layers[j].register_forward_hook(functools.partial(self._post_layer, j)))
        if self.method.needs_attention:
            for k in self.stage_layers:
                self.route.observe(k - 1, functools.partial(self.observe, k))
        return handles

    def remove(self):
        pass

    @property
    def dynamic(self) -> bool:
        return bool(self.method.decision_layers(len(self.layers)))

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
            self.scores = self.exit_at = self.compact_from = None
            self.plans, self.decided = [], set()
            self.record = None
            self.visual = visual if visual is not None and bool(visual.any()) else None
            self.seq_visual, self.text = self.visual, call.text()
            self.embeds = call.embeds if self.visual is not None else None  # the prefill's input (sparsevlm)
            if self.visual is not None:
                self.exit_at = torch.full((visual.shape[0],), len(self.layers), device=visual.device)
                self.prefill_visual = visual.sum(1)
                self.record = Exit(method=self.method.name)
        else:
            self.visual = None

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
        record = self.record
        if record is None or (record.dropped is None and record.exit_layers is None):
            return {}
        out = {"method": record.method, "layer": record.layer, "visual_tokens_dropped": record.dropped,
               "llm_flops_saved": record.share}
        if record.exit_layers is not None:
            out["exit_layers"] = record.exit_layers  # the first layer without the row's visual tokens
        return {"exit": out}

    def _note(self, drop, k):
        """What left the LLM in this prefill before layer ``k`` (``drop`` [B, L] over the prefill)."""
        n = len(self.layers)
        dropped = drop.sum(1).tolist()
        record = self.record
        if record.drop is None:
            record.drop, record.layer, record.dropped = drop, k, dropped
        else:  # a later stage
            record.drop = record.drop | drop
            record.dropped = [a + b for a, b in zip(record.dropped, dropped)]
        record.stages.append((k, dropped, drop))
        record.scores = self.scores
        record.share += sum(dropped) * (n - k) / (len(dropped) * drop.shape[1] * n)
        self.counts.totals["exits"] += 1
        if not self.dynamic:  # dynamic exits are counted in end_call
            self.counts.left(sum(dropped) * (n - k))

    def observe(self, k, module, query, key, mask, scaling):
        """Layer k-1's attention (routed) before stage ``k`` is cut: the attention paid to each token."""
        if self.visual is None or k in self.decided or key.shape[2] < query.shape[2] \
                or query.shape[2] != self._width():
            return
        key = key[:, :, :query.shape[2]]  # the prefill's keys (a static cache returns its unfilled slots too)
        self.keys = key.detach()
        self.scores = self.method.observe(self, query, key, mask, scaling)

    def _post_layer(self, j, module, args, output):
        """Dynamic methods decide after layer ``j`` which rows' visual tokens may leave."""
        if self.visual is None or self.plans or self.compact_from is not None:
            return
        hidden = output[0] if isinstance(output, tuple) else output
        leave = self.method.decide(self, j, hidden).to(self.exit_at.device)
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

    def _width(self) -> int:
        """The prefill's length as the layers now see it (after the stages cut so far)."""
        return self.plans[-1]["index"].shape[1] if self.plans else self.q

    def _wants_stage(self, i) -> bool:
        if self.visual is None or i in self.decided:
            return False
        if self.dynamic:
            return not self.plans and self.method.compact_here(self, i)
        return i in self.stage_layers

    def _pre_layer(self, i, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if self._wants_stage(i):
            self.decided.add(i)
            plan = self._make_plan(hidden, i)
            if plan is not None:
                self.plans.append(plan)
        plan = self.plan_for(i)
        if plan is not None:
            prefill = plan["call"] == self.calls
            if plan["k"] not in self.cache:
                self.cache[plan["k"]] = self._cut_kwargs(kwargs, prefill, plan)
            kwargs.update(self.cache[plan["k"]])
            if prefill and i == plan["k"]:  # the stage's first layer in the prefill: cut the hidden states
                hidden = gather_seq(hidden, plan["step"].to(hidden.device))
                if plan["merged"]:
                    hidden = hidden.clone()
                    for b, slot, feature in plan["merged"]:
                        hidden[b, slot] = feature.to(hidden.dtype)
                args = (hidden, *args[1:]) if args else args
                if not args:
                    kwargs["hidden_states"] = hidden
            return args, kwargs
        if self.exit_at is not None and self.seq_visual is not None and bool((self.exit_at < i).any()):
            kwargs["attention_mask"] = self._mask_exited(kwargs.get("attention_mask"), self.exit_at < i,
                                                         hidden.shape[1])
            return args, kwargs
        return None

    def _mask_exited(self, mask, rows, q):
        """Mask the visual columns for the rows whose visual tokens have left (others unchanged)."""
        visual = self.seq_visual
        b, n = visual.shape
        kv = mask.shape[-1] if mask is not None else self.past + q  # a static cache's mask is wider
        cols = torch.cat([visual, torch.zeros(b, kv - n, dtype=torch.bool, device=visual.device)], 1)
        bad = cols & rows[:, None].to(cols.device)
        if mask is None:
            mask = allowed_keys(None, q, kv, visual.device)
        mask = mask.expand(b, *mask.shape[1:])
        bad = bad.to(mask.device)[:, None, None, :]
        return mask & ~bad if mask.dtype == torch.bool else mask.masked_fill(bad, torch.finfo(mask.dtype).min)

    def _make_plan(self, hidden, k):
        """Stage ``k``'s cut: the method decides on the visual tokens still in the sequence; ``step`` gathers
        the sequence as it enters layer k, ``index``/``real`` address the prefill (every stage so far)."""
        self.hidden = hidden  # the output of layer k-1 (what DART compares tokens by)
        length = self.visual.shape[1]
        before = self.plans[-1] if self.plans else None
        if before is None:
            index = torch.arange(length, device=hidden.device).expand(hidden.shape[0], -1)
            real = torch.ones_like(index, dtype=torch.bool)
        else:
            index, real = before["index"].to(hidden.device), before["real"].to(hidden.device)
        visual = self.visual.to(hidden.device).gather(1, index) & real
        self.stage, self.merges = k, []
        drop = visual & self.method.drop(self, visual)
        if not bool(drop.any()):
            return None
        keep_rows = [(~drop[b]).nonzero().squeeze(1) for b in range(drop.shape[0])]
        step, step_real = plan_cut(keep_rows, drop.shape[1], hidden.device)
        original = torch.zeros(drop.shape[0], length, dtype=torch.bool, device=hidden.device)
        original.scatter_(1, index, drop & real)
        self._note(original, k)
        merged = []  # (row, slot in the cut sequence, feature): merged tokens replace kept ones' hidden states
        for b, pos, feature, members in self.merges:
            slot = int((step[b] == pos).nonzero()[0, 0])
            merged.append((b, slot, feature))
            self.record.merged.append((k, b, int(index[b, pos]), index[b, members.to(index.device)].tolist()))
        return {"index": index.gather(1, step), "real": real.gather(1, step) & step_real, "step": step,
                "length": length, "k": k, "call": self.calls, "merged": merged}

    def _cut_kwargs(self, kwargs, prefill: bool, plan) -> dict:
        """The attention mask, position embeddings and ids for layers >= K in this call."""
        index, real = plan["index"], plan["real"]
        out = {}
        mask = kwargs.get("attention_mask")
        if prefill:
            pe = kwargs.get("position_embeddings")
            if pe is not None:
                out["position_embeddings"] = tuple(gather_seq(t, index.to(t.device)) for t in pe)
            pos = kwargs.get("position_ids")
            if pos is not None:
                out["position_ids"] = gather_positions(pos, index)
            q_index = index
        else:
            q_index = None
        if mask is not None and mask.dim() == 4:
            kv = mask.shape[-1]
            filled = self.past + self.q  # a static cache's mask is wider: unfilled slots follow
            extra = torch.arange(plan["length"], filled, device=mask.device).expand(index.shape[0], -1)
            cols = torch.cat([index.to(mask.device), extra], 1)
            m = mask.expand(index.shape[0], *mask.shape[1:])
            m = m.gather(-1, cols[:, None, None, :].expand(-1, m.shape[1], m.shape[2], -1))
            if q_index is not None:
                m = m.gather(-2, q_index.to(m.device)[:, None, :, None].expand(-1, m.shape[1], -1, m.shape[3]))
            col_real = torch.cat([real.to(mask.device), torch.ones_like(extra, dtype=torch.bool)], 1)
            m = _mask_columns(m, col_real)
            cache = cache_of(kwargs)
            if getattr(cache, "is_compileable", False) and kv > m.shape[3]:
                # a static cache keeps its width: the slots this layer's cache never fills are blocked
                pad = torch.zeros(*m.shape[:3], kv - m.shape[3], dtype=m.dtype, device=m.device)
                m = torch.cat([m, pad if m.dtype == torch.bool else pad.fill_(torch.finfo(m.dtype).min)], -1)
            out["attention_mask"] = m
        elif mask is None and not bool(real.all()):
            out["attention_mask"] = self._fresh_mask(real, prefill, plan)
        elif mask is not None:
            raise ValueError("vtprune's in-LLM exit needs a 4-D attention mask or none (SDPA/eager); "
                             f"got a {mask.dim()}-D mask")
        return out

    def _fresh_mask(self, real, prefill, plan):
        """A boolean mask for a call where the model passed none (causal, unpadded) but rows have padding slots."""
        n = real.shape[1]
        if prefill:
            causal = torch.ones(n, n, dtype=torch.bool, device=real.device).tril()
            return _mask_columns(causal[None, None].expand(real.shape[0], 1, n, n), real)
        cols = torch.cat([real, torch.ones(real.shape[0], self.past - plan["length"] + self.q, dtype=torch.bool,
                                           device=real.device)], 1)
        return cols[:, None, None, :].expand(-1, 1, self.q, -1)


def _mask_columns(mask, col_real):
    """Mask out padding-slot columns of a 4-D mask, keeping each row's own diagonal (no empty rows)."""
    keep = col_real[:, None, None, :]
    if mask.dtype == torch.bool:
        out = mask & keep
    else:
        out = mask.masked_fill(~keep, torch.finfo(mask.dtype).min)
    q, kv = out.shape[-2], out.shape[-1]
    if q == kv:
        eye = torch.eye(q, dtype=torch.bool, device=out.device)[None, None]
        out = out | eye if out.dtype == torch.bool else out.masked_fill(eye, 0.0)
    return out
