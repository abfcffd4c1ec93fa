"""GLM-4.1V: a ViT without [CLS] whose 2 x 2 patch groups a strided convolution merges before the projector
(patches in group order, as Qwen2-VL's), (t, h, w) mrope positions; a video's frames are numbered one by
one (a timestamp between frames)."""

from .base import Family, register

GLM4V = register(Family("glm4v", ("Glm4vForConditionalGeneration",), tower="GLM ViT", cls_token=False,
                        merges_before_projector=True, positions="mrope", media=("image", "video")))
