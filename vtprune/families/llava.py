"""LLaVA-1.5 and LLaVA-NeXT: a CLIP tower with a [CLS] token, 1-D positions."""

from .base import Family, register

LLAVA = register(Family("llava", ("LlavaForConditionalGeneration",), tower="CLIP"))
# anyres: a base tile and crops, the crops packed into one unpadded grid with a newline token after every row
LLAVA_NEXT = register(Family("llava_next", ("LlavaNextForConditionalGeneration",), tower="CLIP", tiles=True,
                             newlines=True, unpadded=True))
