"""vtprune inside vLLM on the toy model (runs in the serving venv: ``bash scripts/vllm_cpu_env.sh DIR``, then
``DIR/bin/python -m pytest tests/serving``; skipped where vLLM is not installed).  Each config is served
in its own process (vLLM keeps a model's input processor per process)."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("vllm")

N = 40


def serve(method, keep, n=N):
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    out = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "worker.py"), method, str(keep),
                          str(n)], capture_output=True, text=True, env=env, timeout=600)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, out.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


def _first(text):
    words = text.split()
    return words[0] if words else ""


@pytest.fixture(scope="module")
def hf_answers():
    import torch

    from vtprune import toy

    model, processor = toy.load()
    samples = toy.eval_split(n=N)
    batch = processor(images=[s["image"] for s in samples], text=[toy.prompt(s["question"]) for s in samples],
                      return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=4, do_sample=False)
    texts = processor.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return samples, [_first(t) for t in texts]


def test_keep_all_answers_as_the_hf_model(hf_answers):
    samples, hf = hf_answers
    served = serve("random", 1.0)
    assert [_first(a) for a in served["answers"]] == hf
    assert sum(a == s["answer"] for a, s in zip(hf, samples)) >= 0.9 * N


def test_pruned_prompts_are_shorter_and_a_method_beats_random(hf_answers):
    samples, _ = hf_answers
    full = serve("random", 1.0, n=4)["prompt_tokens"][0]
    uniform = serve("uniform", 0.25, n=4)
    assert uniform["prompt_tokens"][0] == full - (256 - 64)
    right = {m: sum(_first(a) == s["answer"] for a, s in zip(serve(m, 0.1)["answers"], samples))
             for m in ("random", "divprune")}
    assert right["divprune"] > right["random"], right
