"""A tiny random Gemma 3 folder that both vLLM and transformers load offline (serving venv): the toy's word-level
tokenizer with Gemma 3's named tokens and the newline runs vLLM's Gemma 3 processor looks up, a 2-layer SigLIP of
8 x 8 patches pooled 2 x 2 into 4 x 4 tokens, a sliding and a full layer with heads 32 wide (vLLM's CPU attention
takes no narrower) and short-waved RoPE (so that original and renumbered positions answer differently)."""

from __future__ import annotations

import os

TOKENS = 16  # an image's tokens (4 x 4)


def prompt(question: str) -> str:
    return f"USER: <start_of_image> {question} ASSISTANT:"


def build(folder: str, seed: int = 0) -> str:
    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        return folder
    import torch
    import transformers as tf

    from vtprune.toy import DEFAULT_PATH

    named = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    tokenizer = tf.AutoTokenizer.from_pretrained(DEFAULT_PATH, extra_special_tokens=named)
    tokenizer.add_tokens(["\n", "\n\n", "\n\n\n", "\n\n\n\n"])  # (vLLM's processor merges runs of them)
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in named.items()}
    vocab = (len(tokenizer) + 7) // 8 * 8
    rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 20.0},
            "full_attention": {"rope_type": "default", "rope_theta": 50.0}}
    text = tf.Gemma3TextConfig(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=32,
                               sliding_window=512, layer_types=["sliding_attention", "full_attention"],
                               rope_parameters=rope, max_position_embeddings=1024, pad_token_id=0,
                               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                               initializer_range=0.2)
    vision = tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   image_size=112, patch_size=14)
    config = tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=TOKENS,
                             image_token_index=ids["image_token"], boi_token_index=ids["boi_token"],
                             eoi_token_index=ids["eoi_token"], tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = tf.Gemma3ForConditionalGeneration._from_config(config).eval()
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.2)  # (initialised to zeros)
        for layer in model.model.language_model.layers:  # attention weighs in the residual
            layer.post_attention_layernorm.weight.fill_(10.0)
        model.model.language_model.embed_tokens.weight[list(ids.values())] = 0.0  # never generate a named token
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    image = tf.Gemma3ImageProcessor(size={"height": 112, "width": 112}, do_pan_and_scan=False)
    processor = tf.Gemma3Processor(image_processor=image, tokenizer=tokenizer, image_seq_length=TOKENS,
                                   chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    os.makedirs(folder, exist_ok=True)
    processor.save_pretrained(folder)
    model.save_pretrained(folder)
    from safetensors.torch import load_file, save_file

    from vtprune.serving import clip_keys_for_vllm

    path = os.path.join(folder, "model.safetensors")  # the SigLIP keys as vLLM (and the released checkpoints) name them
    save_file(clip_keys_for_vllm(load_file(path)), path, metadata={"format": "pt"})
    return folder
