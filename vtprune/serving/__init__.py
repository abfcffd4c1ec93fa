"""vtprune inside vLLM (issue 25): ``vtprune.serving.LLM`` and a vLLM general plugin.

    from vtprune.serving import LLM
    llm = LLM("toy", method="uniform", keep=0.25, max_model_len=512)   # a vllm.LLM

Runs in the serving venv (``bash scripts/vllm_cpu_env.sh DIR``).  The choice travels to vLLM's
worker processes in the environment (``VTPRUNE_SERVE``: the method config as JSON); the plugin
(``vtprune.serving.plugin``, entry point ``vllm.general_plugins``) then registers pruned variants of
vLLM's own model classes: LLaVA-1.5 (``vtprune.serving.llava``), LLaVA-NeXT (``llava_next``: every newline
kept), InternVL in HF format (``internvl``) and Qwen2-VL, Qwen2.5-VL, Qwen3-VL (``qwen``: images only), with
``random``, ``uniform``, ``pool``, ``divprune``, the [CLS] methods ``fastervlm``, ``vtc_cls`` (Qwen: the
attention each patch receives) and ``visionzip`` (not on LLaVA-NeXT or Qwen), each also with summary
tokens and ``size_bias`` (``vtprune.serving.bias``).  Tower scores come from forward hooks on vLLM's
tower layers (``vtprune.serving.tower``).  The processor emits the kept number of image placeholders
(``vtprune.serving.select.kept_count``), and the model's multimodal embedding returns the kept rows chosen
by the same vtprune method on the features vLLM computes.  Positions: vLLM numbers a 1-D family's
shortened prompt contiguously (the HF wrap's ``positions="renumber"``) and keeps Qwen's mrope positions as
EVS does (``positions="original"``, the HF default); a served config carries the one that matches
(``POSITIONS``).
"""

from __future__ import annotations

import json
import os
import sys

ENV = "VTPRUNE_SERVE"
# the architectures served (in config.json) -> their model_type
SERVED = {"LlavaForConditionalGeneration": "llava", "LlavaNextForConditionalGeneration": "llava_next",
          "InternVLForConditionalGeneration": "internvl", "Qwen2VLForConditionalGeneration": "qwen2_vl",
          "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl", "Qwen3VLForConditionalGeneration": "qwen3_vl"}
SERVED_TYPES = tuple(sorted(set(SERVED.values())))
# how vLLM positions a pruned prompt, per model type, as the HF wrap's ``positions`` option names it: 1-D
# positions (LLaVA, LLaVA-NeXT, InternVL) are numbered afresh; Qwen's mrope positions are rewritten as EVS
# does (the original ones)
POSITIONS = {"llava": "renumber", "llava_next": "renumber", "internvl": "renumber",
             "qwen2_vl": "original", "qwen2_5_vl": "original", "qwen3_vl": "original"}
IMAGES_ONLY = ("internvl", "qwen2_vl", "qwen2_5_vl", "qwen3_vl")  # served with video requests refused
METHODS = ("random", "uniform", "pool", "divprune", "fastervlm", "vtc_cls", "visionzip")


def config_from_env():
    """The method config the serving process was started with (None: serve unpruned)."""
    text = os.environ.get(ENV)
    if not text:
        return None
    from ..methods import from_dict

    return from_dict(json.loads(text))


def check(method: str, keep, options: dict, model_type: str | None = "llava"):
    """The validated method config for a ``model_type`` model (its ``positions`` set to what vLLM does there;
    None: not yet known); ``ValueError`` for methods the serving plugin does not run."""
    from .. import methods

    if method not in METHODS:
        raise ValueError(f"vtprune serving runs {', '.join(METHODS)} in this version, not {method!r}")
    options = dict(options)
    want = POSITIONS.get(model_type)
    if want is not None and options.setdefault("positions", want) != want:
        raise ValueError(f"vLLM positions a pruned {model_type} prompt as the HF wrap's positions={want!r} does; "
                         f"serving cannot run positions={options['positions']!r}")
    if model_type == "llava_next":
        if method == "visionzip":
            raise ValueError("vtprune serving cannot run visionzip on LLaVA-NeXT: it keeps a share of every tower "
                             "tile, and unpadding drops some tiles' tower tokens, so how many tokens an image keeps "
                             "depends on which ones it kept, while vLLM sizes the prompt before the image is encoded")
        if options.setdefault("newlines", "all") != "all":
            raise ValueError("vLLM sizes a LLaVA-NeXT prompt before the image is encoded: serving keeps every newline "
                             "(newlines='all'), not newlines='rows'")
    config = methods.get(method)(keep=keep, **options)
    config.validate()
    if config.needs_cls and config.tower_score == "cls" and model_type in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        raise ValueError(f"{method}: the Qwen vision towers have no [CLS] token; they read the attention each patch "
                         "receives instead (source='received', the default there)")
    if config.merges and model_type in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        raise ValueError(f"{method} merges tower tokens before the projector, which the Qwen towers' patch merger "
                         "does not take (as on the HF path)")
    if config.summary and config.summary_group != "similarity":
        raise ValueError("vLLM sizes a prompt before the image is encoded, and lattice cells may come out empty: "
                         "served summary tokens use summary_group='similarity' (never empty), not "
                         f"{config.summary_group!r}")
    if config.scope != "image":
        raise ValueError(f"vtprune serving ranks all of an image's tiles together (scope='image'), not "
                         f"scope={config.scope!r}")
    return config


def model_dir(model: str) -> str:
    """A folder vLLM loads: ``"toy"`` becomes a copy of the shipped toy model with the vision tower's keys
    named as vLLM's CLIP expects and without the DyVTE routers (vLLM loads every safetensors file)."""
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


def clip_keys_for_vllm(weights: dict) -> dict:
    """A LLaVA / LLaVA-NeXT state dict as transformers 5 saves it (the CLIP tower's keys ``vision_tower.*``)
    with the keys vLLM's CLIP loads (``vision_tower.vision_model.*``, as older transformers saved them)."""
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
    served = [SERVED[a] for a in architectures if a in SERVED]
    if not served:
        raise ValueError(f"{folder} is {architectures or 'an unknown architecture'}; vtprune serving prunes "
                         f"{', '.join(SERVED)} in this version")
    return served[0]


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
    if model_type in IMAGES_ONLY:  # vLLM refuses video requests up front
        kwargs["limit_mm_per_prompt"] = {**kwargs.get("limit_mm_per_prompt", {}), "video": 0}
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
