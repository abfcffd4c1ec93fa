"""Token counts and what they save: ``totals`` since ``wrap`` and the statistics of the last forward.

``llm_flops_saved`` is the share of the language model's per-token work (every linear layer;
attention's quadratic term not counted) not spent compared with the stock model on the same
prompts: the pre-LLM cut and in-LLM exits together.
"""

from __future__ import annotations

from ..attention import text_config


class Counts:
    def __init__(self, model, language_model):
        self.model = model
        self.language_model = language_model
        self.totals = {"forwards": 0, "samples": 0, "visual_tokens_in": 0, "visual_tokens_out": 0,
                       "visual_tokens_llm": 0.0, "text_tokens": 0, "exits": 0}

    @property
    def n_layers(self) -> int:
        return len(self.language_model.layers)

    def add_call(self, call, record):
        """A language-model call with images: its visual tokens before and after the cut, its text."""
        before, after = call.image_mask, call.visual
        rows = before.any(1)
        if not bool(rows.any()):
            return
        text = int((call.present().to(after.device) & ~after).sum())
        if record is not None:
            record.visual_llm = after.sum(1).tolist()
            record.text_tokens = text
        self.totals["text_tokens"] += text
        self.totals["forwards"] += 1
        self.totals["samples"] += int(rows.sum())
        self.totals["visual_tokens_in"] += int(before.sum())
        self.totals["visual_tokens_out"] += int(after.sum())
        self.totals["visual_tokens_llm"] += float(after.sum())

    def left(self, token_layers: float):
        """Visual tokens x layers an in-LLM exit did not run (``visual_tokens_llm`` is per layer)."""
        self.totals["visual_tokens_llm"] -= token_layers / self.n_layers

    def kv_token_bytes(self) -> int:
        """KV-cache bytes of one token over all the language model's layers (keys and values)."""
        config = text_config(self.model)
        heads = config.num_attention_heads
        itemsize = next(self.language_model.parameters()).element_size()
        total = 0
        for i, decoder in enumerate(self.language_model.layers):
            if getattr(getattr(decoder, "self_attn", None), "is_kv_shared_layer", False):
                continue  # Gemma 4: it attends with an earlier layer's keys and values and stores none
            layer = _layer_config(config, i)  # Gemma 4's full layers have their own head size
            kv_heads = getattr(layer, "num_key_value_heads", None) or heads
            head_dim = getattr(layer, "head_dim", None) or config.hidden_size // heads
            total += 2 * kv_heads * head_dim * itemsize
        return total

    def per_layer(self, record) -> list:
        """Per sample, the visual tokens each decoder layer saw in the last prefill (after every exit)."""
        n = self.n_layers
        rows = [[v] * n for v in record.visual_llm]
        exit_ = record.exit
        if exit_ is None:
            return rows
        if exit_.exit_layers is not None:
            for b, first in enumerate(exit_.exit_layers[:len(rows)]):  # gone from layer `first` on
                if first is not None:
                    rows[b] = [v if i < first else 0 for i, v in enumerate(rows[b])]
        else:
            for k, dropped, _ in exit_.stages:
                for b, gone in enumerate(dropped[:len(rows)]):
                    rows[b] = [v if i < k else v - gone for i, v in enumerate(rows[b])]
        return rows

    @staticmethod
    def sample(record, b) -> dict:
        """One sample of the last forward: its images and videos (each clip per frame too), tokens in and out."""
        out = {"images": []}
        for i, (layout, kept) in enumerate(zip(record.layouts[b], record.kept[b])):
            item = {"tokens_in": layout.n, "tokens_out": int(kept.numel())}
            if record.summaries is not None:  # tokens_out counts them; summary_tokens says how many
                item["summary_tokens"] = len(record.summaries[b][i])
            if record.capped is not None and record.capped[b][i]:
                item["budget_capped"] = True  # an int keep above its tokens: all kept
            if layout.media == "video":
                frames, kept_frames = layout.frames, layout.frames[kept]
                item["frames"] = [{"tokens_in": int((frames == f).sum()), "tokens_out": int((kept_frames == f).sum())}
                                  for f in range(int(frames.max()) + 1)]
            out.setdefault(layout.media + "s", []).append(item)
        items = out["images"] + out.get("videos", [])
        out.update(tokens_in=sum(i["tokens_in"] for i in items), tokens_out=sum(i["tokens_out"] for i in items))
        return out

    def stats(self, record, methods, sections) -> dict:
        """``vtprune.stats``: the last forward (``record``), the stage sections, the totals."""
        out = {"method": "+".join(methods), "methods": list(methods)}
        if record is not None:
            samples = [self.sample(record, b) for b in range(len(record.kept))]
            out.update({
                "samples": samples,
                "visual_tokens_in": sum(s["tokens_in"] for s in samples),
                "visual_tokens_out": sum(s["tokens_out"] for s in samples),
                "summary_tokens_out": sum(i.get("summary_tokens", 0) for s in samples
                                          for i in s["images"] + s.get("videos", [])),
                "llm_sequence_in": record.length,
                "llm_sequence_out": record.llm_length,
                "time_score_s": record.time_score_s,
                "time_gather_s": record.time_gather_s,
            })
            out["kv_bytes_saved"] = self.kv_token_bytes() * len(record.kept) * (record.length - record.llm_length)
            exit_ = record.exit
            if exit_ is not None:
                per_layer = self.kv_token_bytes() / self.n_layers
                out["kv_bytes_saved"] += int(per_layer * sum(sum(d) * (self.n_layers - k) for k, d, _ in exit_.stages))
            if record.visual_llm is not None:
                layers = self.per_layer(record)
                for sample, counts in zip(samples, layers):
                    sample["visual_tokens_per_layer"] = counts
                seen = sum(sum(c) / len(c) for c in layers if c)
                stock = out["visual_tokens_in"] + record.text_tokens
                out["llm_flops_saved"] = (out["visual_tokens_in"] - seen) / stock if stock else 0.0
        out.update(sections)
        totals = dict(self.totals)
        stock = totals["visual_tokens_in"] + totals["text_tokens"]
        totals["llm_flops_saved"] = (totals["visual_tokens_in"] - totals["visual_tokens_llm"]) / stock if stock else 0.0
        out["totals"] = totals
        if record is None:
            out["forwards_with_images"] = 0
        return out


def _layer_config(config, i: int):
    """Decoder layer ``i``'s view of ``config`` where layers differ (transformers' per-layer configs), else it."""
    layers = getattr(config, "per_layer_config", None)
    if layers is None:
        return config
    try:
        return layers[i]
    except (IndexError, KeyError, TypeError):
        return config

