"""The installed vLLM has what the serving plugin hooks (no engine is started): every pruned class builds and
every method it defines over vLLM's matches the method it replaces; what does not is refused in one line
before any model loads (``vtprune.serving.needs``)."""

import os
import shutil
import subprocess
import sys

import pytest

if os.environ.get("VTPRUNE_REQUIRE_VLLM") != "1":  # CI sets it: there a missing vLLM fails the run
    pytest.importorskip("vllm")

from vtprune.serving import SERVED, check, needs  # noqa: E402
from vtprune.serving.plugin import pruned_classes  # noqa: E402


@pytest.mark.parametrize("method", ["uniform", "fastervlm"])
def test_every_pruned_class_fits_the_installed_vllm(method):
    classes = pruned_classes(check(method, 0.5, {}, None))
    assert set(classes) == set(SERVED)
    parts = [p for cls in classes.values() for p in (cls, *cls.vtprune_parts)]
    # thirteen model classes (LLaVA, LLaVA-NeXT, LLaVA-OneVision, InternVL, the six Qwen, GLM-4.1V, Gemma 3 and 4),
    # their processing infos and their processors (each reads a request's own keep)
    assert len(parts) == 13 * 3
    assert needs.missing_names() == [] and needs.stale_overrides(parts) == []


def test_serve_refuses_a_plugin_list_without_vtprune_before_loading():
    vtprune_bin = shutil.which("vtprune", path=os.path.dirname(sys.executable))
    done = subprocess.run([vtprune_bin, "serve", "toy", "--method", "uniform", "--keep", "0.5"], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "VLLM_PLUGINS": "other"})
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "leaves out the vtprune plugin" in lines[0], done.stderr[-2000:]


SIZE = """
import json, os, sys
from vtprune.serving import ENV, check, model_dir
os.environ[ENV] = json.dumps(check(sys.argv[1], float(sys.argv[2]), {}, "llava").to_dict())
from vtprune.serving.plugin import register
register()
from vllm.config import ModelConfig
from vllm.multimodal import MULTIMODAL_REGISTRY
processor = MULTIMODAL_REGISTRY.create_processor(ModelConfig(model=model_dir("toy"), dtype="float32", max_model_len=512))
print("placeholders", processor.info.get_num_image_tokens(image_width=64, image_height=64))
"""


@pytest.mark.parametrize("method,keep", [("uniform", 0.25), ("pool", 0.1)])
def test_the_served_processor_sizes_a_toy_image_at_the_kept_count(method, keep):
    """Processor level, no engine (it runs on the CUDA releases of vLLM on a CPU machine too): with the plugin
    registered (in a process of its own: vLLM keeps one input processor per process), vLLM's input processor
    for the toy LLaVA gives an image the number of placeholders the HF wrap keeps of its 256 tokens."""
    import vtprune
    from vtprune import toy

    done = subprocess.run([sys.executable, "-c", SIZE, method, str(keep)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    served = int(done.stdout.split("placeholders")[-1])
    model, processor = toy.load()
    sample = toy.eval_split(n=1)[0]
    inputs = processor(images=sample["image"], text=toy.prompt(sample["question"]), return_tensors="pt")
    with vtprune.wrapped(model, method, keep=keep):
        model(**inputs)
        wrapped = sum(len(k) for k in vtprune.last_kept(model)[0])
    assert served == wrapped < 256


ONCE = """
import json, os
from vtprune.serving import ENV, check
from vllm.config.multimodal import MultiModalConfig
stock = MultiModalConfig.is_multimodal_pruning_enabled
try:
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
except ImportError:  # a CUDA build
    CPUModelRunner = None
stock_load = CPUModelRunner.load_model if CPUModelRunner else None
from vtprune.serving.plugin import register
register()  # no VTPRUNE_SERVE: nothing changes
assert MultiModalConfig.is_multimodal_pruning_enabled is stock
os.environ[ENV] = json.dumps(check("uniform", 0.5, {}, None).to_dict())
register()
first = (MultiModalConfig.is_multimodal_pruning_enabled, CPUModelRunner.load_model if CPUModelRunner else None)
register()
second = (MultiModalConfig.is_multimodal_pruning_enabled, CPUModelRunner.load_model if CPUModelRunner else None)
assert first == second and first[0] is not stock and first[0].vtprune, (first, second)
if CPUModelRunner:
    assert first[1] is not stock_load and first[1].vtprune
print("ONCE OK")
"""


def test_the_plugin_changes_vllm_once_and_only_when_serving():
    """The plugin's one global change to vLLM (the pruned-media flag, and the CPU runner that sets it: see
    docs/serve.md) happens only in a process that serves with vtprune, and a second registration (vLLM
    loads plugins in every process, the serving API registers once more) changes nothing further."""
    done = subprocess.run([sys.executable, "-c", ONCE], capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "VTPRUNE_SERVE"})
    assert done.returncode == 0 and "ONCE OK" in done.stdout, done.stderr[-3000:]
