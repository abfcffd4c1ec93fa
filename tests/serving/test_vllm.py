"""vtprune inside vLLM on the toy model (runs in the serving venv: ``bash scripts/vllm_cpu_env.sh DIR``, then
``DIR/bin/python -m pytest tests/serving``; skipped where vLLM is not installed).  Each config is served
in its own process (vLLM keeps a model's input processor per process).  References: the HF model, and
the HF wrap of the same method with ``positions="renumber"`` (vLLM numbers a pruned prompt afresh)."""

import json
import os
import subprocess
import sys

import pytest

if os.environ.get("VTPRUNE_REQUIRE_VLLM") != "1":  # CI sets it: there a missing vLLM fails the run
    pytest.importorskip("vllm")

N = 40
STEPS = 4
EOS = 3  # the toy's end-of-sequence token


def serve(method, keep, n=N):
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_ALLOW_INSECURE_SERIALIZATION="1")
    out = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "worker.py"), method, str(keep),
                          str(n)], capture_output=True, text=True, env=env, timeout=600)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, out.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


def _first(text):
    words = text.split()
    return words[0] if words else ""


def _until_eos(tokens):
    tokens = list(tokens)
    return tokens[:tokens.index(EOS) + 1] if EOS in tokens else tokens


@pytest.fixture(scope="module")
def toy_batch():
    from vtprune import toy

    model, processor = toy.load()
    samples = toy.eval_split(n=N)
    batch = processor(images=[s["image"] for s in samples], text=[toy.prompt(s["question"]) for s in samples],
                      return_tensors="pt", padding=True)
    return model, processor, samples, batch


def hf_run(toy_batch, method=None, keep=1.0):
    """Per sample: the HF model's greedy tokens (up to the toy's EOS), and per image its kept indices."""
    import torch

    import vtprune

    model, _, _, batch = toy_batch
    if method is not None:
        vtprune.wrap(model, method, keep=keep, positions="renumber")
    try:
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=STEPS, do_sample=False)
        kept = [images[0].tolist() for images in vtprune.last_kept(model)] if method else None
    finally:
        if method is not None:
            vtprune.unwrap(model)
    return [_until_eos(row.tolist()) for row in out[:, batch["input_ids"].shape[1]:]], kept


def test_keep_all_answers_as_the_hf_model(toy_batch):
    _, processor, samples, _ = toy_batch
    tokens, _ = hf_run(toy_batch)
    served = serve("random", 1.0)
    assert [_until_eos(t) for t in served["tokens"]] == tokens
    hf = [_first(processor.decode(t, skip_special_tokens=True)) for t in tokens]
    assert sum(a == s["answer"] for a, s in zip(hf, samples)) >= 0.9 * N
    assert len(served["prompt_tokens"]) == N and all(len(k) == 256 for k in served["kept"])


@pytest.mark.parametrize("method,keep", [("uniform", 0.25), ("pool", 0.25), ("divprune", 0.1), ("fastervlm", 0.1),
                                         ("vtc_cls", 0.25), ("visionzip", 0.1)])
def test_a_served_method_keeps_and_answers_as_the_hf_wrap(toy_batch, method, keep):
    """The same kept tokens per image as the HF wrap, the same greedy tokens as the HF wrap with positions
    renumbered, and the prompt shorter by the dropped count."""
    from vtprune.serving import check
    from vtprune.serving.llava import kept_count

    tokens, kept = hf_run(toy_batch, method, keep)
    served = serve(method, keep)
    # vLLM's tower (fused q/k/v, its own attention kernel) differs from HF's in the last float bits, so a
    # near-tie between two tokens may go the other way (measured: divprune at 0.1, whose greedy picks then
    # diverge, 37/40 images alike, the others 84.6% alike; the other methods 40/40): nearly every image keeps
    # exactly the HF wrap's tokens
    # (images may be embedded in any order: each HF image is matched with the served image closest to it)
    served_sets = [set(k) for k in served["kept"]]
    same = sum(set(k) in served_sets for k in kept)
    overlap = min(max(len(set(k) & s) for s in served_sets) / len(k) for k in kept)
    answers = sum(_until_eos(a) == b for a, b in zip(served["tokens"], tokens))
    print(f"{method} {keep}: images kept alike {same}/{N}, min overlap {overlap:.3f}, answers alike {answers}/{N}")
    assert same >= 0.9 * N and overlap >= 0.75, (same, overlap)
    assert answers >= 0.9 * N, answers
    dropped = 256 - kept_count(check(method, keep, {}), 256)
    lengths = toy_batch[3]["attention_mask"].sum(1).tolist()
    assert served["prompt_tokens"] == [length - dropped for length in lengths]


def test_a_method_beats_random_at_keep_0_1(toy_batch):
    samples = toy_batch[2]
    right = {m: sum(_first(a) == s["answer"] for a, s in zip(serve(m, 0.1)["answers"], samples))
             for m in ("random", "divprune")}
    assert right["divprune"] > right["random"], right
