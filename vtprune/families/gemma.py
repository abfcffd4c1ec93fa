"""Gemma 3: a SigLIP tower without [CLS] whose patches the projector average-pools (k x k) into a fixed
square grid of tokens per image (256 on the released models), 1-D positions; the language model's image
tokens attend to each other both ways within an image, and most of its layers attend within a sliding
window."""

from .base import Family, register

GEMMA3 = register(Family("gemma3", ("Gemma3ForConditionalGeneration",), tower="SigLIP", cls_token=False,
                         merges_before_projector=True))
