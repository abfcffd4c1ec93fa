"""LLaVA-1.5, LLaVA-NeXT and LLaVA-NeXT-Video: a CLIP tower with a [CLS] token, 1-D positions."""

from .base import Family, register

LLAVA = register(Family("llava", ("LlavaForConditionalGeneration",), tower="CLIP"))
# anyres: a base tile and crops, the crops packed into one unpadded grid with a newline token after every row
LLAVA_NEXT = register(Family("llava_next", ("LlavaNextForConditionalGeneration",), tower="CLIP", tiles=True,
                             newlines=True, unpadded=True))
# LLaVA-NeXT's images; a video's frames each a tower pass, its patches average-pooled (stride 2) before the
# projector, the frames' grids one after another, no newline
LLAVA_NEXT_VIDEO = register(Family("llava_next_video", ("LlavaNextVideoForConditionalGeneration",), tower="CLIP",
                                   tiles=True, newlines=True, unpadded=True, media=("image", "video")))
