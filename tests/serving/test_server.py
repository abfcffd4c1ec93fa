"""``vtprune serve``: vLLM's OpenAI-compatible server with a vtprune method answers a chat request with an
image (serving venv only; skipped where vLLM is not installed)."""

import base64
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

if os.environ.get("VTPRUNE_REQUIRE_VLLM") != "1":  # CI sets it: there a missing vLLM fails the run
    pytest.importorskip("vllm")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url, payload):
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def test_openai_server_answers_a_chat_request_with_an_image():
    from vtprune import toy

    port = _free_port()
    vtprune_bin = shutil.which("vtprune", path=os.path.dirname(sys.executable))
    server = subprocess.Popen([vtprune_bin, "serve", "toy", "--method", "visionzip", "--keep", "0.25", "--port",
                               str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while True:
            assert server.poll() is None, server.stdout.read()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5)
                break
            except OSError:
                assert time.time() < deadline, "the server did not come up in 5 minutes"
                time.sleep(2)
        sample = toy.eval_split(n=1)[0]
        buffer = io.BytesIO()
        sample["image"].save(buffer, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        reply = _post(f"http://127.0.0.1:{port}/v1/chat/completions", {
            "model": "toy", "max_tokens": 4, "temperature": 0.0,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": sample["question"]}]}]})
        answer = reply["choices"][0]["message"]["content"].strip()
        answers = {s["answer"] for s in toy.eval_split(n=200)}  # colours, shapes, yes/no, counts
        assert answer and answer.split()[0] in answers, answer
        assert reply["usage"]["prompt_tokens"] < 256 - 100  # 64 of the image's 256 tokens, and the question
    finally:
        server.terminate()
        server.wait(timeout=60)
