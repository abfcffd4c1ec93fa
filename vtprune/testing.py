"""Tiny random models of every supported family, and inputs for them.

They build in well under a second on a CPU, so tests (ours and users') can exercise every
family without downloading weights.  Sizes follow the notes in the developers' guide:
a 2-layer text model (hidden 32, 4 heads, 2 KV heads, vocab 128) and a 2–3 layer vision tower.
"""

from __future__ import annotations

import torch

FAMILIES = ("llava", "llava_next", "internvl", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "gemma3",
            "llava_onevision", "glm4v", "gemma4")

IMAGE_TOKEN = 100
VIDEO_TOKEN = 101
VISION_START = 120
VISION_END = 121
PAD = 0
BOS = 1
EOS = 2

_TEXT = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    pad_token_id=PAD,
    bos_token_id=BOS,
    eos_token_id=EOS,
)
SLIDING_WINDOW = 512  # Gemma 3's: longer than the tiny prompts (``tiny_model(..., sliding_window=w)`` sets another)
_QWEN_ROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}


GEMMA4_PATCHES = 64  # a tiny Gemma 4 image's patch budget: every image padded to it, as its processor pads


def tiny_config(family: str, **text):
    """Config of a tiny random model of ``family`` (one of ``FAMILIES``); ``text``: Gemma 4 text-config
    settings (``num_hidden_layers``: sliding and full layers alternate, the last full;
    ``num_kv_shared_layers``; ``hidden_size_per_layer_input``: 0 for none; ``use_bidirectional_attention``)."""
    import transformers as tf

    if family == "gemma4":  # 4 x 4-pixel patches pooled 2 x 2 at the image's aspect ratio; per-layer inputs of width 8
        layers = text.pop("num_hidden_layers", 2)
        settings = dict(_TEXT, head_dim=8, global_head_dim=16, sliding_window=SLIDING_WINDOW, num_hidden_layers=layers,
                        layer_types=["full_attention" if (layers - i) % 2 == 1 else "sliding_attention"
                                     for i in range(layers)],
                        vocab_size_per_layer_input=_TEXT["vocab_size"], hidden_size_per_layer_input=8,
                        use_bidirectional_attention="vision")
        settings.update(text)
        vision = tf.Gemma4VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=4, head_dim=8, patch_size=4, pooling_kernel_size=2,
                                       position_embedding_size=32, rope_parameters={"rope_type": "axial",
                                                                                    "rope_theta": 100.0})
        return tf.Gemma4Config(text_config=tf.Gemma4TextConfig(**settings), vision_config=vision, audio_config=None,
                               image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, audio_token_id=102,
                               boi_token_id=110, eoi_token_id=111, boa_token_id=112, eoa_token_index=113)
    if text:
        raise ValueError(f"text-config settings are for gemma4, not {family}")

    if family in ("llava", "llava_next", "llava_next_video"):
        vision = tf.CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            image_size=56, patch_size=14,
        )
        common = dict(
            vision_config=vision, text_config=tf.LlamaConfig(**_TEXT), image_token_index=IMAGE_TOKEN,
            image_seq_length=16, vision_feature_layer=-2, vision_feature_select_strategy="default",
        )
        if family == "llava":
            return tf.LlavaConfig(**common)
        pinpoints = [[56, 112], [112, 56], [112, 112]]
        if family == "llava_next_video":
            common["text_config"] = tf.LlamaConfig(**_TEXT).to_dict()
            common["vision_config"] = vision.to_dict()
            return tf.LlavaNextVideoConfig(**common, image_grid_pinpoints=pinpoints, video_token_index=VIDEO_TOKEN,
                                           spatial_pool_stride=2, spatial_pool_mode="average")
        return tf.LlavaNextConfig(**common, image_grid_pinpoints=pinpoints)
    if family == "gemma3":  # 8 x 8 SigLIP patches pooled 2 x 2 into 4 x 4 tokens; a sliding and a full layer
        vision = tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       image_size=112, patch_size=14)
        text = tf.Gemma3TextConfig(**_TEXT, head_dim=8, query_pre_attn_scalar=8, sliding_window=SLIDING_WINDOW,
                                   layer_types=["sliding_attention", "full_attention"])
        return tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=16,
                               image_token_index=IMAGE_TOKEN, boi_token_index=110, eoi_token_index=111)
    if family == "llava_onevision":  # 4 x 4 SigLIP patches a tile; crops past 2 tiles' worth are interpolated
        vision = tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                       image_size=56, patch_size=14)
        return tf.LlavaOnevisionConfig(vision_config=vision, text_config=tf.Qwen2Config(**_TEXT),
                                       image_token_index=IMAGE_TOKEN, video_token_index=VIDEO_TOKEN,
                                       vision_feature_layer=-1, vision_feature_select_strategy="full",
                                       image_grid_pinpoints=[[56, 112], [112, 56], [112, 112]],
                                       vision_aspect_ratio="anyres_max_2")
    if family == "internvl":
        vision = tf.InternVLVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            image_size=56, patch_size=14,
        )
        return tf.InternVLConfig(
            vision_config=vision, text_config=tf.Qwen2Config(**_TEXT), image_token_id=IMAGE_TOKEN,
            image_seq_length=4, downsample_ratio=0.5,
        )
    ids = dict(image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN,
               vision_start_token_id=VISION_START, vision_end_token_id=VISION_END)
    if family == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2)
        return tf.Qwen2VLConfig(text_config=dict(**_TEXT, rope_parameters=_QWEN_ROPE), vision_config=vision, **ids)
    if family == "qwen2_5_vl":
        vision = dict(depth=2, hidden_size=32, out_hidden_size=32, intermediate_size=64, num_heads=4,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                      fullatt_block_indexes=[1])
        return tf.Qwen2_5_VLConfig(text_config=dict(**_TEXT, rope_parameters=_QWEN_ROPE), vision_config=vision, **ids)
    if family in ("qwen3_vl", "qwen3_vl_moe"):
        rope = dict(_QWEN_ROPE, mrope_interleaved=True)
        vision = dict(depth=2, hidden_size=32, out_hidden_size=32, intermediate_size=64, num_heads=4,
                      patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16,
                      deepstack_visual_indexes=[0])
        text = dict(**_TEXT, head_dim=8, rope_parameters=rope)
        if family == "qwen3_vl_moe":  # 4 experts of width 16, 2 per token, every layer sparse
            return tf.Qwen3VLMoeConfig(text_config=dict(text, num_experts=4, num_experts_per_tok=2,
                                                        moe_intermediate_size=16, decoder_sparse_step=1),
                                       vision_config=vision, **ids)
        return tf.Qwen3VLConfig(text_config=text, vision_config=vision, **ids)
    if family in ("qwen3_5", "qwen3_5_moe"):  # a linear-attention layer, then a full-attention one
        rope = dict(_QWEN_ROPE, mrope_interleaved=True, partial_rotary_factor=0.5)
        text = dict(**_TEXT, head_dim=16, rope_parameters=rope, layer_types=["linear_attention", "full_attention"],
                    linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
                    linear_num_value_heads=4)
        vision = dict(depth=2, hidden_size=32, out_hidden_size=32, intermediate_size=64, num_heads=4, patch_size=16,
                      spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16)
        if family == "qwen3_5_moe":  # 4 experts of width 16, 2 per token, and a shared one
            text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                        shared_expert_intermediate_size=16)
            return tf.Qwen3_5MoeConfig(text_config=text, vision_config=vision, **ids)
        return tf.Qwen3_5Config(text_config=text, vision_config=vision, **ids)
    if family == "glm4v":  # the whole 8-wide head rotated (GLM rotates half of a 128-wide one), split 2/1/1 over t, h, w
        vision = dict(depth=2, hidden_size=32, out_hidden_size=32, intermediate_size=64, num_heads=4, patch_size=14,
                      image_size=112, spatial_merge_size=2, temporal_patch_size=2)
        rope = dict(_QWEN_ROPE, partial_rotary_factor=1.0)
        return tf.Glm4vConfig(text_config=dict(**_TEXT, rope_parameters=rope), vision_config=vision,
                              image_start_token_id=VISION_START, image_end_token_id=VISION_END,
                              video_start_token_id=110, video_end_token_id=111, **ids)
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


_CLASSES = {
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "llava_next_video": "LlavaNextVideoForConditionalGeneration",
    "internvl": "InternVLForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
    "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration",
    "gemma3": "Gemma3ForConditionalGeneration",
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
    "glm4v": "Glm4vForConditionalGeneration",
    "qwen3_5": "Qwen3_5ForConditionalGeneration",
    "qwen3_5_moe": "Qwen3_5MoeForConditionalGeneration",
    "gemma4": "Gemma4ForConditionalGeneration",
}


def tiny_model(family: str, seed: int = 0, attn_implementation: str = "sdpa", llm_layers: int | None = None,
               dtype: torch.dtype | None = None, sliding_window: int | None = None):
    """A tiny random ``*ForConditionalGeneration`` of ``family`` in eval mode, fp32 unless ``dtype`` says
    otherwise (``llm_layers``: decoder layers of its language model, default 2; ``sliding_window``: that of
    its sliding-window layers, Gemma 3).  In float64 a mixture-of-experts model runs its experts one by one
    (torch's grouped matmul takes no float64)."""
    import transformers as tf

    config = tiny_config(family, **({} if family != "gemma4" or llm_layers is None else {"num_hidden_layers": llm_layers}))
    if sliding_window is not None:
        config.get_text_config().sliding_window = sliding_window
    if llm_layers is not None and family != "gemma4":
        text = config.get_text_config()
        text.num_hidden_layers = llm_layers
        if getattr(text, "layer_types", None) is not None:
            text.layer_types = [text.layer_types[0]] * llm_layers
    torch.manual_seed(seed)
    model = getattr(tf, _CLASSES[family])._from_config(config, attn_implementation=attn_implementation)
    if family == "gemma3":  # Gemma 3 initialises its projection to zeros: every image would be the same zeros
        torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=0.05)
    if dtype is not None:
        model = model.to(dtype)
        if dtype == torch.float64 and family.endswith("_moe"):
            model.set_experts_implementation("eager")
    return model.eval()


# --------------------------------------------------------------------------------------- inputs
# An "image" below is a spec: an int size for LLaVA-NeXT (the (h, w) passed as image_sizes),
# a tile count for InternVL, an (h, w) patch grid for Qwen, and ignored for LLaVA and Gemma 3.

_DEFAULT_IMAGE = {
    "llava": None, "llava_next": (50, 100), "llava_next_video": (50, 100), "internvl": 3,
    "qwen2_vl": (8, 8), "qwen2_5_vl": (8, 8), "qwen3_vl": (8, 8), "qwen3_vl_moe": (8, 8), "gemma3": None,
    "llava_onevision": (50, 100), "glm4v": (8, 8), "qwen3_5": (8, 8), "qwen3_5_moe": (8, 8),
    "gemma4": (8, 8),
}


def _pixels(family, config, spec, gen):
    if family in ("llava", "gemma3"):
        size = config.vision_config.image_size
        return {"pixel_values": torch.randn(1, 3, size, size, generator=gen)}
    if family in ("llava_next", "llava_next_video", "llava_onevision"):
        return {"pixel_values": torch.randn(1, 5, 3, 56, 56, generator=gen), "image_sizes": torch.tensor([spec])}
    if family == "internvl":
        return {"pixel_values": torch.randn(spec, 3, 56, 56, generator=gen)}
    if family == "gemma4":  # (h, w) patches in raster order with their (x, y), padded to the budget with (-1, -1)
        h, w = spec
        p = config.vision_config.patch_size
        pixels = torch.zeros(1, GEMMA4_PATCHES, 3 * p * p)
        pixels[0, :h * w] = torch.rand(h * w, 3 * p * p, generator=gen)
        x, y = torch.meshgrid(torch.arange(w), torch.arange(h), indexing="xy")
        positions = torch.full((1, GEMMA4_PATCHES, 2), -1, dtype=torch.long)
        positions[0, :h * w] = torch.stack([x, y], -1).reshape(-1, 2)
        return {"pixel_values": pixels, "image_position_ids": positions}
    v = config.vision_config
    h, w = spec
    dim = 3 * v.temporal_patch_size * v.patch_size**2
    return {"pixel_values": torch.randn(h * w, dim, generator=gen), "image_grid_thw": torch.tensor([[1, h, w]])}


def _n_image_tokens(model, family, pix):
    if family == "llava":
        return model.config.image_seq_length
    if family == "gemma3":
        return model.config.mm_tokens_per_image
    if family == "internvl":
        return model.config.image_seq_length * pix["pixel_values"].shape[0]
    if family == "gemma4":
        return int((pix["image_position_ids"] >= 0).all(-1).sum()) // model.config.vision_config.pooling_kernel_size**2
    if family in ("llava_next", "llava_next_video", "llava_onevision"):
        with torch.no_grad():
            out = model.model.get_image_features(pixel_values=pix["pixel_values"], image_sizes=pix["image_sizes"])
        return out.pooler_output[0].shape[0]
    grid = pix["image_grid_thw"][0]
    return int(grid.prod()) // model.config.vision_config.spatial_merge_size**2


def _merge_pixels(family, parts):
    if not parts:
        return {}
    out = {}
    for key in parts[0]:
        out[key] = torch.cat([p[key] for p in parts], 0)
    return out


VIDEO_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "llava_next_video", "llava_onevision", "gemma4")
# families whose linear-attention layers read every token: their reference is the stock model fed only the kept
# tokens, not the masked one (tests/test_qwen3_5.py); images and videos
KEPT_ONLY_FAMILIES = ("qwen3_5", "qwen3_5_moe")
DEFAULT_VIDEO = {"qwen2_vl": (3, 4, 6), "qwen2_5_vl": (3, 4, 6), "qwen3_vl": (3, 4, 6), "qwen3_vl_moe": (3, 4, 6),
                 "qwen3_5": (3, 4, 6), "qwen3_5_moe": (3, 4, 6),  # (t, h, w) patches: 3 x 2 x 3
                 "llava_next_video": 3, "llava_onevision": 3,  # frames of 2 x 2 pooled tokens
                 "gemma4": (3, 4, 6)}  # (frames, h, w) patches: 3 frames of 2 x 3 pooled tokens


def _video_pixels(family, config, spec, gen):
    if family == "gemma4":  # each frame as an image of (h, w) patches; the clip's frame count beside
        t, h, w = spec
        frames = [_pixels(family, config, (h, w), gen) for _ in range(t)]
        pixels = torch.cat([f["pixel_values"] for f in frames])
        positions = torch.cat([f["image_position_ids"] for f in frames])
        if not _frames_apart():  # transformers < 5.19: [clips, frames, patches, ...]
            return {"pixel_values_videos": pixels[None], "video_position_ids": positions[None]}
        return {"pixel_values_videos": pixels, "video_position_ids": positions, "num_frames_per_video": torch.tensor([t])}
    if family in ("llava_next_video", "llava_onevision"):
        size = config.vision_config.image_size
        return {"pixel_values_videos": torch.randn(1, spec, 3, size, size, generator=gen)}
    v = config.vision_config
    t, h, w = spec
    dim = 3 * v.temporal_patch_size * v.patch_size**2
    return {"pixel_values_videos": torch.randn(t * h * w, dim, generator=gen), "video_grid_thw": torch.tensor([spec])}


def _frames_apart() -> bool:
    """Whether the installed Gemma 4 takes a batch's video frames in one row each, with each clip's frame count."""
    import inspect

    import transformers as tf

    return "num_frames_per_video" in inspect.signature(tf.Gemma4Model.get_video_features).parameters


def _video_ids(family, config, spec, gen) -> list:
    """A clip's prompt tokens: Qwen3-VL puts a timestamp (here two text tokens) and its own start/end
    around every temporal slice; Qwen2/2.5-VL one start/end around the clip; LLaVA-NeXT-Video the frames'
    pooled tokens one after another."""
    if family == "llava_next_video":
        side = config.vision_config.image_size // config.vision_config.patch_size // config.spatial_pool_stride
        return [110] + [VIDEO_TOKEN] * (spec * side * side) + [111]
    if family == "llava_onevision":  # frames of halved grids, one newline after the last
        side = -(-config.vision_config.image_size // config.vision_config.patch_size // 2)
        return [110] + [VIDEO_TOKEN] * (spec * side * side + 1) + [111]
    t, h, w = spec
    if family == "gemma4":  # per frame: a timestamp (two text tokens), then the frame's tokens between boi and eoi
        k = config.vision_config.pooling_kernel_size
        ids = []
        for _ in range(t):
            ids += torch.randint(3, 90, (2,), generator=gen).tolist() + [110] + [VIDEO_TOKEN] * (h * w // k**2) + [111]
        return ids
    per_frame = (h // config.vision_config.spatial_merge_size) * (w // config.vision_config.spatial_merge_size)
    if family in ("qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe"):
        ids = []
        for _ in range(t):
            ids += torch.randint(3, 90, (2,), generator=gen).tolist() + [VISION_START] + [VIDEO_TOKEN] * per_frame \
                + [VISION_END]
        return ids
    return [VISION_START] + [VIDEO_TOKEN] * (t * per_frame) + [VISION_END]


def tiny_inputs(model, family: str, images_per_row=(1,), text_lens=None, image_specs=None, seed: int = 0,
                with_mask: bool = True, videos_per_row=None, video_specs=None):
    """Left-padded inputs for ``model``: row ``b`` holds ``images_per_row[b]`` images, then
    ``videos_per_row[b]`` videos (Qwen families; default none).

    ``text_lens[b]`` is the number of plain text tokens before the first image (default varies per
    row so that a batch is left padded). ``image_specs`` gives one spec per image in row-major order,
    ``video_specs`` one per video: a ``(temporal, h, w)`` patch grid (Qwen), a frame count (LLaVA-NeXT-Video, LLaVA-OneVision);
    default ``DEFAULT_VIDEO``.
    Returns the kwargs for ``model(**inputs)`` / ``model.generate(**inputs)``.
    """
    gen = torch.Generator().manual_seed(seed)
    config = model.config
    n_images = sum(images_per_row)
    videos_per_row = tuple(videos_per_row or (0,) * len(images_per_row))
    if len(videos_per_row) != len(images_per_row):
        raise ValueError("videos_per_row needs one count per row, as images_per_row")
    if any(videos_per_row) and family not in VIDEO_FAMILIES + KEPT_ONLY_FAMILIES:
        raise ValueError(f"tiny video inputs are built for {', '.join(VIDEO_FAMILIES + KEPT_ONLY_FAMILIES)}, not {family}")
    if image_specs is None:
        image_specs = [_DEFAULT_IMAGE[family]] * n_images
    if video_specs is None:
        video_specs = [DEFAULT_VIDEO.get(family)] * sum(videos_per_row)
    pix_parts = [_pixels(family, config, spec, gen) for spec in image_specs]
    counts = [_n_image_tokens(model, family, p) for p in pix_parts]
    if text_lens is None:
        text_lens = [3 + 2 * b for b in range(len(images_per_row))]
    rows, k, v = [], 0, 0
    for b, n_img in enumerate(images_per_row):
        ids = [BOS] + torch.randint(3, 90, (text_lens[b],), generator=gen).tolist()
        for _ in range(n_img):
            start, end = (VISION_START, VISION_END) if _mrope(family) else (110, 111)
            ids += [start] + [IMAGE_TOKEN] * counts[k] + [end]
            ids += torch.randint(3, 90, (2,), generator=gen).tolist()
            k += 1
        for _ in range(videos_per_row[b]):
            ids += _video_ids(family, config, video_specs[v], gen) + torch.randint(3, 90, (2,), generator=gen).tolist()
            v += 1
        ids += torch.randint(3, 90, (3,), generator=gen).tolist()
        rows.append(ids)
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for b, r in enumerate(rows):
        input_ids[b, length - len(r):] = torch.tensor(r)
        mask[b, length - len(r):] = 1
    inputs = {"input_ids": input_ids}
    if with_mask:
        inputs["attention_mask"] = mask
    inputs.update(_merge_pixels(family, pix_parts))
    inputs.update(_merge_pixels(family, [_video_pixels(family, config, spec, gen) for spec in video_specs]))
    if family == "gemma3":  # what its processor returns: 1 on image tokens (they attend both ways within an image)
        inputs["token_type_ids"] = (input_ids == IMAGE_TOKEN).long()
    if _mrope(family) or family == "gemma4":
        inputs["mm_token_type_ids"] = (input_ids == IMAGE_TOKEN).int() + 2 * (input_ids == VIDEO_TOKEN).int()
    return inputs


def _mrope(family: str) -> bool:
    """Qwen-style (t, h, w) positions, numbered from ``mm_token_type_ids`` (Qwen, GLM-4.1V)."""
    from vtprune import families

    return families.get(family).positions == "mrope"


def disk_offload_map(model, disk) -> dict:
    """An accelerate ``device_map`` with the modules named in ``disk`` on "disk" and every largest
    subtree without one on "cpu" (the map must name each module that holds parameters directly)."""
    out = {}

    def visit(module, name):
        if name in disk:
            out[name] = "disk"
        elif not any(d.startswith(name + ".") or not name for d in disk):
            out[name] = "cpu"
        else:
            if any(True for _ in module.parameters(recurse=False)):
                raise ValueError(f"{name} holds parameters and contains offloaded modules: offload it whole")
            for child, sub in module.named_children():
                visit(sub, f"{name}.{child}" if name else child)

    visit(model, "")
    missing = set(disk) - set(out)
    if missing:
        raise ValueError(f"no such modules: {sorted(missing)}")
    return out
