"""Prefill and decode speed of wrapped models at real model widths, against the oracle.

    python scripts/bench_prefill.py --quick                # under a minute on a 2-core CPU
    python scripts/bench_prefill.py --device cuda --dtype bfloat16 --full-depth

Random-weight models are built from configs at the widths of LLaVA-1.5-7B, LLaVA-NeXT-7B,
Qwen2.5-VL-7B (an image, or with ``qwen2.5-vl-7b-video`` a 16-frame clip of 1,568 tokens, ``-video32`` a
32-frame one of 3,136), InternVL3-8B, Gemma-3-4B and LLaVA-OneVision-7B (no download).  On a CPU the towers
and LLMs are cut to a few layers (same widths) so that a run takes minutes; ``--full-depth`` keeps every
layer (GPU).

For every keep and method it measures, as medians over ``--repeats`` after a warm-up, the wrapped
model and its oracle timed alternately (wrap/unwrap untimed around each call) so that drift on a
shared machine hits both alike:
- ``prefill``: one forward of the wrapped model on the image prompt (logits of the last position,
  as ``generate`` asks for);
- ``oracle``: the unwrapped model fed the kept tokens directly — its vision tower, then the
  language model on ``inputs_embeds`` holding only the kept tokens at their original positions —
  so ``oracle / wrapped`` is the cost of scoring + gathering.  For in-LLM methods (``fastv``,
  ``exit``, ``dart``: ``--methods random,fastervlm,fastv,exit``) the oracle runs *every* layer at
  the final length, a lower bound that the first K layers cannot reach;
- ``decode``: tokens per second of greedy decoding with the cache after the prefill (timed inside
  ``generate`` from the first token's logits to the last), for the wrapped model and for the
  oracle (``generate`` on the kept ``inputs_embeds``);
- the ideal speedup from token counts (LLM FLOPs model: linear layers ∝ tokens, attention ∝ tokens²;
  for in-LLM methods the first K layers at the full length);
- on CUDA, the prefill's peak memory above the weights (CPU peak memory: ``bench_memory.py``).
Writes JSON, a markdown table and (with matplotlib) a PNG.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import vtprune
from vtprune.spec import parse_spec, split_specs

SHAPES = {
    "llava-1.5-7b": "llava",
    "llava-next-7b": "llava_next",
    "qwen2.5-vl-7b": "qwen2_5_vl",
    "qwen2.5-vl-7b-video": "qwen2_5_vl",  # a 16-frame clip at 392 x 392: 8 slices of 14 x 14 tokens
    "qwen2.5-vl-7b-video32": "qwen2_5_vl",  # 32 frames: 16 slices
    "internvl3-8b": "internvl",
    "gemma-3-4b": "gemma3",  # SigLIP at 896 pixels pooled to 256 tokens; 5 sliding-window layers in 6
    "llava-onevision-7b": "llava_onevision",  # a 768 x 768 image: a 27 x 27 base tile, 2 x 2 crops, newlines
    # transformers' Gemma4Config defaults (its docs: "similar to google/gemma-4-e2b-it"), per-layer inputs; a
    # 768 x 720 image at the 280-token budget: 48 x 45 patches pooled 3 x 3 into 16 x 15 tokens
    "gemma-4-e2b": "gemma4",
    "gemma-4-e2b-video": "gemma4",  # 32 frames at the video budget of 70 tokens: 21 x 30 patches, 7 x 10 tokens each
}


def build(name, llm_layers, vision_layers, dtype, device):
    import transformers as tf

    if name.startswith("tiny-"):  # vtprune.testing's tiny models (a smoke test of this script; -video: a clip)
        from vtprune.testing import tiny_model

        model = tiny_model(name[5:].removesuffix("-video")).to(device, dtype)
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
        return model
    if name in ("llava-1.5-7b", "llava-next-7b"):
        vision = tf.CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=vision_layers or 24,
                                     num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
        text = tf.LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008,
                              num_hidden_layers=llm_layers or 32, num_attention_heads=32, num_key_value_heads=32)
        common = dict(vision_config=vision, text_config=text, image_token_index=32000, image_seq_length=576,
                      vision_feature_layer=-2, vision_feature_select_strategy="default")
        if name == "llava-1.5-7b":
            config, cls = tf.LlavaConfig(**common), tf.LlavaForConditionalGeneration
        else:
            pins = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
            config, cls = tf.LlavaNextConfig(**common, image_grid_pinpoints=pins), tf.LlavaNextForConditionalGeneration
    elif name.startswith("qwen2.5-vl-7b"):
        text = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=llm_layers or 28,
                    num_attention_heads=28, num_key_value_heads=4,
                    rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
        depth = vision_layers or 32
        vision = dict(depth=depth, hidden_size=1280, out_hidden_size=3584, intermediate_size=3420, num_heads=16,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                      fullatt_block_indexes=[i for i in (7, 15, 23, 31) if i < depth] or [depth - 1])
        config = tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=151655,
                                     video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)
        cls = tf.Qwen2_5_VLForConditionalGeneration
    elif name == "gemma-3-4b":
        vision = tf.SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=vision_layers or 27,
                                       num_attention_heads=16, image_size=896, patch_size=14)
        text = tf.Gemma3TextConfig(vocab_size=262208, hidden_size=2560, intermediate_size=10240,
                                   num_hidden_layers=llm_layers or 34, num_attention_heads=8, num_key_value_heads=4,
                                   head_dim=256, query_pre_attn_scalar=256, sliding_window=1024)
        config = tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=256,
                                 image_token_index=262144, boi_token_index=255999, eoi_token_index=256000)
        cls = tf.Gemma3ForConditionalGeneration
    elif name.startswith("gemma-4-e2b"):
        vision = tf.Gemma4VisionConfig(num_hidden_layers=vision_layers or 16)
        text = tf.Gemma4TextConfig(num_hidden_layers=llm_layers or 30)
        config = tf.Gemma4Config(text_config=text, vision_config=vision, audio_config=None)
        cls = tf.Gemma4ForConditionalGeneration
    elif name == "llava-onevision-7b":
        vision = tf.SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=vision_layers or 26,
                                       num_attention_heads=16, image_size=384, patch_size=14)
        text = tf.Qwen2Config(vocab_size=152128, hidden_size=3584, intermediate_size=18944,
                              num_hidden_layers=llm_layers or 28, num_attention_heads=28, num_key_value_heads=4)
        pins = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]
        config = tf.LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_index=151646,
                                         video_token_index=151647, vision_feature_layer=-1,
                                         vision_feature_select_strategy="full", image_grid_pinpoints=pins,
                                         vision_aspect_ratio="anyres_max_9")
        cls = tf.LlavaOnevisionForConditionalGeneration
    else:
        vision = tf.InternVLVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=vision_layers or 24,
                                         num_attention_heads=16, image_size=448, patch_size=14)
        text = tf.Qwen2Config(vocab_size=151674, hidden_size=3584, intermediate_size=18944,
                              num_hidden_layers=llm_layers or 28, num_attention_heads=28, num_key_value_heads=4)
        config = tf.InternVLConfig(vision_config=vision, text_config=text, image_token_id=151667,
                                   image_seq_length=256, downsample_ratio=0.5, vision_feature_layer=-1)
        cls = tf.InternVLForConditionalGeneration
    torch.manual_seed(0)
    with torch.device(device):
        model = cls._from_config(config, attn_implementation="sdpa", dtype=dtype)
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def inputs_for(name, model, device, dtype):
    """A one-image (or one-clip) prompt at the model's real image size: 20 text tokens, the image, 12 text
    tokens."""
    config = model.config
    if name.startswith("tiny-"):
        from vtprune.testing import tiny_inputs

        family = name[5:].removesuffix("-video")
        clip = {"images_per_row": (0,), "videos_per_row": (1,)} if name.endswith("-video") else {}
        out = tiny_inputs(model, family, **clip)
        n = int((out["input_ids"][0] == visual_token(config, out)).sum())
        return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in out.items()}, n
    gen = torch.Generator().manual_seed(0)
    text = lambda n: torch.randint(10, 1000, (n,), generator=gen).tolist()  # noqa: E731
    if name == "llava-1.5-7b":
        pix = {"pixel_values": torch.randn(1, 3, 336, 336, generator=gen)}
        n, start, end = 576, [], []
    elif name in ("llava-next-7b", "llava-onevision-7b"):
        side = config.vision_config.image_size
        pix = {"pixel_values": torch.randn(1, 5, 3, side, side, generator=gen),
               "image_sizes": torch.tensor([[2 * side, 2 * side]])}
        with torch.no_grad():
            n = model.model.get_image_features(pixel_values=pix["pixel_values"].to(device, dtype),
                                               image_sizes=pix["image_sizes"]).pooler_output[0].shape[0]
        start, end = [], []
    elif name == "gemma-3-4b":
        pix = {"pixel_values": torch.randn(1, 3, 896, 896, generator=gen)}
        n, start, end = 256, [config.boi_token_index], [config.eoi_token_index]
    elif name.startswith("gemma-4-e2b"):
        video = name.endswith("-video")
        frames, (h, w), budget = (32, (21, 30), 630) if video else (1, (48, 45), 2520)
        patch = config.vision_config.patch_size
        x, y = torch.meshgrid(torch.arange(w), torch.arange(h), indexing="xy")
        positions = torch.full((frames, budget, 2), -1, dtype=torch.long)
        positions[:, :h * w] = torch.stack([x, y], -1).reshape(-1, 2)
        pixels = torch.zeros(frames, budget, 3 * patch * patch)
        pixels[:, :h * w] = torch.rand(frames, h * w, 3 * patch * patch, generator=gen)
        per_frame = h * w // config.vision_config.pooling_kernel_size ** 2
        if video:
            pix = {"pixel_values_videos": pixels, "video_position_ids": positions,
                   "num_frames_per_video": torch.tensor([frames])}
            clip = []
            for _ in range(frames):  # a timestamp, then the frame's tokens between boi and eoi
                clip += text(2) + [config.boi_token_id] + [config.video_token_id] * per_frame + [config.eoi_token_id]
            ids = [2] + text(20) + clip + text(12)
            out = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long), **pix}
            out["mm_token_type_ids"] = (out["input_ids"] == config.video_token_id).int() * 2
            return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in out.items()}, \
                frames * per_frame
        pix = {"pixel_values": pixels, "image_position_ids": positions}
        n, start, end = per_frame, [config.boi_token_id], [config.eoi_token_id]
    elif name == "qwen2.5-vl-7b":
        h = w = 56  # 784 patches... 28x28 merged tokens
        pix = {"pixel_values": torch.randn(h * w, 3 * 2 * 14 * 14, generator=gen), "image_grid_thw": torch.tensor([[1, h, w]])}
        n, start, end = h * w // 4, [config.vision_start_token_id], [config.vision_end_token_id]
    elif name.startswith("qwen2.5-vl-7b-video"):
        t, h, w = 16 if name.endswith("32") else 8, 28, 28  # 16 (32) frames of 392 x 392: 8 (16) slices of 14 x 14
        pix = {"pixel_values_videos": torch.randn(t * h * w, 3 * 2 * 14 * 14, generator=gen),
               "video_grid_thw": torch.tensor([[t, h, w]])}
        n, start, end = t * h * w // 4, [config.vision_start_token_id], [config.vision_end_token_id]
    else:
        tiles = 7
        pix = {"pixel_values": torch.randn(tiles, 3, 448, 448, generator=gen)}
        n, start, end = 256 * tiles, [151665], [151666]
    image = visual_token(config, pix)
    ids = [1] + text(20) + start + [image] * n + end + text(12)
    out = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long), **pix}
    if name.startswith("qwen2.5-vl-7b"):
        out["mm_token_type_ids"] = (out["input_ids"] == image).int() * (2 if "pixel_values_videos" in pix else 1)
    if name == "gemma-3-4b":  # its image tokens attend both ways
        out["token_type_ids"] = (out["input_ids"] == image).long()
    if name.startswith("gemma-4"):
        out["mm_token_type_ids"] = (out["input_ids"] == image).int()
    return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in out.items()}, n


def visual_token(config, inputs) -> int:
    """The placeholder token of the prompt's medium (a clip's video token, else the image token)."""
    if "pixel_values_videos" in inputs:
        return config.video_token_id
    return getattr(config, "image_token_id", None) or config.image_token_index


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_pair(first, second, repeats, device, warm=(False, False)):
    """Times of ``first`` and ``second`` run alternately (order swapped every repeat), after a
    warm-up of each (``warm[i]``: already warm), so that drift on a shared machine hits both the
    same way.  Each is a callable or ``(enter, fn, leave)``: ``enter``/``leave`` (e.g. wrap/unwrap)
    run untimed around every call; ``second`` may be None (``first`` alone)."""
    cells = [c if isinstance(c, tuple) else (None, c, None) for c in (first, second) if c is not None]
    times = [[] for _ in cells]

    def once(i):
        enter, fn, leave = cells[i]
        if enter is not None:
            enter()
        try:
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            return time.perf_counter() - start
        finally:
            if leave is not None:
                leave()

    with torch.no_grad():
        for i in range(len(cells)):
            if not warm[i]:
                once(i)
        for r in range(repeats):
            for i in (range(len(cells)) if r % 2 == 0 else reversed(range(len(cells)))):
                times[i].append(once(i))
    return times


def merged_embeds(model, inputs):
    """The stock model's input embeddings with the image features scattered in (no pruning)."""
    with torch.no_grad():
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        video = "pixel_values_videos" in inputs
        if video:
            extra = (inputs["video_position_ids"], inputs["num_frames_per_video"]) if "video_position_ids" in inputs \
                else (inputs["video_grid_thw"],)
            feats = model.model.get_video_features(inputs["pixel_values_videos"], *extra)
        else:
            feats = model.model.get_image_features(**{k: v for k, v in inputs.items() if k in (
                "pixel_values", "image_sizes", "image_grid_thw", "image_position_ids")})
        feats = feats.pooler_output
        feats = torch.cat(list(feats), 0) if isinstance(feats, (list, tuple)) else feats.reshape(-1, feats.shape[-1])
        if model.config.model_type == "gemma4":  # its placeholder mask takes no features
            mask = model.model.get_placeholder_mask(inputs["input_ids"], inputs_embeds=embeds)
        else:
            medium = {"video_features" if video else "image_features": feats}
            mask = model.model.get_placeholder_mask(inputs["input_ids"], inputs_embeds=embeds, **medium)
        mask = (mask[1] if video else mask[0]) if isinstance(mask, tuple) else mask
        if mask.dim() == 2:  # (Gemma 4's is per token)
            mask = mask[..., None].expand_as(embeds)
        return embeds.masked_scatter(mask, feats.to(embeds.dtype))


def oracle_fn(model, inputs, kept_positions):
    """The tower, then the language model fed only the kept tokens (original positions), last logits."""
    def run():
        with torch.no_grad():
            embeds = merged_embeds(model, inputs)
            keep = kept_positions
            kw = {"inputs_embeds": embeds[:, keep], "attention_mask": inputs["attention_mask"][:, keep]}
            if "image_grid_thw" in inputs or "video_grid_thw" in inputs:
                pos, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                                    inputs.get("image_grid_thw"), inputs.get("video_grid_thw"),
                                                    attention_mask=inputs["attention_mask"])
                kw["position_ids"] = pos[:, :, keep]
            else:
                kw["position_ids"] = keep[None]
            if model.config.model_type == "gemma4":  # the kept tokens' per-layer inputs (placeholders count as pad)
                lm, ids = model.model.language_model, inputs["input_ids"]
                visual = (ids == model.config.image_token_id) | (ids == model.config.video_token_id)
                kw["per_layer_inputs"] = lm.get_per_layer_inputs(ids.masked_fill(visual, model.config.text_config.pad_token_id), None)[:, keep]
            out = model.model.language_model(**kw)
            return model.lm_head(out.last_hidden_state[:, -1:])
    return run


class _Stamps:
    """A logits processor that only records when each generated token's logits arrive."""

    def __init__(self):
        self.times = []

    def __call__(self, input_ids, scores):
        _sync(str(scores.device))
        self.times.append(time.perf_counter())
        return scores


def decode_speed(generate, steps, repeats, device):
    """Tokens/s of greedy decoding with the cache, timed inside ``generate``: from the first token's
    logits (after the prefill) to the last, so the prefill's time and noise stay out.  Median of
    ``repeats`` calls (the first is a warm-up).  ``steps=0``: not measured (None)."""
    from transformers import LogitsProcessorList

    if steps <= 0:
        return None
    rates = []
    with torch.no_grad():
        for r in range(repeats + 1):
            stamps = _Stamps()
            generate(steps + 1, LogitsProcessorList([stamps]))
            if r:
                rates.append(steps / (stamps.times[-1] - stamps.times[0]))
    return statistics.median(rates)


def ideal_speedup(length, kept_length, layers=1, exit_layer=None):
    """LLM prefill FLOPs ratio: per layer ~ 24·L·d² + 4·L²·d with d = 4096 (linear + attention).
    With ``exit_layer`` K the first K of ``layers`` run at ``length`` and the rest at ``kept_length``."""
    d = 4096
    cost = lambda n: 24 * n * d * d + 4 * n * n * d  # noqa: E731
    k = 0 if exit_layer is None else exit_layer
    return layers * cost(length) / (k * cost(length) + (layers - k) * cost(kept_length))


def method_options(method, keep, n_layers):
    """One benchmark cell: the method to wrap, its options (the budget; for in-LLM methods an exit
    layer the cut model has) and whether it works inside the LLM."""
    if method == "none":
        return "random", {"keep": 1.0}, False
    names, extra = parse_spec(method)  # a spec: fastervlm:summary=4;size_bias=true
    options = {**extra} if names == ["exit"] else {"keep": keep, **extra}
    in_llm = any(vtprune.methods.get(n).stage == "llm" for n in names)
    if in_llm:
        options.setdefault("layer", min(2, max(1, n_layers // 2)))
    return names, options, in_llm


def run(args):
    device, dtype = args.device, getattr(torch, args.dtype)
    rows = []
    for name in args.models:
        model = build(name, None if args.full_depth else args.llm_layers, None if args.full_depth else args.vision_layers,
                      dtype, device)
        n_layers = model.config.get_text_config().num_hidden_layers
        inputs, n_visual = inputs_for(name, model, device, dtype)
        length = inputs["input_ids"].shape[1]
        visual = inputs["input_ids"][0] == visual_token(model.config, inputs)
        vis_pos = visual.nonzero().squeeze(1)
        steps = args.decode_tokens
        for keep in args.keep:
            for method in (["none"] if keep == 1.0 else args.methods):
                if method == "exit" and keep != min(k for k in args.keep if k < 1.0):
                    continue  # every visual token leaves: one row per model (keep 0)
                wrapped_name, options, in_llm = method_options(method, keep, n_layers)
                if in_llm and n_layers < 2:
                    print(f"skipping {method}: an in-LLM exit needs at least 2 LLM layers (--llm-layers)")
                    continue
                with vtprune.wrapped(model, wrapped_name, **options):
                    with torch.no_grad():
                        model(**inputs, logits_to_keep=1)
                    stats = vtprune.stats(model)
                    if in_llm:  # the oracle runs every layer at the final length (a lower bound)
                        exit_layer = stats["exit"]["layer"]
                        n_final = n_visual - stats["exit"]["visual_tokens_dropped"][0]
                        kept_local = torch.arange(n_final)
                    else:
                        exit_layer = None
                        kept_local = torch.cat(vtprune.last_kept(model)[0])
                        n_final = kept_local.numel()
                    if device.startswith("cuda"):
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                        base = torch.cuda.memory_allocated()
                        with torch.no_grad():
                            model(**inputs, logits_to_keep=1)
                        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
                    decode = decode_speed(lambda n, lp: model.generate(**inputs, max_new_tokens=n, do_sample=False,
                                                                       logits_processor=lp), steps, args.repeats, device)
                stock = method == "none"  # keep 1: the oracle is the stock model itself, not timed twice
                keep_mask = ~visual.clone()
                keep_mask[vis_pos[kept_local.to(vis_pos.device)]] = True
                kept_positions = keep_mask.nonzero().squeeze(1)
                # wrapped and oracle alternate; the oracle runs on the unwrapped model
                wrapped_cell = (lambda: vtprune.wrap(model, wrapped_name, **options),
                                lambda: model(**inputs, logits_to_keep=1), lambda: vtprune.unwrap(model))
                times = timed_pair(wrapped_cell, None if stock else oracle_fn(model, inputs, kept_positions),
                                   args.repeats, device, warm=(True, False))
                times = times * 2 if stock else times
                prefill, oracle = (statistics.median(t) for t in times)
                oracle_decode = decode if stock else None
                if steps > 0 and not stock:
                    embeds = merged_embeds(model, inputs)[:, kept_positions]
                    kept_mask = inputs["attention_mask"][:, kept_positions]
                    try:
                        oracle_decode = decode_speed(
                            lambda n, lp: model.generate(inputs_embeds=embeds, attention_mask=kept_mask,
                                                         max_new_tokens=n, do_sample=False, logits_processor=lp),
                            steps, args.repeats, device)
                    except (ValueError, RuntimeError) as err:  # Gemma 3/4's generate takes no such inputs_embeds
                        if "inputs_embeds" not in str(err):
                            raise
                        oracle_decode = None
                row = {
                    "model": name, "method": method, "keep": 0.0 if method == "exit" else keep, "stage": "llm" if in_llm else "pre-llm",
                    "exit_layer": exit_layer, "llm_layers": n_layers, "visual_in": n_visual, "visual_out": n_final,
                    "llm_length": length - n_visual + n_final, "length": length,
                    "prefill_ms": prefill * 1000, "oracle_ms": oracle * 1000, "wrapped_vs_oracle": oracle / prefill,
                    "wrapped_vs_oracle_best": min(times[1]) / min(times[0]),
                    "decode_tok_s": decode, "oracle_decode_tok_s": oracle_decode,
                    "decode_vs_oracle": decode / oracle_decode if decode and oracle_decode else None,
                    "ideal_speedup": ideal_speedup(length, length - n_visual + n_final, n_layers, exit_layer),
                }
                if device.startswith("cuda"):
                    row["prefill_extra_gb"] = peak
                rows.append(row)
                print(json.dumps(row), flush=True)
        base = {r["model"]: r["prefill_ms"] for r in rows if r["method"] == "none"}
        for r in rows:
            if r["model"] == name:
                r["speedup_vs_unpruned"] = base[name] / r["prefill_ms"] if name in base else None  # no keep 1 asked
        model = None  # free before the next shape
    return rows


def table(rows) -> str:
    head = ("| model | method | keep | visual tokens | LLM length | prefill ms | oracle ms | oracle/wrapped speed "
            "| speedup vs keep 1 | ideal (FLOPs) | decode tok/s | oracle decode tok/s |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        method = r["method"] + (f" (L{r['exit_layer']}/{r['llm_layers']})" if r["stage"] == "llm" else "")
        lines.append(f"| {r['model']} | {method} | {r['keep']} | {r['visual_out']}/{r['visual_in']} | "
                     f"{r['llm_length']} | {r['prefill_ms']:.1f} | {r['oracle_ms']:.1f} | {r['wrapped_vs_oracle']:.3f} | "
                     f"{_times(r['speedup_vs_unpruned'])} | {r['ideal_speedup']:.2f}x | {_num(r['decode_tok_s'])} | "
                     f"{_num(r['oracle_decode_tok_s'])} |")
    return "\n".join(lines)


def _times(value):
    return "–" if value is None else f"{value:.2f}x"


def _num(value):
    return "–" if value is None else f"{value:.2f}"


def plot(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for (model, method), group in sorted({(r["model"], r["method"]): None for r in rows}.items()):
        pts = [(r["llm_length"], r["prefill_ms"]) for r in rows if r["model"] == model and r["method"] in (method, "none")]
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{model} {method}")
    ax.set_xlabel("LLM sequence length after pruning")
    ax.set_ylabel("prefill (ms)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    print(f"wrote {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(SHAPES),
                        help="comma-separated: " + ", ".join(SHAPES) + " (or tiny-<family>: a smoke test)")
    parser.add_argument("--methods", default="random,fastervlm,fastv,exit")
    parser.add_argument("--keep", default="1.0,0.5,0.25,0.11,0.05")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--full-depth", action="store_true", help="every layer (GPU); default: a few layers")
    parser.add_argument("--llm-layers", type=int, default=2)
    parser.add_argument("--vision-layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true",
                        help="under a minute: LLaVA-1.5 widths, 1 LLM and 1 tower layer, keep 1/0.1, fastervlm, "
                             "2 repeats, no decode")
    parser.add_argument("--out", default="bench_prefill", help="output prefix (.json, .md, .png)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.quick:
        args.models, args.keep, args.repeats, args.llm_layers = "llava-1.5-7b", "1.0,0.1", 2, 1
        args.methods, args.vision_layers, args.decode_tokens = "fastervlm", 1, 0
    args.models = args.models.split(",")
    args.methods = split_specs(args.methods)
    args.keep = [float(k) for k in args.keep.split(",")]
    rows = run(args)
    md = table(rows)
    print(md)
    with open(args.out + ".json", "w") as f:
        json.dump({"args": {k: v for k, v in vars(args).items()}, "rows": rows}, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(md + "\n")
    plot(rows, args.out + ".png")
    return rows


if __name__ == "__main__":
    main()
