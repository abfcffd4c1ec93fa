"""A random LLaVA-1.5-7B-, Qwen2.5-VL-7B- or Qwen3-VL-8B-shaped model folder that vLLM and transformers load
offline, for serving benchmarks at real widths without downloading weights.

    DIR/bin/python scripts/real_width_model.py OUT                     # CLIP ViT-L/14-336 + a Llama-2-7B LLM
    DIR/bin/python scripts/real_width_model.py OUT --llm-layers 4      # the same widths, 4 LLM layers (CPU)
    DIR/bin/python scripts/bench_vllm.py --model OUT --dtype bfloat16 --n 64
    DIR/bin/python scripts/real_width_model.py OUT --family qwen3_vl --llm-layers 4 --tower-layers 3
    DIR/bin/python scripts/bench_vllm.py --video --model OUT --dtype bfloat16 --n 32   # clips at real widths

``--family qwen3_vl`` (serving venv: Qwen's processors need torchvision): Qwen3-VL-8B's widths — a 27-layer
vision tower 1152 wide (16-pixel patches, merged 2 x 2, deepstack after layers 8, 16 and 24, spread over fewer
layers), a language model 4096 wide (32 query and 8 key-value heads of 128, MLP 12288, vocabulary 151936,
36 layers) — with the toy video model's word-level tokenizer and processors (images at 448 x 448: 196 tokens;
the toy clips' 128 x 128 frames as they are), so that toy images and clips serve as prompts.  ``--family
qwen2_5_vl``: Qwen2.5-VL-7B's (a 32-layer windowed tower 1280 wide, 14-pixel patches; a language model 3584
wide, 28 query and 4 key-value heads, MLP 18944, vocabulary 152064, 28 layers).

The widths are LLaVA-1.5-7B's: the vision tower CLIP ViT-L/14 at 336 pixels (24 layers, 1024 wide, 577 tokens,
the projector reading layer -2 without [CLS]: 576 visual tokens per image) and a Llama-2-7B language model (32
layers, 4096 wide, 32 heads, MLP 11008, vocabulary 32064).  Weights are random (answers are noise; timings and
memory are real); the tokenizer is the toy's word-level one, so the toy questions serve as prompts.
"""

from __future__ import annotations

import argparse
import os
import sys


def build(folder: str, llm_layers: int = 32, tower_layers: int = 24, dtype: str = "bfloat16", seed: int = 0,
          widths: dict | None = None) -> str:
    """Write the folder; ``widths`` overrides the language model's config fields (tests shrink it)."""
    import torch
    import transformers as tf
    from safetensors.torch import load_file, save_file

    from vtprune.serving import clip_keys_for_vllm
    from vtprune.toy import DEFAULT_PATH

    tokenizer = tf.AutoTokenizer.from_pretrained(DEFAULT_PATH)
    vision = tf.CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=tower_layers,
                                 num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
    llm = {"vocab_size": 32064, "hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
           "num_key_value_heads": 32, **(widths or {})}
    text = tf.LlamaConfig(num_hidden_layers=llm_layers, max_position_embeddings=4096,
                          pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, **llm)
    config = tf.LlavaConfig(vision_config=vision, text_config=text, vision_feature_layer=-2,
                            vision_feature_select_strategy="default", projector_hidden_act="gelu",
                            image_token_index=tokenizer.convert_tokens_to_ids("<image>"), tie_word_embeddings=False)
    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = tf.LlavaForConditionalGeneration._from_config(config, dtype=getattr(torch, dtype)).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    image = tf.CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    processor = tf.LlavaProcessor(image_processor=image, tokenizer=tokenizer, patch_size=14,
                                  vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                  chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    os.makedirs(folder, exist_ok=True)
    processor.save_pretrained(folder)
    model.to("cpu").save_pretrained(folder, max_shard_size="100GB")
    path = os.path.join(folder, "model.safetensors")  # the CLIP keys as vLLM (and older transformers) name them
    save_file(clip_keys_for_vllm(load_file(path)), path, metadata={"format": "pt"})
    return folder


QWEN = {  # (text config, vision config) at the released widths; layers set by the caller
    "qwen3_vl": (dict(hidden_size=4096, intermediate_size=12288, num_attention_heads=32, num_key_value_heads=8,
                      head_dim=128, vocab_size=151936,
                      rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                                       "mrope_interleaved": True}),
                 dict(hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096, patch_size=16,
                      spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304)),
    "qwen2_5_vl": (dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
                        vocab_size=152064,
                        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                         "mrope_section": [16, 24, 24]}),
                   dict(hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584, patch_size=14,
                        spatial_merge_size=2, temporal_patch_size=2, window_size=112, tokens_per_second=2)),
}
FULL = {"qwen3_vl": (36, 27), "qwen2_5_vl": (28, 32)}  # released (LLM, tower) depths


def build_qwen(folder: str, family: str, llm_layers: int | None = None, tower_layers: int | None = None,
               dtype: str = "bfloat16", seed: int = 0, image_side: int = 448, widths: dict | None = None) -> str:
    """A Qwen3-VL- or Qwen2.5-VL-shaped folder (``QWEN``'s widths) with the toy video model's tokenizer and
    processors; fewer layers where given (Qwen3-VL's deepstack layers and Qwen2.5-VL's full-attention blocks
    spread over them as over the released depth); ``widths`` ``{"text": {...}, "vision": {...}}`` overrides config
    fields (tests shrink it)."""
    import shutil

    import torch
    import transformers as tf

    from vtprune import toy_video as tv

    llm_layers, tower_layers = llm_layers or FULL[family][0], tower_layers or FULL[family][1]
    text, vision = (dict(part) for part in QWEN[family])
    text.update((widths or {}).get("text", {}))
    vision.update((widths or {}).get("vision", {}))
    tokenizer = tf.AutoTokenizer.from_pretrained(tv.DEFAULT_PATH)
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in
           (("vision_start_token_id", tv.VISION_START), ("vision_end_token_id", tv.VISION_END),
            ("image_token_id", tv.IMAGE_PAD), ("video_token_id", tv.VIDEO_PAD))}
    text.update(num_hidden_layers=llm_layers, max_position_embeddings=32768, pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    spread = lambda at, depth: sorted({min(tower_layers - 1, int(i * tower_layers / depth)) for i in at})  # noqa: E731
    vision["depth"] = tower_layers
    if family == "qwen3_vl":
        vision["deepstack_visual_indexes"] = spread((8, 16, 24), 27)
        config = tf.Qwen3VLConfig(text_config=text, vision_config=vision, **ids, tie_word_embeddings=False)
        model_class, processor_class = tf.Qwen3VLForConditionalGeneration, tf.Qwen3VLProcessor
        video_class = tf.Qwen3VLVideoProcessor
    else:
        vision["fullatt_block_indexes"] = spread((7, 15, 23, 31), 32)
        config = tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids, tie_word_embeddings=False)
        model_class, processor_class = tf.Qwen2_5_VLForConditionalGeneration, tf.Qwen2_5_VLProcessor
        video_class = tf.Qwen2VLVideoProcessor
    torch.manual_seed(seed)
    model = model_class._from_config(config, dtype=getattr(torch, dtype)).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    patch = vision["patch_size"]
    # images and clips normalised alike (vLLM normalises a clip as the image processor says)
    half = {"image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    image = tf.Qwen2VLImageProcessor(patch_size=patch, merge_size=2, temporal_patch_size=2,
                                     min_pixels=image_side ** 2, max_pixels=image_side ** 2, **half)
    # a toy clip's 16 frames of 128 x 128 kept as they are: 8 slices of 4 x 4 tokens (Qwen3-VL's processor bounds a
    # clip's pixels, Qwen2.5-VL's a frame's: 112 x 112, the multiple of 28 that fits); Qwen3-VL's expands a bare
    # video token (timestamps and all), Qwen2.5-VL's the one between the vision start and end tokens
    pixels = tv.FRAMES * tv.FRAME * tv.FRAME if family == "qwen3_vl" else tv.FRAME * tv.FRAME
    video_options = dict(do_sample_frames=False, fps=tv.FPS) if family == "qwen3_vl" else {}
    video = video_class(size={"shortest_edge": pixels, "longest_edge": pixels}, patch_size=patch, merge_size=2,
                        temporal_patch_size=2, **video_options, **half)
    template = tv.CHAT_TEMPLATE
    if family == "qwen3_vl":
        template = template.replace(f"{tv.VISION_START}{tv.VIDEO_PAD}{tv.VISION_END}", tv.VIDEO_PAD)
    processor = processor_class(image_processor=image, tokenizer=tokenizer, video_processor=video,
                                chat_template=template)
    os.makedirs(folder, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tv.DEFAULT_PATH, name), folder)
    processor.save_pretrained(folder)
    model.save_pretrained(folder, max_shard_size="100GB")
    return folder


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="the folder to write")
    parser.add_argument("--family", default="llava", choices=["llava", "qwen3_vl", "qwen2_5_vl"],
                        help="llava (LLaVA-1.5-7B, default), qwen3_vl (Qwen3-VL-8B) or qwen2_5_vl (Qwen2.5-VL-7B)")
    parser.add_argument("--llm-layers", type=int, default=None,
                        help="language-model layers (default the released depth: 32, 36 or 28)")
    parser.add_argument("--tower-layers", type=int, default=None,
                        help="vision-tower layers (default the released depth: 24, 27 or 32)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args(argv)
    if (args.llm_layers is not None and args.llm_layers < 1) or \
            (args.tower_layers is not None and args.tower_layers < (2 if args.family == "llava" else 1)):
        parser.error("--llm-layers must be >= 1 and --tower-layers >= 1 (LLaVA: >= 2, the projector reads layer -2)")
    if args.family != "llava":
        print(build_qwen(args.out, args.family, args.llm_layers, args.tower_layers, args.dtype))
        return 0
    print(build(args.out, args.llm_layers or 32, args.tower_layers or 24, args.dtype))
    return 0


if __name__ == "__main__":
    sys.exit(main())
