"""Embedded toy VLM: a synthetic shape benchmark and a tiny LLaVA trained on it.

Scenes are 224x224 images with 3-6 small coloured shapes (~10 px), each centred in
its own 14-px vision-patch cell, on a noisy blotchy background. The CLIP tower sees
16x16 = 256 patches, so most visual tokens are background: dropping the wrong ones
hurts, which is what makes the benchmark useful for token pruning.

Questions have one-word answers that are single tokens of a word-level vocabulary:
colour of a shape, shape of a colour, existence of a (colour, shape) pair, counting.

The trained weights live in ``vtprune/assets/toy_llava/`` (see
``scripts/train_toy_vlm.py``); ``load()`` returns ``(model, processor)`` offline.
"""

import json
import os

import numpy as np
import torch

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 175, 60),
    "blue": (45, 85, 235),
    "yellow": (240, 220, 40),
    "purple": (155, 60, 205),
    "orange": (250, 140, 25),
}
SHAPES = ("circle", "square", "triangle", "cross")
QUESTION_TYPES = ("color", "shape", "exists", "count")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

IMAGE_SIZE = 224
PATCH = 14
GRID = IMAGE_SIZE // PATCH  # 16
NUM_IMAGE_TOKENS = GRID * GRID  # 256
MIN_OBJECTS, MAX_OBJECTS = 3, 6
OBJECT_HALF = 5.0  # half-size of a shape in pixels (~10 px objects)
JITTER = 0.8

DEFAULT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "toy_llava")

SPECIAL_TOKENS = ["<unk>", "<pad>", "<s>", "</s>", "<image>"]
WORDS = ["USER:", "ASSISTANT:", "what", "color", "shape", "is", "the", "object", "there", "a",
         "how", "many", "objects", "?", "yes", "no"]
VOCAB_SIZE = 128


def _as_rng(rng):
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


def _plural(shape):
    return shape + ("es" if shape.endswith("s") else "s")


# ----------------------------------------------------------------------------- scenes

def make_scene(rng):
    """A random scene: distinct (colour, shape) objects in distinct patch cells."""
    rng = _as_rng(rng)
    n = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    chosen = rng.choice(len(pairs), size=n, replace=False)
    cells = rng.choice(GRID * GRID, size=n, replace=False)
    objects = []
    for p, cell in zip(chosen, cells):
        color, shape = pairs[int(p)]
        dx, dy = rng.uniform(-JITTER, JITTER, size=2)
        objects.append({"color": color, "shape": shape, "cell": int(cell),
                        "dx": float(dx), "dy": float(dy)})
    return {"objects": objects, "bg_seed": int(rng.integers(2**31))}


def _smooth_noise(rng, cells, channels=1):
    """Low-resolution Gaussian noise upsampled (bicubic) to the image size."""
    from PIL import Image

    low = rng.normal(0, 1, size=(channels, cells, cells)).astype(np.float32)
    up = [np.asarray(Image.fromarray(ch, "F").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)) for ch in low]
    return np.stack(up, axis=-1)


def _background(rng):
    """Muted blotchy texture plus pixel noise, float32 (H, W, 3) in 0..255."""
    base = rng.uniform(70, 170) + rng.normal(0, 12, size=3)
    blotch = 35.0 * _smooth_noise(rng, 4) + 22.0 * _smooth_noise(rng, 9) + 12.0 * _smooth_noise(rng, 28)
    chroma = 9.0 * _smooth_noise(rng, 8, channels=3)
    img = base + blotch + chroma
    img += rng.normal(0, 10, size=img.shape).astype(np.float32)
    return img


def _coverage(shape, x, y):
    """Inside-test of a shape centred at 0 on coordinates x, y (pixels)."""
    h = OBJECT_HALF
    if shape == "circle":
        return x * x + y * y <= h * h
    if shape == "square":
        return (np.abs(x) <= h * 0.85) & (np.abs(y) <= h * 0.85)
    if shape == "triangle":  # pointing up, base at y = +h
        return (y <= h * 0.8) & (y >= -h) & (np.abs(x) <= (y + h) * 0.58)
    if shape == "cross":
        arm = h * 0.33
        return ((np.abs(x) <= arm) & (np.abs(y) <= h)) | ((np.abs(y) <= arm) & (np.abs(x) <= h))
    raise ValueError(shape)


_SS = 4  # supersampling for anti-aliased, sub-pixel-jittered shapes
_OFFS = (np.arange(PATCH * _SS) + 0.5) / _SS - PATCH / 2.0


def render(scene):
    """Render a scene dict to a 224x224 RGB PIL image (deterministic)."""
    from PIL import Image

    rng = np.random.default_rng(scene["bg_seed"])
    img = _background(rng)
    for obj in scene["objects"]:
        row, col = divmod(obj["cell"], GRID)
        ys, xs = np.meshgrid(_OFFS - obj["dy"], _OFFS - obj["dx"], indexing="ij")
        mask = _coverage(obj["shape"], xs, ys).astype(np.float32)
        alpha = mask.reshape(PATCH, _SS, PATCH, _SS).mean(axis=(1, 3))[..., None]
        color = np.array(COLORS[obj["color"]], np.float32) + rng.normal(0, 6, size=(PATCH, PATCH, 3))
        y0, x0 = row * PATCH, col * PATCH
        cell = img[y0:y0 + PATCH, x0:x0 + PATCH]
        img[y0:y0 + PATCH, x0:x0 + PATCH] = (1 - alpha) * cell + alpha * color
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


# -------------------------------------------------------------------------- questions

def _question(scene, rng, qtype):
    """One question of the given type, or None if the scene does not allow it."""
    objs = scene["objects"]
    colors = [o["color"] for o in objs]
    shapes = [o["shape"] for o in objs]
    pairs = {(o["color"], o["shape"]) for o in objs}
    if qtype == "color":
        unique = [s for s in SHAPES if shapes.count(s) == 1]
        if not unique:
            return None
        s = unique[rng.integers(len(unique))]
        return {"question": f"what color is the {s} ?", "answer": colors[shapes.index(s)], "type": qtype}
    if qtype == "shape":
        unique = [c for c in COLORS if colors.count(c) == 1]
        if not unique:
            return None
        c = unique[rng.integers(len(unique))]
        return {"question": f"what shape is the {c} object ?", "answer": shapes[colors.index(c)], "type": qtype}
    if qtype == "exists":
        all_pairs = [(c, s) for c in COLORS for s in SHAPES]
        if rng.random() < 0.5:
            pos = sorted(pairs)
            c, s = pos[rng.integers(len(pos))]
            answer = "yes"
        else:
            hard = [p for p in all_pairs if p not in pairs and (p[0] in colors or p[1] in shapes)]
            easy = [p for p in all_pairs if p[0] not in colors and p[1] not in shapes]
            pool = hard if (rng.random() < 0.5 or not easy) else easy
            c, s = pool[rng.integers(len(pool))]
            answer = "no"
        return {"question": f"is there a {c} {s} ?", "answer": answer, "type": qtype}
    if qtype == "count":
        if rng.random() < 0.5:
            return {"question": "how many objects ?", "answer": NUMBER_WORDS[len(objs)], "type": qtype}
        present = sorted(set(shapes))
        s = present[rng.integers(len(present))]
        return {"question": f"how many {_plural(s)} ?", "answer": NUMBER_WORDS[shapes.count(s)], "type": qtype}
    raise ValueError(qtype)


def make_questions(scene, rng, n=None):
    """Questions about a scene, no repeats; n=None gives one per available type.

    With n, types are cycled in a random order (so a batch of questions is
    roughly balanced) until n distinct questions are found or attempts run out.
    """
    rng = _as_rng(rng)
    out, seen = [], set()
    target = len(QUESTION_TYPES) if n is None else n
    for _ in range(8 * target + 8):
        if len(out) >= target:
            break
        order = rng.permutation(len(QUESTION_TYPES))
        for t in order:
            if len(out) >= target:
                break
            q = _question(scene, rng, QUESTION_TYPES[t])
            if q is None or q["question"] in seen:
                continue
            if n is None and any(o["type"] == q["type"] for o in out):
                continue
            seen.add(q["question"])
            out.append(q)
    return out


def _split_items(n, seed):
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        qtype = QUESTION_TYPES[i % len(QUESTION_TYPES)]
        while True:
            scene = make_scene(rng)
            q = _question(scene, rng, qtype)
            if q is not None:
                break
        items.append((scene, q))
    return items


def eval_scenes(n=400, seed=1234):
    """The eval split unrendered: ``(scene, question)`` pairs (``render(scene)`` gives the image)."""
    return _split_items(n, seed)


def eval_split(n=400, seed=1234):
    """A fixed, type-balanced list of {image, question, answer, type, scene_id}."""
    return [dict(image=render(scene), scene_id=i, **q) for i, (scene, q) in enumerate(_split_items(n, seed))]


def export_split(out_dir, n=400, seed=1234):
    """Write the eval split as PNGs plus questions.jsonl; returns the jsonl path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "questions.jsonl")
    with open(path, "w") as f:
        for sample in eval_split(n, seed):
            name = f"{sample['scene_id']:05d}.png"
            sample["image"].save(os.path.join(out_dir, name))
            row = {"image": name, "question": sample["question"], "answer": sample["answer"],
                   "type": sample["type"], "scene_id": sample["scene_id"]}
            f.write(json.dumps(row) + "\n")
    return path


def type_prior(samples, types=QUESTION_TYPES):
    """Accuracy per type (of ``types``) of always answering that type's most frequent answer."""
    prior = {}
    for t in types:
        answers = [s["answer"] for s in samples if s["type"] == t]
        if answers:
            prior[t] = max(answers.count(a) for a in set(answers)) / len(answers)
    return prior


# ------------------------------------------------------------------ tokenizer / model

def vocab():
    words = SPECIAL_TOKENS + WORDS + list(COLORS) + list(SHAPES) + [_plural(s) for s in SHAPES] \
        + list(NUMBER_WORDS)
    words += [f"<unused{i}>" for i in range(VOCAB_SIZE - len(words))]
    return {w: i for i, w in enumerate(words)}


def chat_template(media: str, placeholder: str) -> str:
    """The toy models' chat template (``USER: <media> question ASSISTANT: answer </s>``, BOS first), with
    ``placeholder`` for each content part of type ``media``."""
    return (
        "{{ bos_token }}"
        "{% for m in messages %}"
        "{% if m['role'] == 'user' %} USER:"
        "{% if m['content'] is string %} {{ m['content'] }}"
        "{% else %}"
        f"{{% for c in m['content'] %}}{{% if c['type'] == '{media}' %}} {placeholder}{{% endif %}}{{% endfor %}}"
        "{% for c in m['content'] %}{% if c['type'] == 'text' %} {{ c['text'] }}{% endif %}{% endfor %}"
        "{% endif %}"
        "{% elif m['role'] == 'assistant' %} ASSISTANT:"
        "{% if m['content'] is string %} {{ m['content'] }}"
        "{% else %}{% for c in m['content'] %}{% if c['type'] == 'text' %} {{ c['text'] }}{% endif %}{% endfor %}"
        "{% endif %} {{ eos_token }}"
        "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %} ASSISTANT:{% endif %}"
    )


CHAT_TEMPLATE = chat_template("image", "<image>")


def prompt(question):
    """The single-turn training prompt (BOS included) that the processor receives."""
    return f"<s> USER: <image> {question} ASSISTANT:"


def build_tokenizer():
    """Word-level fast tokenizer (whitespace split), `<image>` a special token."""
    return word_tokenizer(vocab(), ["<image>"], CHAT_TEMPLATE)


def word_tokenizer(words: dict, special: list, template: str):
    """A word-level fast tokenizer over ``words`` (whitespace split; ``<unk> <pad> <s> </s>``), ``special``
    tokens matched before the split, left padding, the chat ``template``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>",
                                  bos_token="<s>", eos_token="</s>", padding_side="left",
                                  model_max_length=1024)
    tok.add_special_tokens({"additional_special_tokens": list(special)})
    tok.chat_template = template
    return tok


def build_processor():
    from transformers import LlavaProcessor

    try:  # the PIL backend (no torchvision); older transformers only have the plain class
        from transformers import CLIPImageProcessorPil as ImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessor as ImageProcessor
    ip = ImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                            crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return LlavaProcessor(image_processor=ip, tokenizer=build_tokenizer(), patch_size=PATCH,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=CHAT_TEMPLATE)


def build_config():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    v = vocab()
    vision = CLIPVisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                              num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=PATCH,
                              projection_dim=128)
    text = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=128, intermediate_size=384,
                       num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=1024, pad_token_id=v["<pad>"],
                       bos_token_id=v["<s>"], eos_token_id=v["</s>"])
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=v["<image>"],
                      image_seq_length=NUM_IMAGE_TOKENS, vision_feature_layer=-2,
                      vision_feature_select_strategy="default", projector_hidden_act="gelu",
                      pad_token_id=v["<pad>"])
    return cfg


def load(path=None, dtype=torch.float32):
    """Load the shipped toy LLaVA offline: returns (model, processor), model in eval mode."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = path or DEFAULT_PATH
    has_weights = os.path.isdir(path) and any(f.endswith(".safetensors") for f in os.listdir(path))
    if not has_weights:
        raise FileNotFoundError(
            f"toy LLaVA weights not found in {path}; train them with "
            f"`python scripts/train_toy_vlm.py --out {path}` (about 50 min on 2 CPU cores)")
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    processor = AutoProcessor.from_pretrained(path)
    processor.tokenizer.padding_side = "left"
    return model.eval(), processor


# ------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model, processor, samples, batch_size=32, progress=True):
    """Accuracy of one-token answers (argmax of the last-position logits).

    The model is called as ``model(**inputs)`` with the processor's left-padded
    batch, so a wrapped (e.g. pruned) model is evaluated exactly the same way.
    """
    tok = processor.tokenizer
    tok.padding_side = "left"

    def batch_inputs(batch):
        return processor(images=[s["image"] for s in batch], text=[prompt(s["question"]) for s in batch],
                         padding=True, return_tensors="pt")

    predictions = answers(model, samples, batch_inputs, tok.convert_ids_to_tokens, "pixel_values", batch_size,
                          progress, "toy eval")
    return score(predictions, samples, QUESTION_TYPES)


def answers(model, samples, batch_inputs, decode, pixels: str, batch_size: int, progress: bool, desc: str) -> list:
    """The one-word answers of ``samples`` (argmax of the last-position logits), ``batch_size`` at a time:
    ``batch_inputs(batch)`` builds a batch's model inputs (moved to the model's device, ``pixels`` also to its
    dtype), ``decode(ids)`` names the predicted tokens."""
    from tqdm.auto import tqdm

    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    predictions = []
    bar = tqdm(total=len(samples), desc=desc, disable=not progress)
    for start in range(0, len(samples), batch_size):
        batch = samples[start:start + batch_size]
        x = {k: v.to(device) for k, v in batch_inputs(batch).items()}
        x[pixels] = x[pixels].to(dtype)
        logits = model(**x).logits[:, -1]
        predictions += decode(logits.argmax(-1).tolist())
        bar.update(len(batch))
    bar.close()
    return predictions


def score(predictions, samples, types) -> dict:
    """``overall`` accuracy, ``by_type`` (for ``types`` present), ``n`` and the ``predictions``."""
    correct = [p == s["answer"] for p, s in zip(predictions, samples)]
    by_type = {}
    for t in types:
        hits = [c for c, s in zip(correct, samples) if s["type"] == t]
        if hits:
            by_type[t] = sum(hits) / len(hits)
    return {"overall": sum(correct) / max(len(correct), 1), "by_type": by_type,
            "n": len(samples), "predictions": predictions}
