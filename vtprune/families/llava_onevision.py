"""LLaVA-OneVision: a SigLIP tower without [CLS], 1-D positions.  Images as LLaVA-NeXT lays them out (a base
tile, then the crops re-assembled into one unpadded grid with a newline token after every row), the crop grid
shrunk by bilinear interpolation when it holds more than ``anyres_max_N`` tiles' worth of tokens; an image of
a multi-image prompt is its base tile and one newline.  A video's frames are tower passes whose patch grids
are bilinearly halved, one after another, one newline after the last."""

from .base import Family, register

LLAVA_ONEVISION = register(Family("llava_onevision", ("LlavaOnevisionForConditionalGeneration",), tower="SigLIP",
                                  cls_token=False, tiles=True, newlines=True, unpadded=True,
                                  media=("image", "video")))
