"""vtprune inside vLLM (issue 25): ``vtprune.serving.LLM`` and a vLLM general plugin.

    from vtprune.serving import LLM
    llm = LLM("toy", method="uniform", keep=0.25, max_model_len=512)   # a vllm.LLM

Runs in the serving venv (``bash scripts/vllm_cpu_env.sh DIR``).  The choice travels to vLLM's
worker processes in the environment (``VTPRUNE_SERVE``: the method config as JSON); the plugin
(``vtprune.serving.plugin``, entry point ``vllm.general_plugins``) then registers pruned variants of
vLLM's own model classes, one binding per family (``vtprune.serving.bindings``): LLaVA-1.5
(``vtprune.serving.llava``), LLaVA-NeXT (``llava_next``: every newline kept), InternVL in HF format
(``internvl``), LLaVA-OneVision (``llava_onevision``: images, methods that read the features) and Qwen2-VL,
Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE (``qwen``: images only).  Methods are taken by their
needs (``check``): every pre-LLM selector whose kept count follows from the image's layout
(``Selector.kept_count``) and that reads no prompt text, on a family that has what it reads; each also
with summary tokens and ``size_bias`` (``vtprune.serving.slot_bias``).  Tower scores come from forward hooks on
vLLM's tower layers (``vtprune.serving.tower``).  The processor emits the kept number of image
placeholders (``vtprune.serving.rows.kept_count``), and the model's multimodal embedding returns the kept
rows chosen by ``vtprune.choose`` (as in the HF wrap) on the features vLLM computes.  Positions: vLLM numbers a 1-D family's
shortened prompt contiguously (the HF wrap's ``positions="renumber"``) and keeps Qwen's mrope positions as
EVS does (``positions="original"``, the HF default); a served config carries the one that matches
(``POSITIONS``).
"""

from __future__ import annotations

import json
import os
import sys

from .. import families
from ..layout import ImageLayout
from . import bindings
from .bindings import served
from .config import ENV, config_from_env  # noqa: F401  (re-exported)

# how vLLM positions a pruned prompt, as the HF wrap's ``positions`` option names it: 1-D positions (LLaVA,
# LLaVA-NeXT, InternVL) are numbered afresh; mrope positions (Qwen) are rewritten as EVS does (the original ones)
POSITIONS_OF = {"1d": "renumber", "mrope": "original"}
SERVED = {arch: family.name for arch, family in served().items()}  # the tree's: architecture -> model_type
SERVED_TYPES = tuple(sorted(set(SERVED.values())))
POSITIONS = {name: POSITIONS_OF[families.get(name).positions] for name in SERVED_TYPES}


def refused_media(model_type: str | None) -> dict:
    """``{medium: 0}`` for what a served ``model_type`` model takes but its binding does not prune (vLLM's
    ``limit_mm_per_prompt``: it refuses such requests up front)."""
    if not model_type:
        return {}
    pruned = bindings.media(model_type)
    return {m: 0 for m in families.get(model_type).media if m not in pruned}


def servable() -> list:
    """The registered methods vLLM can serve somewhere: pre-LLM selectors that read no prompt text (video methods that
    keep a clip's tokens as they are)."""
    from .. import methods

    from .clips import servable as clip_servable

    return [name for name in methods.available() if methods.get(name).stage == "select"
            and not methods.get(name).needs_text
            and not (methods.get(name).temporal and clip_servable(methods.get(name)()))]  # (merging clip methods)


def check(method: str, keep, options: dict, model_type: str | None = "llava"):
    """The validated method config for a ``model_type`` model (its ``positions`` set to what vLLM does there;
    None: not yet known); ``ValueError``, with the reason, where the method's needs are not met: vLLM runs
    pre-LLM selectors whose kept count follows from the image's layout (it sizes a prompt before the image is
    encoded) and that read no prompt text."""
    from .. import methods
    from ..errors import NotApplicable

    cls = methods.get(method)
    if cls.stage != "select":
        raise ValueError(f"vtprune serving runs pre-LLM selectors ({', '.join(servable())}); {method} acts "
                         f"{STAGES.get(cls.stage, 'elsewhere')}, which vtprune serving does not reach yet")
    if cls.temporal and model_type is not None and "video" not in bindings.media(model_type):
        videos = ", ".join(sorted(n for n in SERVED_TYPES if "video" in bindings.media(n)))
        raise ValueError(f"vtprune serving prunes {model_type}'s images; {method} ranks a video's tokens across its "
                         f"frames: vtprune serves videos on {videos}")
    if cls.needs_text:
        raise ValueError(f"vtprune serving cannot run {method}: it reads the prompt's instruction, and vLLM encodes "
                         "an image (and caches its embedding) apart from the prompt")
    family = families.get(model_type) if model_type is not None else None
    options = dict(options)
    if family is not None:
        want = POSITIONS_OF[family.positions]
        if options.setdefault("positions", want) != want:
            raise ValueError(f"vLLM positions a pruned {model_type} prompt as the HF wrap's positions={want!r} does; "
                             f"serving cannot run positions={options['positions']!r}")
        if family.newlines:
            options.setdefault("newlines", "all")
    config = cls(keep=keep, **options)
    config.validate()
    if family is not None and config.needs_cls and config.tower_score == "cls" and not family.cls_token:
        raise ValueError(f"{method}: the {family.tower} tower has no [CLS] token; it reads the attention each patch "
                         "receives instead (source='received', the default there)")
    if family is not None and config.needs_cls and not bindings.reads_tower(family.name):
        raise ValueError(f"{method} reads the vision tower's attention, which vtprune's vLLM binding of {model_type} "
                         "does not tap yet: serve a method that reads the features (random, uniform, pool, divprune, "
                         "cdpruner), or run it with the HF wrap")
    if family is not None and config.weighs and family.sliding_window:
        raise ValueError(f"{method} with summary tokens or size_bias adds a bias inside vLLM's attention, which vtprune "
                         f"serving does not do on {model_type}'s sliding-window layers: serve it without them, or run "
                         "it with the HF wrap")
    if family is not None and config.merges and family.merges_before_projector:
        raise ValueError(f"{method} merges tower tokens before the projector, which the {family.tower} tower's "
                         "patch merger does not take (as on the HF path)")
    if cls.temporal and model_type is not None:
        from .clips import servable as clip_servable

        if why := clip_servable(config):
            raise ValueError(f"vtprune serving cannot run {method} on a clip: {why}")
    try:  # on an image laid out as the family lays one out
        config.kept_count(family.example_layout() if family is not None else ImageLayout.from_grids([(4, 4)]))
    except NotApplicable as err:
        where = f" on {model_type}" if family is not None else ""
        raise ValueError(f"vtprune serving cannot run {method}{where}: vLLM sizes a prompt before the image is "
                         f"encoded, and {err}") from None
    return config


STAGES = {"llm": "inside the language model", "attention": "on the language model's attention",
          "input": "on the processor"}


def model_dir(model: str) -> str:
    """A folder vLLM loads: ``"toy"`` becomes a copy of the shipped toy model with the vision tower's keys
    named as vLLM's CLIP expects and without the DyVTE routers (vLLM loads every safetensors file);
    ``"toy-video"`` one of the toy video model with its processor (``toy_video_dir``)."""
    if model == "toy-video":
        return toy_video_dir()
    if model != "toy":
        return model
    import shutil

    from safetensors.torch import load_file, save_file

    from ..toy import DEFAULT_PATH

    out = os.path.join(os.path.expanduser(os.environ.get("VTPRUNE_CACHE", "~/.cache/vtprune")), "toy_vllm")
    marker = os.path.join(out, "model.safetensors")
    source = os.path.join(DEFAULT_PATH, "model.safetensors")
    if os.path.exists(marker) and os.path.getmtime(marker) >= os.path.getmtime(source):
        return out
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(DEFAULT_PATH):
        if not name.endswith(".safetensors"):
            shutil.copy(os.path.join(DEFAULT_PATH, name), out)
    save_file(clip_keys_for_vllm(load_file(source)), marker)
    return out


def toy_video_dir() -> str:
    """The toy video model (a tiny Qwen3-VL) with the processor vLLM runs it through: 128 x 128 frames at 1 fps
    as they are (16-pixel patches, 2 frames a temporal slice, merged 2 x 2), normalised as it was trained, and
    a chat template that names a clip by its bare video token (transformers 5's processor adds each frame's
    timestamp and start and end tokens, as the toy's training prompts have them: ``toy_video.served_prompt``)."""
    import shutil

    import transformers as tf

    from .. import toy_video as tv

    out = os.path.join(os.path.expanduser(os.environ.get("VTPRUNE_CACHE", "~/.cache/vtprune")), "toy_video_vllm")
    marker = os.path.join(out, "video_preprocessor_config.json")
    source = os.path.join(tv.DEFAULT_PATH, "model.safetensors")
    if os.path.exists(marker) and os.path.getmtime(marker) >= os.path.getmtime(source):
        return out
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(tv.DEFAULT_PATH):
        shutil.copy(os.path.join(tv.DEFAULT_PATH, name), out)
    pixels = tv.FRAMES * tv.FRAME * tv.FRAME
    half = {"image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    image = tf.Qwen2VLImageProcessor(patch_size=tv.PATCH, merge_size=tv.MERGE, temporal_patch_size=tv.TEMPORAL,
                                     min_pixels=tv.FRAME ** 2, max_pixels=tv.FRAME ** 2, **half)
    video = tf.Qwen3VLVideoProcessor(size={"shortest_edge": pixels, "longest_edge": pixels}, patch_size=tv.PATCH,
                                     merge_size=tv.MERGE, temporal_patch_size=tv.TEMPORAL, do_sample_frames=False,
                                     fps=tv.FPS, **half)
    template = tv.CHAT_TEMPLATE.replace(f"{tv.VISION_START}{tv.VIDEO_PAD}{tv.VISION_END}", tv.VIDEO_PAD)
    processor = tf.Qwen3VLProcessor(image_processor=image, tokenizer=tf.AutoTokenizer.from_pretrained(out),
                                    video_processor=video, chat_template=template)
    processor.save_pretrained(out)
    return out


def clip_keys_for_vllm(weights: dict) -> dict:
    """A LLaVA / LLaVA-NeXT / LLaVA-OneVision state dict as transformers 5 saves it (the CLIP or SigLIP tower's keys
    ``vision_tower.*``) with the keys vLLM's towers load (``vision_tower.vision_model.*``, as older transformers
    saved them)."""
    out = {}
    for key, value in weights.items():
        if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
            key = "vision_tower.vision_model." + key[len("vision_tower."):]
        out[key] = value
    return out


def check_architecture(folder: str) -> str | None:
    """The model type of the model in ``folder`` (its config.json; None for a hub id, which vLLM resolves);
    ``ValueError`` unless it is one the plugin prunes: vLLM would otherwise serve it unpruned without a word."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        architectures = json.load(f).get("architectures") or []
    known = served()
    names = [known[a].name for a in architectures if a in known]
    if not names:
        raise ValueError(f"{folder} is {architectures or 'an unknown architecture'}; vtprune serving prunes "
                         f"{', '.join(known)} in this version")
    return names[0]


def plugin_allowed():
    """``ValueError`` when ``VLLM_PLUGINS`` leaves the vtprune plugin out (vLLM would serve unpruned)."""
    allowed = os.environ.get("VLLM_PLUGINS")
    if allowed is not None and "vtprune" not in [p.strip() for p in allowed.split(",")]:
        raise ValueError(f"VLLM_PLUGINS={allowed!r} leaves out the vtprune plugin: vLLM would serve the model "
                         "unpruned; add vtprune to it or unset it")


def LLM(model, method: str = "random", keep=1.0, **kwargs):
    """A ``vllm.LLM`` serving ``model`` ("toy" for the shipped toy model) with ``method`` at ``keep``;
    ``kwargs`` go to ``vllm.LLM`` (method options go in ``options=``)."""
    options = kwargs.pop("options", {}) or {}
    check(method, keep, options, None)  # a bad method or budget says so before the toy folder is written
    if kwargs.get("video_pruning_rate"):
        raise ValueError("video_pruning_rate: vtprune prunes a served model's videos by its own method and keep "
                         "(vLLM's EVS would not run); leave it out")
    folder = os.path.expanduser(model_dir(model))
    model_type = check_architecture(folder)
    config = check(method, keep, options, model_type)
    text = json.dumps(config.to_dict())
    if os.environ.get(ENV, text) != text and "vllm" in sys.modules:
        raise ValueError(f"this process already served {os.environ[ENV]}: vLLM keeps a model's input processor per "
                         "process, so serve one vtprune method and budget per process (start another for another)")
    plugin_allowed()
    os.environ[ENV] = text
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import vllm

    from .plugin import register

    register()  # this process too, now (vLLM loads plugins once per process; its workers load them anew)
    if model == "toy":
        kwargs.setdefault("dtype", "float32")
        kwargs.setdefault("max_model_len", 512)
        kwargs.setdefault("limit_mm_per_prompt", {"image": 1})
    if model == "toy-video":
        kwargs.setdefault("dtype", "float32")
        kwargs.setdefault("max_model_len", 1024)
        kwargs.setdefault("limit_mm_per_prompt", {"image": 0, "video": 1})
    if refused_media(model_type):  # vLLM refuses the media the bindings do not prune (videos) up front
        kwargs["limit_mm_per_prompt"] = {**kwargs.get("limit_mm_per_prompt", {}), **refused_media(model_type)}
    return vllm.LLM(model=folder, **kwargs)


def _kept_of(model):
    return list(getattr(model, "vtprune_kept", []))


def last_kept(llm, n: int | None = None) -> list:
    """The kept indices of the last ``n`` images (all it remembers, up to 4096, when None) that the served
    model of ``llm`` (a ``vllm.LLM`` from ``LLM``) embedded, oldest first: as ``vtprune.last_kept`` for one
    image.  With vLLM's engine in a separate process (its default) this needs
    ``VLLM_ALLOW_INSECURE_SERIALIZATION=1`` set before the engine starts."""
    kept = llm.apply_model(_kept_of)[0]
    return kept if n is None else kept[-n:]
