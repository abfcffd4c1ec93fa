"""A tiny random Gemma 4 folder that both vLLM and transformers load offline (serving venv): the toy's word-level
tokenizer with Gemma 4's named tokens, a 2-layer tower of 4-pixel patches pooled 2 x 2 at the image's aspect ratio
(a budget of 70 tokens, the smallest Gemma 4 supports), a language model like the E2B's (per-layer inputs, its
last two layers reusing earlier keys and values, causal image tokens) with heads 32 wide (vLLM's CPU attention
takes no narrower) and short-waved RoPE (so that original and renumbered positions answer differently)."""

from __future__ import annotations

import os

SOFT_TOKENS = 70  # tokens per image at most


def prompt(question: str) -> str:
    return f"USER: <image>\n{question} ASSISTANT:"


def build(folder: str, seed: int = 0) -> str:
    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        return folder
    import torch
    import transformers as tf

    from vtprune.toy import DEFAULT_PATH

    named = {"image_token": "<image>", "boi_token": "<boi>", "eoi_token": "<eoi>", "video_token": "<video>",
             "audio_token": "<audio>", "boa_token": "<boa>", "eoa_token": "<eoa>"}  # (its processor asks for all)
    tokenizer = tf.AutoTokenizer.from_pretrained(DEFAULT_PATH, extra_special_tokens=named)
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in named.items()}
    rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 20.0},
            "full_attention": {"rope_type": "default", "rope_theta": 50.0}}
    text = tf.Gemma4TextConfig(vocab_size=(len(tokenizer) + 7) // 8 * 8, hidden_size=128, intermediate_size=256,
                               num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                               global_head_dim=64, layer_types=["sliding_attention", "full_attention"] * 2,
                               sliding_window=512, num_kv_shared_layers=2, hidden_size_per_layer_input=16,
                               vocab_size_per_layer_input=(len(tokenizer) + 7) // 8 * 8, rope_parameters=rope,
                               max_position_embeddings=1024, pad_token_id=0, bos_token_id=tokenizer.bos_token_id,
                               eos_token_id=tokenizer.eos_token_id, initializer_range=0.2)
    vision = tf.Gemma4VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=4, head_dim=8, patch_size=4, pooling_kernel_size=2,
                                   position_embedding_size=64, rope_parameters={"rope_type": "axial", "rope_theta": 100.0},
                                   default_output_length=SOFT_TOKENS)
    config = tf.Gemma4Config(text_config=text, vision_config=vision, audio_config=None, image_token_id=ids["image_token"],
                             video_token_id=ids["video_token"], boi_token_id=ids["boi_token"],
                             eoi_token_id=ids["eoi_token"], audio_token_id=ids["audio_token"],
                             boa_token_id=ids["boa_token"], eoa_token_index=ids["eoa_token"], tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = tf.Gemma4ForConditionalGeneration._from_config(config).eval()
    with torch.no_grad():  # attention weighs in the residual (a random model otherwise answers its last token)
        for layer in model.model.language_model.layers:
            layer.post_attention_layernorm.weight.fill_(10.0)
        # never generate a named token: transformers embeds a generated <audio> as padding, vLLM as a word
        model.model.language_model.embed_tokens.weight[list(ids.values())] = 0.0
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    image = tf.Gemma4ImageProcessor(patch_size=4, pooling_kernel_size=2, max_soft_tokens=SOFT_TOKENS)
    video = tf.Gemma4VideoProcessor(patch_size=4, pooling_kernel_size=2, max_soft_tokens=SOFT_TOKENS)
    processor = tf.Gemma4Processor(feature_extractor=tf.Gemma4AudioFeatureExtractor(), image_processor=image,
                                   video_processor=video, tokenizer=tokenizer,
                                   chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    os.makedirs(folder, exist_ok=True)
    processor.save_pretrained(folder)
    model.save_pretrained(folder)
    return folder
