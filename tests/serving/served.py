"""Shared by the serving tests: serve one config in a fresh process (``worker.py``) and read its answers; the
HF reference run."""

import functools
import json
import os
import subprocess
import sys

EOS = 3  # the toy tokenizer's end of sequence (the tiny Qwen's too: it extends that tokenizer)


@functools.lru_cache(maxsize=None)  # one engine start per config in a test run
def serve(method, keep, n, model="toy"):
    """Answers, tokens, prompt lengths and kept indices of ``n`` toy questions served with one config."""
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_ALLOW_INSECURE_SERIALIZATION="1")
    out = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "worker.py"), method, str(keep),
                          str(n), model], capture_output=True, text=True, env=env, timeout=600)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, out.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


def first_word(text):
    words = text.split()
    return words[0] if words else ""


def until_eos(tokens):
    tokens = list(tokens)
    return tokens[:tokens.index(EOS) + 1] if EOS in tokens else tokens


def hf_run(model, batch, method=None, keep=1.0, steps=4, **options):
    """The HF reference: per sample, greedy tokens (up to EOS) of ``model`` wrapped with ``method`` (unwrapped
    when None), and per image its kept indices (None unwrapped)."""
    import torch

    import vtprune

    if method is not None:
        vtprune.wrap(model, method, keep=keep, **options)
    try:
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=steps, do_sample=False)
        kept = [images[0].tolist() for images in vtprune.last_kept(model)] if method else None
    finally:
        if method is not None:
            vtprune.unwrap(model)
    return [until_eos(row.tolist()) for row in out[:, batch["input_ids"].shape[1]:]], kept
