"""A tiny random InternVL (HF format) folder that both vLLM and transformers load offline (serving venv):
the toy's word-level tokenizer with InternVL's image tokens added, a Qwen2 language model whose heads are
32 wide (vLLM's CPU attention takes no narrower), one 112-pixel tile per image: 8 x 8 patches, pixel
shuffled to 4 x 4 = 16 LLM tokens."""

from __future__ import annotations

import os

TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
          "video_token": "<video>"}


def prompt(question: str) -> str:
    return f"<IMG_CONTEXT>\n{question}"


def build(folder: str, seed: int = 0) -> str:
    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        return folder
    import torch
    import transformers as tf

    from vtprune.toy import DEFAULT_PATH

    tokenizer = tf.AutoTokenizer.from_pretrained(DEFAULT_PATH, extra_special_tokens=TOKENS)
    vocab = (len(tokenizer) + 7) // 8 * 8
    text = tf.Qwen2Config(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                          pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id,
                          rope_parameters={"rope_type": "default", "rope_theta": 20.0})  # positions weigh much
    vision = tf.InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     image_size=112, patch_size=14, use_qk_norm=True)  # the tap reads the normed q/k
    config = tf.InternVLConfig(vision_config=vision, text_config=text, downsample_ratio=0.5, image_seq_length=16,
                               image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
                               tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = tf.InternVLForConditionalGeneration._from_config(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    image = tf.GotOcr2ImageProcessor(size={"height": 112, "width": 112}, crop_to_patches=False)
    video = tf.InternVLVideoProcessor(size={"height": 112, "width": 112})
    processor = tf.InternVLProcessor(image_processor=image, tokenizer=tokenizer, video_processor=video,
                                     image_seq_length=16,
                                     chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    os.makedirs(folder, exist_ok=True)
    processor.save_pretrained(folder)
    model.save_pretrained(folder)
    return folder
