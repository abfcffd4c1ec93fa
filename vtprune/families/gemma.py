"""Gemma 3 and Gemma 4.

Gemma 3: a SigLIP tower without [CLS] whose patches the projector average-pools (k x k) into a fixed
square grid of tokens per image (256 on the released models), 1-D positions; the language model's image
tokens attend to each other both ways within an image, and most of its layers attend within a sliding
window.

Gemma 4: its own tower without [CLS] at the image's aspect ratio (a budget of patches, padded to a common
length in a batch, each patch with its (x, y)), average-pooled k x k inside the tower into a grid of
tokens; 1-D positions; image tokens attend both ways within an image on the sliding-window layers only
(``use_bidirectional_attention="vision"``, the larger models); the smaller models add per-layer input
embeddings to every decoder layer and let their last layers reuse earlier layers' keys and values.  A video is
frames encoded as images, each frame's tokens between its timestamp and the next.
"""

from .base import Family, register

GEMMA3 = register(Family("gemma3", ("Gemma3ForConditionalGeneration",), tower="SigLIP", cls_token=False,
                         merges_before_projector=True, sliding_window=True))
GEMMA4 = register(Family("gemma4", ("Gemma4ForConditionalGeneration",), tower="Gemma 4 ViT", cls_token=False,
                         merges_before_projector=True, media=("image", "video"), sliding_window=True))
