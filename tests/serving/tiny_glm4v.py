"""A tiny random GLM-4.1V folder that both vLLM and transformers load offline (serving venv: GLM's processor
needs torchvision): the toy's word-level tokenizer with GLM's image and video tokens added, a 2-layer tower of
14-pixel patches merged 2 x 2 (6 x 6 LLM tokens an image), a language model whose heads are 32 wide (vLLM's CPU
attention takes no narrower), half of each rotated, split 2/3/3 over (t, h, w) as the released model splits its
64 rotated channels 8/12/12."""

from __future__ import annotations

import os

SPECIAL = ["<|begin_of_image|>", "<|end_of_image|>", "<|image|>", "<|begin_of_video|>", "<|end_of_video|>",
           "<|video|>"]
PIXELS = 2 * (12 * 14) ** 2  # an image counts as 2 frames (the temporal patch): 12 x 12 patches


def prompt(question: str) -> str:
    return f"<|begin_of_image|><|image|><|end_of_image|>{question}"


def build(folder: str, seed: int = 0) -> str:
    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        return folder
    import torch
    import transformers as tf

    from vtprune.toy import DEFAULT_PATH

    tokenizer = tf.AutoTokenizer.from_pretrained(DEFAULT_PATH)
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL})
    names = ("image_start_token_id", "image_end_token_id", "image_token_id", "video_start_token_id",
             "video_end_token_id", "video_token_id")
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in zip(names, SPECIAL)}
    vocab = (len(tokenizer) + 7) // 8 * 8
    text = dict(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                 "mrope_section": [2, 3, 3]})
    vision = dict(depth=2, hidden_size=32, out_hidden_size=128, intermediate_size=256, num_heads=4, patch_size=14,
                  image_size=112, spatial_merge_size=2, temporal_patch_size=2)
    config = tf.Glm4vConfig(text_config=text, vision_config=vision, **ids, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = tf.Glm4vForConditionalGeneration._from_config(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    size = {"shortest_edge": PIXELS, "longest_edge": PIXELS}
    image = tf.Glm4vImageProcessor(size=size, patch_size=14, merge_size=2, temporal_patch_size=2)
    video = tf.Glm4vVideoProcessor(size=size, patch_size=14, merge_size=2, temporal_patch_size=2)
    processor = tf.Glm4vProcessor(image_processor=image, tokenizer=tokenizer, video_processor=video,
                                  chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    os.makedirs(folder, exist_ok=True)
    processor.save_pretrained(folder)
    model.save_pretrained(folder)
    return folder
