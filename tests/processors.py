"""Offline processors of the dynamic-resolution families (no hub, no torchvision), for tests."""

from __future__ import annotations

SPECIALS = ["<unk>", "<pad>", "<s>", "</s>", "<image>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>",
            "<|video_pad|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]


def _tokenizer(**extra):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + ["describe", "this", "image", "?"])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>", **extra)
    tok.add_special_tokens({"additional_special_tokens": SPECIALS[4:]})
    return tok


def _no_video(cls):
    class NoVideo(cls):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    NoVideo.__name__ = cls.__name__  # the family is read from the class name
    return NoVideo


def processor(family: str):
    import transformers as t

    if family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        patch = 16 if family == "qwen3_vl" else 14
        ip = t.Qwen2VLImageProcessorPil(min_pixels=(2 * patch) ** 2 * 4, max_pixels=(2 * patch) ** 2 * 256,
                                        patch_size=patch, merge_size=2, temporal_patch_size=2)
        cls = {"qwen2_vl": t.Qwen2VLProcessor, "qwen2_5_vl": t.Qwen2_5_VLProcessor, "qwen3_vl": t.Qwen3VLProcessor}
        return _no_video(cls[family])(image_processor=ip, tokenizer=_tokenizer())
    if family == "internvl":
        tok = _tokenizer(extra_special_tokens={"start_image_token": "<img>", "end_image_token": "</img>",
                                               "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"})
        ip = t.GotOcr2ImageProcessorPil(size={"height": 56, "width": 56}, crop_to_patches=True, max_patches=12)
        return _no_video(t.InternVLProcessor)(image_processor=ip, tokenizer=tok, image_seq_length=4)
    if family == "llava_next":
        ip = t.LlavaNextImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56},
                                          image_grid_pinpoints=[[56, 112], [112, 56], [112, 112], [112, 168],
                                                                [168, 112], [168, 168]])
        return t.LlavaNextProcessor(image_processor=ip, tokenizer=_tokenizer(), patch_size=14,
                                    vision_feature_select_strategy="default", num_additional_image_tokens=1)
    if family == "llava":
        from vtprune import toy

        return toy.build_processor()
    raise ValueError(family)
