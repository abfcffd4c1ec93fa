"""A tiny random LLaVA-NeXT folder that both vLLM and transformers load offline (serving venv): the toy's
word-level tokenizer, a 3-layer CLIP tower on 56-pixel tiles (4 x 4 patches of 14), anyres crops up to
112 x 112, a Llama language model whose heads are 32 wide (vLLM's CPU attention takes no narrower) and
whose rope is short-waved (so that original and renumbered positions answer differently)."""

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
    vision = tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                 image_size=56, patch_size=14)
    text = tf.LlamaConfig(vocab_size=(len(tokenizer) + 7) // 8 * 8, hidden_size=128, intermediate_size=256,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          rope_parameters={"rope_type": "default", "rope_theta": 20.0}, initializer_range=0.2)
    config = tf.LlavaNextConfig(vision_config=vision, text_config=text, image_grid_pinpoints=PINPOINTS,
                                image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
                                vision_feature_select_strategy="default", tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = tf.LlavaNextForConditionalGeneration._from_config(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    image = tf.LlavaNextImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56},
                                       image_grid_pinpoints=PINPOINTS)
    processor = tf.LlavaNextProcessor(image_processor=image, tokenizer=tokenizer, patch_size=14,
                                      vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                      chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    os.makedirs(folder, exist_ok=True)
    processor.save_pretrained(folder)
    model.save_pretrained(folder)
    from safetensors.torch import load_file, save_file

    from vtprune.serving import clip_keys_for_vllm

    path = os.path.join(folder, "model.safetensors")  # the CLIP keys as vLLM (and older transformers) name them
    save_file(clip_keys_for_vllm(load_file(path)), path, metadata={"format": "pt"})
    return folder
