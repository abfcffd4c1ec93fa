"""Shared by the serving tests: serve one config in a fresh process (``worker.py``) and read its answers; the
HF reference run."""

import contextlib
import functools
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

EOS = 3  # the toy tokenizer's end of sequence (the tiny Qwen's too: it extends that tokenizer)


def result(argv, timeout=600, **env):
    """Run ``argv`` (a script and its arguments, or ``-c`` and a program) under this Python in a fresh process, vLLM's
    engine inside that process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) with a 1 GB KV cache, ``env`` on top (a value
    of None drops the variable); the JSON of the last line it prints that starts ``RESULT ``."""
    full = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    for key, value in env.items():
        if value is None:
            full.pop(key, None)
        else:
            full[key] = value
    out = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=full, timeout=timeout)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, out.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


@functools.lru_cache(maxsize=None)  # one engine start per config in a test run
def serve(method, keep, n, model="toy", engine_process=False):
    """Answers, tokens, prompt lengths and kept indices of ``n`` toy questions served with one config.

    The engine runs inside the worker's process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): one import of
    vLLM and torch instead of three, about 15 s per config instead of 40. ``engine_process=True`` keeps
    vLLM's default, the engine core in a process of its own, as ``vtprune serve`` runs it (the plugin is
    then loaded in each process; tests/serving/test_extension.py and test_server.py run that way)."""
    return result([os.path.join(os.path.dirname(__file__), "worker.py"), method, str(keep), str(n), model],
                  VLLM_ALLOW_INSECURE_SERIALIZATION="1", VLLM_ENABLE_V1_MULTIPROCESSING="1" if engine_process else "0")


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


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(args, timeout=300):
    """``vtprune serve ARGS --port P`` running; yields ``(port, process)`` once ``/v1/models`` answers."""
    port = free_port()
    vtprune_bin = shutil.which("vtprune", path=os.path.dirname(sys.executable))
    process = subprocess.Popen([vtprune_bin, "serve", *args, "--port", str(port)], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + timeout
        while True:
            assert process.poll() is None, process.stdout.read()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5)
                break
            except OSError:
                assert time.time() < deadline, f"the server did not come up in {timeout} s"
                time.sleep(2)
        yield port, process
    finally:
        process.terminate()
        process.wait(timeout=60)
