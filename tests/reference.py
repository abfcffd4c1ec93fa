"""References that do not use vtprune's pruning code: the stock model with dropped tokens masked.

Dropping a visual token while keeping every other token's position equals feeding the stock
model the full sequence with that token masked out of attention (attention_mask = 0) and the
positions it would have used anyway.  These helpers build that reference.
"""

from __future__ import annotations

import math

import torch

from vtprune.testing import IMAGE_TOKEN, VIDEO_TOKEN


def greedy_model(family: str):
    """A tiny random model of ``family`` that always generates the full number of tokens."""
    from vtprune.testing import tiny_model

    model = tiny_model(family)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def generated(model, inputs, steps: int = 8) -> torch.Tensor:
    """The new tokens of greedy ``generate``."""
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=steps, do_sample=False)
    return out[:, inputs["input_ids"].shape[1]:]


def manual_greedy(model, inputs, steps: int = 6) -> torch.Tensor:
    """Greedy tokens from a user's loop that passes no positions and no mask after the prompt."""
    tokens = []
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
        for _ in range(steps):
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(tok)
            out = model(input_ids=tok, past_key_values=out.past_key_values, use_cache=True)
    return torch.cat(tokens, 1)


def image_runs(input_ids: torch.Tensor, video_counts=()) -> list:
    """Per row, the positions of each image (runs of image tokens separated by other tokens) and each
    video (the next ``video_counts`` video tokens of the row, row-major: a Qwen3-VL clip's frames are
    separated by timestamps), in prompt order."""
    rows = []
    counts = list(video_counts)
    for row in input_ids:
        pos = (row == IMAGE_TOKEN).nonzero().squeeze(1)
        items = []
        if pos.numel():
            breaks = ((pos[1:] != pos[:-1] + 1).nonzero().squeeze(1) + 1).tolist()
            items = list(torch.tensor_split(pos, breaks))
        video = (row == VIDEO_TOKEN).nonzero().squeeze(1)
        while video.numel():
            n = counts.pop(0)
            items.append(video[:n])
            video = video[n:]
        rows.append(sorted(items, key=lambda item: int(item[0])))
    return rows


def video_counts(model, inputs) -> list:
    """Each video's token count: from ``video_grid_thw`` (Qwen), or frames x pooled grid (LLaVA-NeXT-Video;
    LLaVA-OneVision and one newline)."""
    grid = inputs.get("video_grid_thw")
    if grid is not None:
        return (grid.prod(-1) // model.config.vision_config.spatial_merge_size**2).tolist()
    if inputs.get("video_position_ids") is not None:  # Gemma 4: each frame's real patches pooled k x k
        per_frame = (inputs["video_position_ids"] >= 0).all(-1).sum(-1) // model.config.vision_config.pooling_kernel_size**2
        if per_frame.dim() == 2:  # transformers < 5.19: [clips, frames]
            return per_frame.sum(1).tolist()
        return [int(part.sum()) for part in torch.split(per_frame, inputs["num_frames_per_video"].tolist())]
    pixels = inputs.get("pixel_values_videos")
    if pixels is None:
        return []
    vision = model.config.vision_config
    if model.config.model_type == "llava_onevision":  # halved grids, one newline after the last frame
        side = -(-vision.image_size // vision.patch_size // 2)
        return [pixels.shape[1] * side * side + 1] * pixels.shape[0]
    side = vision.image_size // vision.patch_size // model.config.spatial_pool_stride
    return [pixels.shape[1] * side * side] * pixels.shape[0]


def drop_mask(input_ids, kept, video_counts=()) -> torch.Tensor:
    """Bool [B, L]: True on image and video tokens that ``kept`` (per sample, per image or video indices, in
    prompt order) leaves out (``video_counts``: each video's token count)."""
    drop = torch.zeros_like(input_ids, dtype=torch.bool)
    for b, runs in enumerate(image_runs(input_ids, video_counts)):
        assert len(runs) == len(kept[b]), "one kept list per image"
        for run, keep in zip(runs, kept[b]):
            gone = torch.ones(run.numel(), dtype=torch.bool)
            gone[keep] = False
            drop[b, run[gone]] = True
    return drop


def _pad_mask(inputs):
    mask = inputs.get("attention_mask")
    return mask if mask is not None else torch.ones_like(inputs["input_ids"])


def positions(model, inputs, for_generate: bool):
    """The position ids the stock model uses for the full prompt (None = let the model decide)."""
    pad = _pad_mask(inputs)
    text = (pad.long().cumsum(-1) - 1).masked_fill(pad == 0, 0)
    if "image_grid_thw" in inputs or "video_grid_thw" in inputs:
        vision, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                               inputs.get("image_grid_thw"), inputs.get("video_grid_thw"),
                                               attention_mask=pad)
        return torch.cat([text[None], vision]) if for_generate else vision
    return text if for_generate else None


def _masked_kwargs(model, inputs, drop, renumber=False):
    kw = dict(inputs)
    kw["attention_mask"] = _pad_mask(inputs) * (~drop).long()
    pos = positions(model, inputs, for_generate=False)
    if renumber:  # 1-D positions: those of the shortened sequence
        pos = torch.arange(drop.shape[1]).expand(drop.shape[0], -1) - drop.long().cumsum(-1)
    if pos is not None:
        kw["position_ids"] = pos
    return kw


def masked_forward(model, inputs, drop, renumber=False):
    """Logits of the stock model on the full prompt with ``drop`` tokens masked out (``renumber``: each
    position less the dropped tokens before it, i.e. the stock model on the shortened prompt)."""
    with torch.no_grad():
        return model(**_masked_kwargs(model, inputs, drop, renumber)).logits


def masked_greedy(model, inputs, drop, steps: int = 8, plain: bool = False, renumber: bool = False) -> torch.Tensor:
    """Greedy tokens with a KV cache from the stock model, ``drop`` tokens masked, positions kept.

    Positions follow ``generate`` (cumulative over the padding mask), or with ``plain`` those of a
    plain forward call (``arange`` over the whole row for Llama-style models); with ``renumber`` each
    less the dropped tokens before it (1-D positions).
    """
    kw = {k: v for k, v in inputs.items() if k != "attention_mask"}
    mask = _pad_mask(inputs) * (~drop).long()
    pos = positions(model, inputs, for_generate=not plain)
    if pos is None:
        pos = torch.arange(mask.shape[1]).expand(mask.shape[0], -1)
    if renumber:
        pos = pos - drop.long().cumsum(-1)
    with torch.no_grad():
        out = model(**kw, attention_mask=mask, position_ids=pos, use_cache=True)
    return greedy_steps(model, out, mask, pos, steps)


def greedy_steps(model, out, mask, pos, steps: int):
    """``steps`` greedy tokens after a prompt's output ``out`` (with its cache), each fed with the grown padding
    ``mask`` and the next position (every row of ``pos`` one further); None for no step."""
    tokens = []
    with torch.no_grad():
        for _ in range(steps):
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(tok)
            mask = torch.cat([mask, torch.ones_like(tok)], 1)
            pos = pos[..., -1:] + 1
            out = model(input_ids=tok, attention_mask=mask, position_ids=pos, past_key_values=out.past_key_values,
                        use_cache=True)
    return torch.cat(tokens, 1) if tokens else None


def masked_loss(model, inputs, drop, labels):
    """Loss of the stock model with ``drop`` tokens masked, positions kept."""
    with torch.no_grad():
        return model(**_masked_kwargs(model, inputs, drop), labels=labels).loss


class LayerMasked:
    """Context manager: the stock model in which, from decoder layer ``k`` on, ``drop`` [B, L]
    tokens of the prompt are masked out of attention (prefill and every decode step)."""

    def __init__(self, model, k, drop):
        self.layers = model.model.language_model.layers[k:]
        self.drop = drop
        self.handles = []

    def __enter__(self):
        for i, layer in enumerate(self.layers):
            self.handles.append(layer.register_forward_pre_hook(self._hook, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def _hook(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        q = hidden.shape[1]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        shared = getattr(module.self_attn, "is_kv_shared_layer", False)  # Gemma 4: reads an earlier layer's cache
        past = 0 if cache is None else cache.get_seq_length(0) - q if shared else \
            cache.get_seq_length(module.self_attn.layer_idx)  # (layer 0 has stored this call's tokens already)
        mask = kwargs.get("attention_mask")
        kv = mask.shape[-1] if mask is not None else past + q
        if mask is None:
            rows = torch.arange(q)[:, None] + past
            mask = (torch.arange(kv)[None, :] <= rows)[None, None]
        b = self.drop.shape[0]
        cols = torch.cat([self.drop, torch.zeros(b, kv - self.drop.shape[1], dtype=torch.bool)], 1)
        mask = mask.expand(b, *mask.shape[1:])
        if mask.dtype == torch.bool:
            mask = mask & ~cols[:, None, None, :]
        else:
            mask = mask.masked_fill(cols[:, None, None, :], torch.finfo(mask.dtype).min)
        kwargs["attention_mask"] = mask
        return args, kwargs


def always_exit_routers(layers=(0,), hidden_size=32):
    """DyVTE routers that always decide "exit": no trained weights needed."""
    from vtprune.dyvte import Routers

    routers = Routers(hidden_size, list(layers), width=8)
    with torch.no_grad():
        for r in routers.routers:
            r.fc1.weight.zero_()
            r.fc2.weight.zero_()
            r.fc2.bias.copy_(torch.tensor([-5.0, 5.0]))
    return routers


class EagerReference:
    """The stock model with its language model on a plain eager attention whose post-softmax
    probabilities ``edit(module, probs)`` may change in place (an independent reference for
    attention interventions). ``close()`` restores the model."""

    name = "eager_reference"

    def __init__(self, model):
        from transformers import AttentionInterface, AttentionMaskInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

        self.model = model
        AttentionInterface.register(self.name, self.attention)
        AttentionMaskInterface.register(self.name, ALL_MASK_ATTENTION_FUNCTIONS["eager"])
        self.before = model.config.get_text_config()._attn_implementation
        model.set_attn_implementation({"text_config": self.name})

    def edit(self, module, probs):
        raise NotImplementedError

    def attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        groups = query.shape[1] // key.shape[1]
        k = key.repeat_interleave(groups, 1).float()
        v = value.repeat_interleave(groups, 1).float()
        logits = query.float() @ k.transpose(-1, -2) * scaling
        if attention_mask is not None:
            logits = logits + attention_mask[..., :k.shape[2]].float()
        probs = logits.softmax(-1)
        self.edit(module, probs)
        out = (probs @ v).to(query.dtype)
        return out.transpose(1, 2).contiguous(), probs

    def close(self):
        from transformers import AttentionInterface, AttentionMaskInterface

        self.model.set_attn_implementation({"text_config": self.before})
        AttentionInterface._global_mapping.pop(self.name, None)
        AttentionMaskInterface._global_mapping.pop(self.name, None)


class BiasedReference:
    """The stock model fed the kept and summary tokens with a 4-D additive mask carrying size biases.

    A stock forward is run once with a pre-hook on the language model that records its inputs
    (embeddings, positions, Qwen3-VL's deepstack kwargs).  ``logits``/``greedy`` then run the stock
    language model (eager) on those embeddings with the summary tokens' features replaced by
    ``features`` ({(row, position): feature}), the dropped tokens masked out of every query's keys,
    and ``log(size)`` added to the logits of each key in ``sizes`` ({(row, position): size}) for
    every query — no vtprune code involved.
    """

    def __init__(self, model, inputs):
        self.model = model
        self.inputs = inputs
        lm = model.model.language_model
        seen = {}
        handle = lm.register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)
        with torch.no_grad():
            model(**inputs)
        handle.remove()
        self.embeds = seen["inputs_embeds"].clone()
        self.extra = {k: seen[k] for k in ("visual_pos_masks", "deepstack_visual_embeds", "per_layer_inputs")
                      if seen.get(k) is not None}

    def _mask(self, drop, sizes, length):
        """The 4-D mask; Gemma 4 (image blocks on its sliding layers only): one per layer type."""
        types = self.inputs.get("mm_token_type_ids")
        if self.model.config.model_type == "gemma4" and types is not None:
            return {"full_attention": self._mask_of(drop, sizes, length, None),
                    "sliding_attention": self._mask_of(drop, sizes, length, (types > 0).long())}
        return self._mask_of(drop, sizes, length, self.inputs.get("token_type_ids"))

    def _mask_of(self, drop, sizes, length, types):
        batch = drop.shape[0]
        pad = _pad_mask(self.inputs).bool()
        pad = torch.cat([pad, torch.ones(batch, length - pad.shape[1], dtype=torch.bool)], 1)
        gone = torch.cat([drop, torch.zeros(batch, length - drop.shape[1], dtype=torch.bool)], 1)
        cols = pad & ~gone
        allowed = torch.tril(torch.ones(length, length, dtype=torch.bool))[None]
        if types is not None:  # Gemma 3 and 4: the tokens of an image (a run of type 1) see each other both ways
            image = torch.cat([types.bool(), torch.zeros(batch, length - types.shape[1], dtype=torch.bool)], 1)
            run = (image & ~torch.nn.functional.pad(image, (1, 0))[:, :-1]).long().cumsum(1)
            allowed = allowed | (image[:, :, None] & image[:, None, :] & (run[:, :, None] == run[:, None, :]))
        allowed = allowed & cols[:, None, :]
        allowed |= torch.eye(length, dtype=torch.bool)[None]  # padding and dropped rows see themselves
        bias = torch.zeros(batch, length)
        for (row, pos), size in sizes.items():
            bias[row, pos] = math.log(size)
        low = torch.finfo(torch.float32).min
        return torch.where(allowed, bias[:, None, :].expand(-1, length, -1), low)[:, None]

    def _run(self, embeds, mask, positions, extra):
        lm = self.model.model.language_model
        before = self.model.config.get_text_config()._attn_implementation
        self.model.set_attn_implementation({"text_config": "eager"})
        try:
            with torch.no_grad():
                hidden = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False,
                            **extra).last_hidden_state
                return self.model.lm_head(hidden)
        finally:
            self.model.set_attn_implementation({"text_config": before})

    def _embeds(self, features):
        embeds = self.embeds.clone()
        for (row, pos), feature in features.items():
            embeds[row, pos] = feature.to(embeds.dtype)
        return embeds

    def logits(self, drop, sizes, features, for_generate=False):
        embeds = self._embeds(features)
        return self._run(embeds, self._mask(drop, sizes, embeds.shape[1]),
                         positions(self.model, self.inputs, for_generate), self.extra)

    def greedy(self, drop, sizes, features, steps: int = 6) -> torch.Tensor:
        """Greedy tokens without a cache (the whole sequence re-run at each step), generate's positions."""
        embeds = self._embeds(features)
        pos = positions(self.model, self.inputs, for_generate=True)
        if pos is None:
            pad = _pad_mask(self.inputs)
            pos = (pad.long().cumsum(-1) - 1).masked_fill(pad == 0, 1)
        extra = dict(self.extra)
        tokens = []
        for _ in range(steps):
            logits = self._run(embeds, self._mask(drop, sizes, embeds.shape[1]), pos, extra)
            tok = logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(tok)
            embeds = torch.cat([embeds, self.model.get_input_embeddings()(tok)], 1)
            pos = torch.cat([pos, pos[..., -1:] + 1], -1)
            if "per_layer_inputs" in extra:  # Gemma 4: each token's own per-layer embeddings
                lm = self.model.model.language_model
                extra["per_layer_inputs"] = torch.cat([extra["per_layer_inputs"], lm.get_per_layer_inputs(tok, None)], 1)
            if "visual_pos_masks" in extra:
                vis = extra["visual_pos_masks"]
                extra["visual_pos_masks"] = torch.cat([vis, torch.zeros_like(vis[:, :1])], 1)
        return torch.cat(tokens, 1)


def staged_masks(model, stages, cut=None):
    """Context manager: each in-LLM stage's tokens ``(layer, _, drop)`` masked from its layer on (``LayerMasked``);
    with ``cut`` ((index, real) of a pre-LLM cut) the masks over the cut sequence go back to the full one."""
    import contextlib

    stack = contextlib.ExitStack()
    for k, _, drop in stages:
        drop = drop.cpu()
        if cut is not None:
            index, real = cut
            full = torch.zeros(drop.shape[0], int(index.max()) + 1, dtype=torch.bool)
            for b in range(drop.shape[0]):
                full[b, index[b][real[b] & drop[b]]] = True
            drop = full
        stack.enter_context(LayerMasked(model, k, drop))
    return stack


def language_model_inputs(model, inputs) -> dict:
    """The tensors the stock model hands its language model for ``inputs`` (embeddings, positions, ...)."""
    fed = {}
    handle = model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: fed.update({key: v.clone() for key, v in k.items() if torch.is_tensor(v)}), with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    return fed


def fed_logits(model, fed, drop, replaced) -> torch.Tensor:
    """Last-position logits of the stock language model fed ``fed`` (``language_model_inputs``) with the
    ``drop`` [B, L] tokens masked out and the features ``replaced`` ({(row, position): feature}) swapped in."""
    embeds = fed["inputs_embeds"].clone()
    for (row, pos), feature in replaced.items():
        embeds[row, pos] = feature
    with torch.no_grad():
        hidden = model.model.language_model(inputs_embeds=embeds, position_ids=fed.get("position_ids"),
                                            attention_mask=(~drop).long()).last_hidden_state
    return model.lm_head(hidden[:, -1])


def kept_only(model, inputs, kept, steps: int = 6, video_counts=()):
    """The stock model fed only the kept tokens: logits of the prompt and ``steps`` greedy tokens with a cache.

    The language model's input of a stock forward (text embeddings, image and video features scattered by the
    model itself) is gathered at the tokens ``kept`` leaves in (per sample, per image or video), rows left
    padded to the longest; each keeps its original position (``positions``, as ``generate`` numbers them) and
    token type (Gemma 3).  Where every layer attends, this equals ``masked_greedy``; a linear-attention layer
    (Qwen3.5) or a sliding window shorter than the prompt (Gemma 3) tells them apart.
    """
    seen = {}
    handle = model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: seen.update(embeds=k["inputs_embeds"], per_layer=k.get("per_layer_inputs")), with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    embeds, ids = seen["embeds"], inputs["input_ids"]
    keep = ~drop_mask(ids, kept, video_counts) & _pad_mask(inputs).bool()
    pos = positions(model, inputs, for_generate=True)
    rows = [keep[b].nonzero().squeeze(1) for b in range(ids.shape[0])]
    width = max(r.numel() for r in rows)

    def gather(t, b, r, fill=0):  # t[..., b, r] left padded to width
        x = t[..., b, :][..., r]
        return torch.cat([torch.full((*x.shape[:-1], width - r.numel()), fill, dtype=x.dtype), x], -1)

    e = torch.stack([torch.cat([embeds.new_zeros(width - r.numel(), embeds.shape[-1]), embeds[b, r]])
                     for b, r in enumerate(rows)])
    p = torch.stack([gather(pos, b, r) for b, r in enumerate(rows)], -2)
    m = torch.stack([gather(torch.ones_like(ids), b, r) for b, r in enumerate(rows)])
    extra = {}
    for key in ("token_type_ids", "mm_token_type_ids" if model.config.model_type == "gemma4" else None):
        if key is not None and inputs.get(key) is not None:
            extra[key] = torch.stack([gather(inputs[key], b, r) for b, r in enumerate(rows)])
    if seen["per_layer"] is not None:  # Gemma 4: the kept tokens' per-layer embeddings
        per_layer = seen["per_layer"]
        extra["per_layer_inputs"] = torch.stack([torch.cat([per_layer.new_zeros(width - r.numel(), *per_layer.shape[2:]),
                                                            per_layer[b, r]]) for b, r in enumerate(rows)])
    with torch.no_grad():
        out = model(inputs_embeds=e, attention_mask=m, position_ids=p, use_cache=True, **extra)
    return out.logits, greedy_steps(model, out, m, p, steps)


def mean(states):
    return states.mean(0)


def halving(states):
    """The first state averaged in turn with each of the others: ``h <- (h + x) / 2`` (HoliTom's LLM-side merge)."""
    h = states[0]
    for x in states[1:]:
        h = (h + x) / 2
    return h


class Merge:
    """At layer ``k`` of a full-length prefill, the hidden state at ``slot`` becomes ``combine`` (default: the mean)
    of the states of ``members`` (in their order)."""

    def __init__(self, model, k, row, slot, members, length, combine=mean):
        self.handle = model.model.language_model.layers[k].register_forward_pre_hook(self._hook, with_kwargs=True)
        self.row, self.slot, self.members, self.length, self.combine = row, slot, members, length, combine

    def _hook(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[1] < self.length:  # a decode step: the prefill's keys are cached
            return None
        hidden = hidden.clone()
        hidden[self.row, self.slot] = self.combine(hidden[self.row, self.members])
        return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def merged_and_masked(model, record, length, combine=mean):
    """Context manager: the stock model with an in-LLM record's merges (each slot's hidden state ``combine`` of its
    members' at its layer, on a full-length prefill) and its stages' tokens masked from their layers on."""
    import contextlib

    stack = contextlib.ExitStack()
    for k, row, slot, members in record.exit.merged:  # merges first: they act on layer k's input
        stack.enter_context(Merge(model, k, row, slot, members, length, combine))
    stack.enter_context(staged_masks(model, record.exit.stages))
    return stack


def recorded_runs(model, inputs, method, steps: int = 6, **options):
    """``(logits, record, tokens, record of generate)`` of ``model`` wrapped with ``method``: a forward's logits
    and record, then ``steps`` greedy tokens with the cache and the record of that prefill."""
    import vtprune

    with vtprune.wrapped(model, method, **options):
        with torch.no_grad():
            logits = model(**inputs).logits
        record = vtprune.record(model)
        tokens = generated(model, inputs, steps=steps)
        return logits, record, tokens, vtprune.record(model)


def assert_merged_and_masked(model, inputs, logits, tokens, record, record_generate, steps: int = 6, combine=mean):
    """The wrap's last-position ``logits`` and greedy ``tokens`` (``steps`` of them) equal the stock model under
    its records' merges and masks (``merged_and_masked``: ``record`` of the forward, ``record_generate`` of
    ``generate``'s prefill), positions kept."""
    none = torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
    length = inputs["input_ids"].shape[1]
    with merged_and_masked(model, record, length, combine):
        ref = masked_forward(model, inputs, none)
    torch.testing.assert_close(logits[:, -1], ref[:, -1], atol=1e-5, rtol=0)
    with merged_and_masked(model, record_generate, length, combine):
        assert torch.equal(tokens, masked_greedy(model, inputs, none, steps=steps))
