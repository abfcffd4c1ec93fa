"""Embedded toy video VLM: a synthetic clip benchmark whose questions need time, and a tiny Qwen3-VL
trained on it.

A clip is 16 frames of 128 x 128 pixels at 1 frame per second.  Qwen3-VL's tower fuses two frames into a
temporal slice and merges 2 x 2 patches of 16 pixels into one token, so the language model sees 8 slices
of 4 x 4 = 16 tokens (128 video tokens), each slice behind its timestamp ``<0.5 seconds>``, ``<2.5
seconds>``... as Qwen3-VL's processor writes it.  One to three *static* objects stay in place for the
whole clip; one *event* object, of a shape no static object has, is there for two slices (four frames)
of one quarter of the clip.  The background is fixed for a clip and every frame gets fresh sensor noise
and sub-pixel jitter, so consecutive slices are close but never equal -- the redundancy temporal
pruning removes.  Each object lies inside one 16-pixel patch of its 32-pixel token cell.

Questions have one-word answers (single tokens of a word-level vocabulary):

- ``color``: the colour of a static object, named by its shape;
- ``event_shape`` / ``event_color``: what appears (its shape, its colour) -- read from 2 of 128 tokens;
- ``event_time``: in which quarter of the clip it appears (``first`` ... ``fourth``);
- ``count``: how many objects stay for the whole clip.

The trained weights live in ``vtprune/assets/toy_video/`` (``scripts/train_toy_video.py``); ``load()``
returns ``(model, tokenizer)`` offline and :func:`inputs` builds the model's inputs from clips without
a video processor (transformers' needs torchvision).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from . import toy
from .qwen_processor import clip_text, slice_times, stamp

COLORS = toy.COLORS
SHAPES = toy.SHAPES
QUESTION_TYPES = ("color", "event_shape", "event_color", "event_time", "count")
EVENT_TYPES = ("event_shape", "event_color", "event_time")
QUARTERS = ("first", "second", "third", "fourth")
NUMBER_WORDS = toy.NUMBER_WORDS

FRAME = 128  # pixels per side
PATCH = 16
MERGE = 2
CELL = PATCH * MERGE  # 32: one language-model token
GRID = FRAME // CELL  # 4 x 4 tokens per slice
FRAMES = 16
TEMPORAL = 2
SLICES = FRAMES // TEMPORAL  # 8
FPS = 1.0
TOKENS_PER_SLICE = GRID * GRID
NUM_VIDEO_TOKENS = SLICES * TOKENS_PER_SLICE  # 128
EVENT_SLICES = SLICES // len(QUARTERS)  # 2: an event lasts one quarter of the clip
MIN_STATIC, MAX_STATIC = 1, 3
OBJECT_HALF = 5.5  # ~11-pixel shapes inside a 16-pixel patch
JITTER = 1.0  # pixel offset of an object from its patch centre, per clip
WOBBLE = 0.35  # extra per-frame offset
NOISE = 4.0  # per-frame pixel noise (std, 0..255 scale)

DEFAULT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "toy_video")

VISION_START, VIDEO_PAD, VISION_END, IMAGE_PAD = "<|vision_start|>", "<|video_pad|>", "<|vision_end|>", "<|image_pad|>"
SPECIAL_TOKENS = ["<unk>", "<pad>", "<s>", "</s>", VISION_START, VIDEO_PAD, VISION_END, IMAGE_PAD]
WORDS = ["USER:", "ASSISTANT:", "what", "color", "shape", "is", "the", "appears", "when", "does", "appear",
         "how", "many", "objects", "stay", "?", "seconds>"]
VOCAB_SIZE = 128


def timestamps(frames: int = FRAMES, fps: float = FPS) -> list:
    """Each temporal slice's time in seconds: the mean of its two frames' times (Qwen3-VL's processor)."""
    return slice_times(range(frames), fps, TEMPORAL)


def vocab() -> dict:
    words = SPECIAL_TOKENS + WORDS + list(COLORS) + list(SHAPES) + list(QUARTERS) + list(NUMBER_WORDS)
    words += sorted({stamp(t).split()[0] for t in timestamps()}, key=lambda w: float(w[1:]))
    words += [f"<unused{i}>" for i in range(VOCAB_SIZE - len(words))]
    return {w: i for i, w in enumerate(words)}


# ------------------------------------------------------------------------------ clips

def _as_rng(rng):
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _place(rng, cells, color, shape):
    return {"color": color, "shape": shape, "cell": int(cells), "quadrant": int(rng.integers(4)),
            "dx": float(rng.uniform(-JITTER, JITTER)), "dy": float(rng.uniform(-JITTER, JITTER))}


def make_clip(rng) -> dict:
    """A random clip: static objects of distinct shapes, one event of another shape in one quarter."""
    rng = _as_rng(rng)
    n = int(rng.integers(MIN_STATIC, MAX_STATIC + 1))
    shapes = list(rng.permutation(len(SHAPES))[:n + 1])
    colors = list(COLORS)
    cells = rng.choice(GRID * GRID, size=n + 1, replace=False)
    objects = [_place(rng, cells[i], colors[int(rng.integers(len(colors)))], SHAPES[shapes[i]]) for i in range(n + 1)]
    quarter = int(rng.integers(len(QUARTERS)))
    return {"static": objects[:n], "event": objects[n], "quarter": quarter, "bg_seed": int(rng.integers(2**31))}


def event_slices(clip) -> range:
    return range(clip["quarter"] * EVENT_SLICES, (clip["quarter"] + 1) * EVENT_SLICES)


def objects_at(clip, slice_index: int) -> list:
    """The objects visible in a temporal slice."""
    return clip["static"] + ([clip["event"]] if slice_index in event_slices(clip) else [])


def _smooth_noise(rng, cells, channels=1):
    from PIL import Image

    low = rng.normal(0, 1, size=(channels, cells, cells)).astype(np.float32)
    return np.stack([np.asarray(Image.fromarray(c, "F").resize((FRAME, FRAME), Image.BICUBIC)) for c in low], -1)


def _background(rng):
    base = rng.uniform(70, 170) + rng.normal(0, 12, size=3)
    img = base + 35.0 * _smooth_noise(rng, 3) + 22.0 * _smooth_noise(rng, 6) + 12.0 * _smooth_noise(rng, 16)
    return img + 9.0 * _smooth_noise(rng, 5, channels=3)


_SS = 4
_OFFS = (np.arange(PATCH * _SS) + 0.5) / _SS - PATCH / 2.0


def _draw(img, obj, rng):
    row, col = divmod(obj["cell"], GRID)
    qy, qx = divmod(obj["quadrant"], 2)
    y0, x0 = row * CELL + qy * PATCH, col * CELL + qx * PATCH
    dx, dy = obj["dx"] + rng.uniform(-WOBBLE, WOBBLE), obj["dy"] + rng.uniform(-WOBBLE, WOBBLE)
    scale = toy.OBJECT_HALF / OBJECT_HALF
    ys, xs = np.meshgrid((_OFFS - dy) * scale, (_OFFS - dx) * scale, indexing="ij")
    alpha = toy._coverage(obj["shape"], xs, ys).astype(np.float32)
    alpha = alpha.reshape(PATCH, _SS, PATCH, _SS).mean(axis=(1, 3))[..., None]
    color = np.array(COLORS[obj["color"]], np.float32) + rng.normal(0, 5, size=(PATCH, PATCH, 3))
    patch = img[y0:y0 + PATCH, x0:x0 + PATCH]
    img[y0:y0 + PATCH, x0:x0 + PATCH] = (1 - alpha) * patch + alpha * color


def render(clip) -> np.ndarray:
    """The clip's frames, uint8 ``[FRAMES, 3, FRAME, FRAME]`` (deterministic)."""
    rng = np.random.default_rng(clip["bg_seed"])
    background = _background(rng)
    out = np.empty((FRAMES, 3, FRAME, FRAME), np.uint8)
    for f in range(FRAMES):
        img = background + rng.normal(0, NOISE, size=background.shape).astype(np.float32)
        for obj in objects_at(clip, f // TEMPORAL):
            _draw(img, obj, rng)
        out[f] = np.clip(img, 0, 255).astype(np.uint8).transpose(2, 0, 1)
    return out


# -------------------------------------------------------------------------- questions

def _question(clip, rng, qtype):
    static, event = clip["static"], clip["event"]
    if qtype == "color":
        obj = static[int(rng.integers(len(static)))]
        return {"question": f"what color is the {obj['shape']} ?", "answer": obj["color"], "type": qtype}
    if qtype == "event_shape":
        return {"question": "what shape appears ?", "answer": event["shape"], "type": qtype}
    if qtype == "event_color":
        return {"question": "what color appears ?", "answer": event["color"], "type": qtype}
    if qtype == "event_time":
        return {"question": f"when does the {event['shape']} appear ?", "answer": QUARTERS[clip["quarter"]],
                "type": qtype}
    if qtype == "count":
        return {"question": "how many objects stay ?", "answer": NUMBER_WORDS[len(static)], "type": qtype}
    raise ValueError(qtype)


def make_questions(clip, rng, n=None) -> list:
    """Distinct questions about a clip, types in a random order (``n=None``: one per type)."""
    rng = _as_rng(rng)
    target = len(QUESTION_TYPES) if n is None else n
    out, seen = [], set()
    for _ in range(4 * target + 4):
        for t in rng.permutation(len(QUESTION_TYPES)):
            q = _question(clip, rng, QUESTION_TYPES[t])
            if len(out) < target and q["question"] not in seen:
                seen.add(q["question"])
                out.append(q)
        if len(out) >= target:
            break
    return out


def eval_clips(n=400, seed=4321) -> list:
    """The eval split unrendered: type-balanced ``(clip, question)`` pairs."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        clip = make_clip(rng)
        items.append((clip, _question(clip, rng, QUESTION_TYPES[i % len(QUESTION_TYPES)])))
    return items


def eval_split(n=400, seed=4321) -> list:
    """A fixed list of ``{frames, question, answer, type, clip_id}`` (frames uint8 [16, 3, 128, 128])."""
    return [dict(frames=render(clip), clip_id=i, **q) for i, (clip, q) in enumerate(eval_clips(n, seed))]


def type_prior(samples) -> dict:
    """Accuracy per type of always answering that type's most frequent answer (``toy.type_prior``)."""
    return toy.type_prior(samples, QUESTION_TYPES)


# ---------------------------------------------------------------------- text and inputs

def video_text(frames: int = FRAMES) -> str:
    """The clip's expanded placeholder, as Qwen3-VL's processor writes it."""
    return clip_text(timestamps(frames), TOKENS_PER_SLICE)


def prompt(question: str) -> str:
    """The training prompt (BOS included) before the processor expands the video placeholder."""
    return f"<s> USER: {VISION_START}{VIDEO_PAD}{VISION_END} {question} ASSISTANT:"


def served_prompt(question: str) -> str:
    """:func:`prompt` as a served processor takes it (``vtprune serve toy-video``): the clip named by its bare video
    token, which transformers 5's processor expands into every slice's timestamp, start, tokens and end."""
    return f"<s> USER: {VIDEO_PAD} {question} ASSISTANT:"


def video_metadata() -> dict:
    """What vLLM is told of a toy clip (its frames come as they are: no sampling, no resize)."""
    return {"fps": FPS, "frames_indices": list(range(FRAMES)), "total_num_frames": FRAMES, "duration": FRAMES / FPS,
            "video_backend": "opencv"}


def prompt_ids(question: str) -> list:
    """Token ids of :func:`prompt` with the clip expanded (what the model is fed)."""
    v = vocab()
    ids = [v["<s>"], v["USER:"]]
    for t in timestamps():
        ids += [v[w] for w in stamp(t).split()] + [v[VISION_START]] + [v[VIDEO_PAD]] * TOKENS_PER_SLICE \
            + [v[VISION_END]]
    return ids + [v[w] for w in question.split()] + [v["ASSISTANT:"]]


def pixels(frames) -> dict:
    """``pixel_values_videos`` and ``video_grid_thw`` of one clip (Qwen3-VL's layout, no resize)."""
    from .video_inputs import qwen_video

    n = FRAMES * FRAME * FRAME
    return qwen_video(frames, "qwen3_vl", min_pixels=n, max_pixels=n)


def inputs(clips, questions) -> dict:
    """A left-padded batch, as Qwen3-VL's processor makes it: ``input_ids``, ``attention_mask``,
    ``mm_token_type_ids`` (2 on video tokens), ``pixel_values_videos``, ``video_grid_thw`` for clips (uint8
    frames) and their questions."""
    if len(clips) != len(questions):
        raise ValueError(f"one question per clip: got {len(clips)} clips and {len(questions)} questions")
    rows = [prompt_ids(q) for q in questions]
    width = max(len(r) for r in rows)
    pad = vocab()["<pad>"]
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, width - len(r):] = torch.tensor(r)
        mask[b, width - len(r):] = 1
    parts = [pixels(f) for f in clips]
    return {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": (ids == vocab()[VIDEO_PAD]).int() * 2,
            "pixel_values_videos": torch.cat([p["pixel_values_videos"] for p in parts]),
            "video_grid_thw": torch.cat([p["video_grid_thw"] for p in parts])}


# ------------------------------------------------------------------- tokenizer / model

CHAT_TEMPLATE = toy.chat_template("video", VISION_START + VIDEO_PAD + VISION_END)


def build_tokenizer():
    """Word-level fast tokenizer (whitespace split); the vision tokens are special tokens."""
    return toy.word_tokenizer(vocab(), [VISION_START, VIDEO_PAD, VISION_END, IMAGE_PAD], CHAT_TEMPLATE)


def build_config():
    from transformers import Qwen3VLConfig

    v = vocab()
    vision = dict(depth=4, hidden_size=128, intermediate_size=384, num_heads=4, patch_size=PATCH,
                  spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL, out_hidden_size=128,
                  num_position_embeddings=(FRAME // PATCH) ** 2, deepstack_visual_indexes=[2])
    text = dict(vocab_size=VOCAB_SIZE, hidden_size=128, intermediate_size=384, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=1024,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [6, 5, 5],
                                 "mrope_interleaved": True},
                pad_token_id=v["<pad>"], bos_token_id=v["<s>"], eos_token_id=v["</s>"])
    return Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=v[IMAGE_PAD],
                         video_token_id=v[VIDEO_PAD], vision_start_token_id=v[VISION_START],
                         vision_end_token_id=v[VISION_END], tie_word_embeddings=False)


def load(path=None, dtype=torch.float32):
    """Load the shipped toy video model offline: ``(model, tokenizer)``, the model in eval mode."""
    from transformers import AutoTokenizer, Qwen3VLForConditionalGeneration

    path = path or DEFAULT_PATH
    if not (os.path.isdir(path) and any(f.endswith(".safetensors") for f in os.listdir(path))):
        raise FileNotFoundError(f"toy video weights not found in {path}; train them with "
                                f"`python scripts/train_toy_video.py --out {path}`")
    model = Qwen3VLForConditionalGeneration.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    return model.eval(), tok


# --------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model, samples, batch_size=16, progress=True) -> dict:
    """Accuracy of one-token answers (argmax of the last-position logits), per question type; the model
    is called as ``model(**inputs(...))``, so a wrapped model is evaluated the same way."""
    words = {i: w for w, i in vocab().items()}
    predictions = toy.answers(model, samples, lambda batch: inputs([s["frames"] for s in batch],
                                                                   [s["question"] for s in batch]),
                              lambda ids: [words[i] for i in ids], "pixel_values_videos", batch_size, progress,
                              "toy video eval")
    events = [p == s["answer"] for p, s in zip(predictions, samples) if s["type"] in EVENT_TYPES]
    return {**toy.score(predictions, samples, QUESTION_TYPES), "event": sum(events) / max(len(events), 1)}
