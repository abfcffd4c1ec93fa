"""A tiny random Qwen2-VL, Qwen2.5-VL or Qwen3-VL (dense or MoE) folder that both vLLM and transformers load offline
(serving venv: it needs torchvision for Qwen's image processor): the toy's word-level tokenizer with Qwen's
vision tokens added, a language model whose heads are 32 wide (vLLM's CPU attention takes no narrower),
6 x 6 image tokens."""

from __future__ import annotations

import os

PATCH = {"qwen2_vl": 14, "qwen2_5_vl": 14, "qwen3_vl": 16, "qwen3_vl_moe": 16, "qwen3_5": 16}  # 12 x 12 patches, merged 2 x 2: 6 x 6 LLM tokens
SPECIAL = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def prompt(question: str) -> str:
    return f"<|vision_start|><|image_pad|><|vision_end|>{question}"


def build(folder: str, model_type: str = "qwen2_5_vl", seed: int = 0) -> str:
    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        return folder
    import torch
    import transformers as tf

    from vtprune.toy import DEFAULT_PATH

    tokenizer = tf.AutoTokenizer.from_pretrained(DEFAULT_PATH)
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL})
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in
           zip(("vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id"), SPECIAL)}
    vocab = (len(tokenizer) + 7) // 8 * 8
    text = dict(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 4, 4]})
    patch = PATCH[model_type]
    if model_type in ("qwen3_vl", "qwen3_vl_moe"):
        text["rope_parameters"] = dict(text["rope_parameters"], mrope_interleaved=True)
        vision = dict(depth=2, hidden_size=32, out_hidden_size=128, intermediate_size=64, num_heads=4, patch_size=16,
                      spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16,
                      deepstack_visual_indexes=[0])
        model_class, processor_class = tf.Qwen3VLForConditionalGeneration, tf.Qwen3VLProcessor
        config_class = tf.Qwen3VLConfig
        if model_type == "qwen3_vl_moe":  # 4 experts of width 32, 2 per token (transformers always renormalises
            # the top 2's weights; vLLM reads that from norm_topk_prob, which transformers' config lacks)
            text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1,
                        norm_topk_prob=True)
            model_class, config_class = tf.Qwen3VLMoeForConditionalGeneration, tf.Qwen3VLMoeConfig
        config = config_class(text_config=dict(text, head_dim=32), vision_config=vision, **ids,
                              tie_word_embeddings=False)
    elif model_type == "qwen3_5":  # a linear-attention (Gated DeltaNet) layer, then a full-attention one
        rope = dict(text["rope_parameters"], mrope_interleaved=True, partial_rotary_factor=0.5, mrope_section=[4, 2, 2])
        vision = dict(depth=2, hidden_size=32, out_hidden_size=128, intermediate_size=64, num_heads=4, patch_size=16,
                      spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16)
        text = dict(text, head_dim=32, rope_parameters=rope, layer_types=["linear_attention", "full_attention"],
                    linear_conv_kernel_dim=4, linear_key_head_dim=128, linear_value_head_dim=128, linear_num_key_heads=2,
                    linear_num_value_heads=4)
        config = tf.Qwen3_5Config(text_config=text, vision_config=vision, **ids, tie_word_embeddings=False)
        model_class, processor_class = tf.Qwen3_5ForConditionalGeneration, tf.Qwen3VLProcessor
    elif model_type == "qwen2_5_vl":
        vision = dict(depth=2, hidden_size=32, out_hidden_size=128, intermediate_size=64, num_heads=4, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1])
        config = tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids, tie_word_embeddings=False)
        model_class, processor_class = tf.Qwen2_5_VLForConditionalGeneration, tf.Qwen2_5_VLProcessor
    else:
        vision = dict(depth=2, embed_dim=32, hidden_size=128, num_heads=4, mlp_ratio=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2)
        config = tf.Qwen2VLConfig(text_config=text, vision_config=vision, **ids, tie_word_embeddings=False)
        model_class, processor_class = tf.Qwen2VLForConditionalGeneration, tf.Qwen2VLProcessor
    torch.manual_seed(seed)
    model = model_class._from_config(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    pixels = (12 * patch) ** 2
    # Qwen3-VL's processors normalise images and clips alike (to [-1, 1]); vLLM normalises a clip as the image
    # processor says, so the two must agree for a clip to read the same in both engines (the Qwen3-VL folders serve
    # clips in the tests; Qwen3.5's bf16 test keeps the images it was written on)
    half = {"image_mean": [0.5] * 3, "image_std": [0.5] * 3} if model_type in ("qwen3_vl", "qwen3_vl_moe") else {}
    image = tf.Qwen2VLImageProcessor(min_pixels=pixels, max_pixels=pixels, patch_size=patch, merge_size=2,
                                     temporal_patch_size=2, **half)
    video_class = tf.Qwen3VLVideoProcessor if model_type.startswith("qwen3") else tf.Qwen2VLVideoProcessor
    video = video_class(min_pixels=pixels, max_pixels=pixels, patch_size=patch, merge_size=2, temporal_patch_size=2)
    processor = processor_class(image_processor=image, tokenizer=tokenizer, video_processor=video,
                                       chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    os.makedirs(folder, exist_ok=True)
    processor.save_pretrained(folder)
    model.save_pretrained(folder)
    if model_type == "qwen3_vl_moe":  # the released checkpoints' expert layout ([experts, in, out]), which vLLM
        # reads; transformers saves its own ([experts, out, in]) and loads both (the tiny sizes keep them apart)
        from safetensors.torch import load_file, save_file

        path = os.path.join(folder, "model.safetensors")
        weights = {k: (v.transpose(-1, -2).contiguous() if ".mlp.experts." in k else v)
                   for k, v in load_file(path).items()}
        save_file(weights, path, metadata={"format": "pt"})
    return folder
