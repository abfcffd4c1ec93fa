"""A random LLaVA-1.5-7B-shaped model folder that vLLM and transformers load offline, for serving benchmarks at real
widths without downloading weights.

    DIR/bin/python scripts/real_width_model.py OUT                     # CLIP ViT-L/14-336 + a Llama-2-7B LLM
    DIR/bin/python scripts/real_width_model.py OUT --llm-layers 4      # the same widths, 4 LLM layers (CPU)
    DIR/bin/python scripts/bench_vllm.py --model OUT --dtype bfloat16 --n 64

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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="the folder to write")
    parser.add_argument("--llm-layers", type=int, default=32, help="language-model layers (default 32, as 7B)")
    parser.add_argument("--tower-layers", type=int, default=24, help="vision-tower layers (default 24, as ViT-L)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args(argv)
    if args.llm_layers < 1 or args.tower_layers < 2:
        parser.error("--llm-layers must be >= 1 and --tower-layers >= 2 (the projector reads layer -2)")
    print(build(args.out, args.llm_layers, args.tower_layers, args.dtype))
    return 0


if __name__ == "__main__":
    sys.exit(main())
