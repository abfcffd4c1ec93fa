"""InternVL (HF format): InternViT tiles, 4 patches pixel-shuffled into one token, 1-D positions; video
frames are images."""

from .base import Family, register

INTERNVL = register(Family("internvl", ("InternVLForConditionalGeneration",), tower="InternViT", tiles=True,
                           media=("image", "video")))
