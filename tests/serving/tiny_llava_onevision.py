"""A tiny random LLaVA-OneVision folder that both vLLM and transformers load offline (serving venv): the toy's
word-level tokenizer, a 3-layer SigLIP tower on 56-pixel tiles (4 x 4 patches of 14), anyres crops up to
112 x 112 (``anyres_max_9``, which vLLM applies whatever the config says), a Qwen2 language model whose heads
are 32 wide (vLLM's CPU attention takes no narrower) and whose rope is short-waved (so that original and
renumbered positions answer differently)."""

from __future__ import annotations

import os

PINPOINTS = [[56, 112], [112, 56], [112, 112]]


def prompt(question: str) -> str:
    from vtprune import toy

    return toy.prompt(question)


def build(folder: str, seed: int = 0) -> str:
    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        return folder
    import torch
    import transformers as tf

    from vtprune.toy import DEFAULT_PATH

    tokenizer = tf.AutoTokenizer.from_pretrained(DEFAULT_PATH)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<video>"]})
    vision = tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                   image_size=56, patch_size=14)
    text = tf.Qwen2Config(vocab_size=(len(tokenizer) + 7) // 8 * 8, hidden_size=128, intermediate_size=256,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          rope_parameters={"rope_type": "default", "rope_theta": 20.0}, initializer_range=0.2)
    config = tf.LlavaOnevisionConfig(vision_config=vision, text_config=text, image_grid_pinpoints=PINPOINTS,
                                     image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                                     video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
                                     vision_feature_layer=-1, vision_feature_select_strategy="full",
                                     vision_aspect_ratio="anyres_max_9", tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = tf.LlavaOnevisionForConditionalGeneration._from_config(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    image = tf.LlavaOnevisionImageProcessor(size={"height": 56, "width": 56}, image_grid_pinpoints=PINPOINTS)
    video = tf.LlavaOnevisionVideoProcessor(size={"height": 56, "width": 56})
    processor = tf.LlavaOnevisionProcessor(image_processor=image, video_processor=video, tokenizer=tokenizer,
                                           num_image_tokens=16, vision_feature_select_strategy="full",
                                           vision_aspect_ratio="anyres_max_9",
                                           chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    os.makedirs(folder, exist_ok=True)
    processor.save_pretrained(folder)
    model.save_pretrained(folder)
    from safetensors.torch import load_file, save_file

    from vtprune.serving import clip_keys_for_vllm

    path = os.path.join(folder, "model.safetensors")  # the SigLIP keys as vLLM (and the released checkpoints) name them
    save_file(clip_keys_for_vllm(load_file(path)), path, metadata={"format": "pt"})
    return folder
