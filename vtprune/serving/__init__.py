"""vtprune inside vLLM (issue 25): ``vtprune.serving.LLM`` and a vLLM general plugin.

    from vtprune.serving import LLM
    llm = LLM("toy", method="uniform", keep=0.25, max_model_len=512)   # a vllm.LLM

Runs in the serving venv (``bash scripts/vllm_cpu_env.sh DIR``).  The choice travels to vLLM's
worker processes in the environment (``VTPRUNE_SERVE``: the method config as JSON); the plugin
(``vtprune.serving.plugin``, entry point ``vllm.general_plugins``) then registers pruned variants of
vLLM's own model classes.  This version: LLaVA-1.5 (``LlavaForConditionalGeneration``) with
``random``, ``uniform``, ``pool``, ``divprune`` and the [CLS] methods ``fastervlm``, ``vtc_cls``,
``visionzip`` (their scores read off vLLM's CLIP layers through forward hooks on the fused q/k/v
projection: ``vtprune.serving.tower``).  The processor emits the kept number of image placeholders
(``tokens_to_keep(keep, n)``; ``pool``: its realized window count), and the model's multimodal
embedding returns the kept rows chosen by the same vtprune method on the features vLLM computes.
Positions: vLLM numbers the shortened prompt contiguously; the HF wrap matches it with
``positions="renumber"`` (served configs carry it; the HF default, ``"original"``, keeps positions).
"""

from __future__ import annotations

import json
import os
import sys

ENV = "VTPRUNE_SERVE"
SERVED = {"LlavaForConditionalGeneration": "llava"}  # architecture -> its config's model_type
SERVED_TYPES = tuple(sorted(set(SERVED.values())))
METHODS = ("random", "uniform", "pool", "divprune", "fastervlm", "vtc_cls", "visionzip")


def config_from_env():
    """The method config the serving process was started with (None: serve unpruned)."""
    text = os.environ.get(ENV)
    if not text:
        return None
    from ..methods import from_dict

    return from_dict(json.loads(text))


def check(method: str, keep, options: dict):
    """The validated method config; ``ValueError`` for methods the serving plugin does not run."""
    from .. import methods

    if method not in METHODS:
        raise ValueError(f"vtprune serving runs {', '.join(METHODS)} in this version, not {method!r}")
    options = dict(options)
    if options.setdefault("positions", "renumber") != "renumber":
        raise ValueError("vLLM numbers a pruned prompt afresh: serving runs positions='renumber' (the HF wrap's "
                         "option that matches it), not positions='original'")
    config = methods.get(method)(keep=keep, **options)
    config.validate()
    if getattr(config, "summary", 0) or getattr(config, "size_bias", False):
        raise ValueError("vtprune serving does not run summary tokens or size_bias yet")
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
    weights = {}
    for key, value in load_file(source).items():
        if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
            key = "vision_tower.vision_model." + key[len("vision_tower."):]
        weights[key] = value
    save_file(weights, marker)
    return out


def check_architecture(folder: str):
    """``ValueError`` unless the model in ``folder`` (its config.json) is one the plugin prunes: vLLM would
    otherwise serve it unpruned without a word."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        return  # a hub id: vLLM resolves it; the CLI checks its model_type before
    with open(path) as f:
        architectures = json.load(f).get("architectures") or []
    if not set(architectures) & set(SERVED):
        raise ValueError(f"{folder} is {architectures or 'an unknown architecture'}; vtprune serving prunes "
                         f"{', '.join(SERVED)} in this version")


def LLM(model, method: str = "random", keep=1.0, **kwargs):
    """A ``vllm.LLM`` serving ``model`` ("toy" for the shipped toy model) with ``method`` at ``keep``;
    ``kwargs`` go to ``vllm.LLM`` (method options go in ``options=``)."""
    options = kwargs.pop("options", {}) or {}
    config = check(method, keep, options)
    folder = os.path.expanduser(model_dir(model))
    check_architecture(folder)
    text = json.dumps(config.to_dict())
    if os.environ.get(ENV, text) != text and "vllm" in sys.modules:
        raise ValueError(f"this process already served {os.environ[ENV]}: vLLM keeps a model's input processor per "
                         "process, so serve one vtprune method and budget per process (start another for another)")
    os.environ[ENV] = text
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import vllm

    from .plugin import register

    register()  # this process too, now (vLLM loads plugins once per process; its workers load them anew)
    if model == "toy":
        kwargs.setdefault("dtype", "float32")
        kwargs.setdefault("max_model_len", 512)
        kwargs.setdefault("limit_mm_per_prompt", {"image": 1})
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
