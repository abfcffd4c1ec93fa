"""Cost of the [CLS]-attention scores as a fraction of the vision-tower forward.

    python scripts/bench_scoring.py [--device cuda] [--repeats 5]

Times the vision tower alone (``get_image_features``) of random-weight towers at real sizes —
CLIP-L/336 (LLaVA-1.5: 577 tokens, 24 layers), InternViT-300M (InternVL3: 1,025 tokens per tile,
24 layers) and the Qwen2.5-VL tower (32 blocks, 1,296 patches; ``--qwen-blocks`` to shorten on a
CPU) — with and without the hooks a wrapped model installs for ``fastervlm`` (one layer),
``vtc_cls`` (every layer from -8 to the feature layer) and ``fastervlm source=received``, and
prints the overhead in percent (target: <= 3% for fastervlm).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import vtprune
from vtprune.methods import ScoreContext  # noqa: F401  (keeps the registry loaded)


def towers(qwen_blocks):
    import transformers as tf

    clip = tf.LlavaConfig(
        vision_config=tf.CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                          num_attention_heads=16, image_size=336, patch_size=14),
        text_config=tf.LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=2), image_token_index=999, image_seq_length=576)
    intern = tf.InternVLConfig(
        vision_config=tf.InternVLVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                              num_attention_heads=16, image_size=448, patch_size=14),
        text_config=tf.Qwen2Config(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1), image_token_id=999,
        image_seq_length=256, vision_feature_layer=-1)
    qwen = tf.Qwen2_5_VLConfig(
        text_config=dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]}),
        vision_config=dict(depth=qwen_blocks, hidden_size=1280, out_hidden_size=64, intermediate_size=3420,
                           num_heads=16, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[i for i in (7, 15, 23, 31) if i < qwen_blocks] or [qwen_blocks - 1]),
        image_token_id=999, video_token_id=998, vision_start_token_id=997, vision_end_token_id=996)
    gen = torch.Generator().manual_seed(0)
    return [
        ("CLIP-L/336 (LLaVA-1.5)", tf.LlavaForConditionalGeneration, clip,
         {"pixel_values": torch.randn(1, 3, 336, 336, generator=gen)}),
        ("InternViT-300M, 1 tile (InternVL3)", tf.InternVLForConditionalGeneration, intern,
         {"pixel_values": torch.randn(1, 3, 448, 448, generator=gen)}),
        (f"Qwen2.5-VL tower, {qwen_blocks} blocks", tf.Qwen2_5_VLForConditionalGeneration, qwen,
         {"pixel_values": torch.randn(36 * 36, 1176, generator=gen), "image_grid_thw": torch.tensor([[1, 36, 36]])}),
    ]


def timed(fn, repeats):
    """Median seconds of ``repeats`` calls after one warm-up call."""
    with torch.no_grad():
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--qwen-blocks", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--towers", default="clip,internvit,qwen", help="comma-separated subset of clip,internvit,qwen")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| tower | method | tower ms | with scoring ms | overhead |")
    print("|---|---|---|---|---|")
    chosen = args.towers.split(",")
    for key, (name, cls, config, pixels) in zip(("clip", "internvit", "qwen"), towers(args.qwen_blocks)):
        if key not in chosen:
            continue
        torch.manual_seed(0)
        model = cls._from_config(config, attn_implementation="sdpa").to(args.device).eval()
        pixels = {k: v.to(args.device) for k, v in pixels.items()}

        def tower():
            model.model.get_image_features(**pixels)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()

        for method, options in (("fastervlm", {}), ("vtc_cls", {}), ("fastervlm", {"source": "received"})):
            base_times, hooked_times = [], []
            for _ in range(args.repeats):  # interleaved, so drift and warm-up hit both alike
                base_times.append(timed(tower, 1))
                with vtprune.wrapped(model, method, keep=0.1, **options):
                    hooked_times.append(timed(tower, 1))
            base, hooked = statistics.median(base_times), statistics.median(hooked_times)
            label = method + (" source=received" if options else "")
            print(f"| {name} | {label} | {base * 1000:.1f} | {hooked * 1000:.1f} | {100 * (hooked / base - 1):+.1f}% |",
                  flush=True)
        del model


if __name__ == "__main__":
    main()
