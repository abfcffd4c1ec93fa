"""``downsample``: a smaller image instead of fewer tokens — the baseline VTC-Bench found strong.

For dynamic-resolution families the number of visual tokens follows the image: Qwen2/2.5/3-VL
(28-px patches after 2x2 merging, within ``min_pixels``/``max_pixels``), LLaVA-NeXT (the anyres
grid is chosen from the image size), InternVL (the tile count, from the aspect ratio and size). Shrinking
each image until the *processor* yields about ``keep`` of its stock token count saves the vision
tower's work as well as the LLM's. It acts on the processor, not the model::

    processor = vtprune.downsample(processor, keep=0.25)
    inputs = processor(images=images, text=prompts, return_tensors="pt")
    processor.last   # per image: tokens_in (stock), tokens_out (realized), size_in, size_out

Each image is resized (PIL, bicubic, aspect ratio kept) by the scale whose realized token count —
counted by running the processor itself, so every family's rounding is the processor's own —
is closest to the budget ``tokens_to_keep(keep, stock)``: scales 1, 0.85, 0.85², ... are tried down
to the first within budget, then refined by bisection; ties go to the smaller count, then to the
larger image. (Scanning from the full size matters: InternVL's tile count is not monotone in the
image size for tiny images.) The realized count differs from the request by the family's rounding
(whole 28-px patches, whole tiles, LLaVA-NeXT's base image that is always kept), and it never
goes below the smallest image the processor accepts. InternVL is the exception to resizing: its
tile count follows the aspect ratio more than the size, so there the tile limit ``max_patches``
is lowered instead (one per processor call, the largest whose total is closest to the call's
total budget; the thumbnail tile comes with any multi-tile image). Fixed-resolution LLaVA-1.5 resizes every
image to one size, so ``downsample`` raises there: ``pool`` stands in for it.
"""

from __future__ import annotations

from .budget import check_keep, tokens_to_keep
from .errors import NotApplicable

FIXED_RESOLUTION = ("LlavaProcessor",)
TILED = ("InternVLProcessor",)  # the tile count, not the image size, sets the number of tokens
RATIO, MIN_SCALE, STEPS = 0.85, 0.02, 6


def downsample(processor, keep):
    """Return ``processor`` wrapped so that each image yields about ``keep`` of its visual tokens."""
    return DownsampledProcessor(processor, keep)


def split(names, options):
    """Take ``downsample`` out of a method spec: ``(keep for the processor or None, the other names,
    their options)`` — the one place that knows ``downsample`` acts on the processor, not the model."""
    if "downsample" not in names:
        return None, list(names), dict(options)
    if "keep" not in options:
        raise TypeError("downsample needs keep=...")
    rest = [n for n in names if n != "downsample"]
    return options["keep"], rest, (dict(options) if rest else {k: v for k, v in options.items() if k != "keep"})


def _image_token(processor):
    token = getattr(processor, "image_token", None)
    if token is None:
        raise TypeError(f"{type(processor).__name__} has no image_token: not a supported VLM processor")
    token_id = getattr(processor, "image_token_id", None)
    if token_id is None:
        token_id = processor.tokenizer.convert_tokens_to_ids(token)
    return token, token_id


class DownsampledProcessor:
    """A processor whose images are shrunk to about ``keep`` of their visual tokens (see the module)."""

    def __init__(self, processor, keep):
        if isinstance(processor, DownsampledProcessor):
            raise ValueError("this processor is already downsampled; wrap the original processor")
        name = type(processor).__name__
        if name in FIXED_RESOLUTION:
            raise NotApplicable(f"{name} resizes every image to one fixed size, so a smaller image gives the same "
                             "number of visual tokens: downsample cannot apply; use 'pool', which merges the "
                             "token grid down to the budget")
        self.processor = processor
        self.keep = check_keep(keep)
        self.token, self.token_id = _image_token(processor)
        self.tiled = name in TILED
        self.last = []

    def __getattr__(self, name):  # tokenizer, apply_chat_template, batch_decode, ...
        if name == "processor":
            raise AttributeError(name)
        return getattr(self.processor, name)

    def count(self, image, **kwargs) -> int:
        """Visual tokens the wrapped processor gives ``image`` (one image, its own placeholder)."""
        out = self.processor(images=[image], text=[self.token], return_tensors="pt", **kwargs)
        return int((out["input_ids"] == self.token_id).sum())

    def shrink(self, image):
        """``(resized image, stock count, realized count)`` for one PIL image."""
        stock = self.count(image)
        target = tokens_to_keep(self.keep, stock)
        if target >= stock:
            return image, stock, stock
        tried = {1.0: stock}
        above, below = 1.0, None  # scan down from the full size to the first scale within budget
        scale = 1.0
        while scale > MIN_SCALE:
            scale *= RATIO
            tried[scale] = self.count(_resize(image, scale))
            if tried[scale] <= target:
                below = scale
                break
            above = scale
        if below is not None:  # refine between the last scale over budget and the first within it
            for _ in range(STEPS):
                mid = (above + below) / 2
                tried[mid] = self.count(_resize(image, mid))
                if tried[mid] > target:
                    above = mid
                else:
                    below = mid
        best = min(tried, key=lambda s: (abs(tried[s] - target), tried[s], -s))
        return _resize(image, best), stock, tried[best]

    def __call__(self, images=None, text=None, **kwargs):
        if images is None:
            self.last = []
            return self.processor(images=images, text=text, **kwargs)
        nested = isinstance(images, (list, tuple)) and images and isinstance(images[0], (list, tuple))
        flat = [im for group in images for im in group] if nested else \
            (list(images) if isinstance(images, (list, tuple)) else [images])
        if self.tiled:
            return self._call_tiled(images, flat, text, kwargs)
        shrunk, self.last = [], []
        for image in flat:
            small, stock, realized = self.shrink(image)
            shrunk.append(small)
            self.last.append({"tokens_in": stock, "tokens_out": realized, "size_in": tuple(image.size),
                              "size_out": tuple(small.size)})
        if nested:
            it = iter(shrunk)
            shrunk = [[next(it) for _ in group] for group in images]
        elif not isinstance(images, (list, tuple)):
            shrunk = shrunk[0]
        return self.processor(images=shrunk, text=text, **kwargs)


    def _call_tiled(self, images, flat, text, kwargs):
        """InternVL: one ``max_patches`` per call (the processor takes one), the largest whose total
        token count over the call's images is closest to the total budget."""
        stock = [self.count(im) for im in flat]
        target = sum(tokens_to_keep(self.keep, n) for n in stock)
        start = kwargs.pop("max_patches", None) or getattr(self.processor.image_processor, "max_patches", 12)
        best = (abs(sum(stock) - target), sum(stock), -(start + 1), None, stock)
        for m in range(int(start), 0, -1):
            counts = [self.count(im, max_patches=m) for im in flat]
            best = min(best, (abs(sum(counts) - target), sum(counts), -m, m, counts))
            if sum(counts) <= target:
                break
        m, counts = best[3], best[4]
        if m is not None:
            kwargs["max_patches"] = m
        self.last = [{"tokens_in": n, "tokens_out": k, "size_in": tuple(im.size), "size_out": tuple(im.size),
                      "max_patches": m} for im, n, k in zip(flat, stock, counts)]
        return self.processor(images=images, text=text, **kwargs)


def _resize(image, scale):
    from PIL import Image

    w, h = image.size
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return image if size == (w, h) else image.resize(size, Image.BICUBIC)
