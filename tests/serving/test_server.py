"""``vtprune serve``: vLLM's OpenAI-compatible server with a vtprune method answers a chat request with an
image, started and asked exactly as docs/serve.md shows (its two shell blocks, on a free port; serving venv
only; skipped where vLLM is not installed)."""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

if os.environ.get("VTPRUNE_REQUIRE_VLLM") != "1":  # CI sets it: there a missing vLLM fails the run
    pytest.importorskip("vllm")

from served import server  # noqa: E402  (after the skip: it needs nothing from vLLM, the tests do)


def _documented():
    """The serve command and the request (shell blocks) of docs/serve.md."""
    page = (pathlib.Path(__file__).parents[2] / "docs" / "serve.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", page[page.index("## A server, and a request"):], re.S)
    return blocks[0].strip(), blocks[1]


def test_openai_server_answers_the_documented_request(tmp_path):
    from vtprune import toy

    serve, request = _documented()
    assert serve.startswith("vtprune serve toy ") and serve.endswith(" --port 8000") and "127.0.0.1:8000" in request
    with server(serve.split()[2:-2]) as (port, _):
        env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
        out = subprocess.run(["bash", "-c", request.replace("127.0.0.1:8000", f"127.0.0.1:{port}")], cwd=tmp_path,
                             capture_output=True, text=True, timeout=180, env=env)
    assert out.returncode == 0, out.stderr
    reply = json.loads(out.stdout)
    answer = reply["choices"][0]["message"]["content"].strip()
    sample = toy.eval_split(n=1)[0]
    assert sample["question"] in request  # the documented question is about the documented scene
    answers = {s["answer"] for s in toy.eval_split(n=200)}  # colours, shapes, yes/no, counts
    assert answer and answer.split()[0] in answers, answer
    assert reply["usage"]["prompt_tokens"] < 256 - 100  # 64 of the image's 256 tokens, and the question


def test_the_toy_video_model_served_prunes_a_clip_sent_as_a_video_url(tmp_path):
    """``vtprune serve toy-video --method evs --keep 0.25`` answers a chat request with a clip (a lossless AVI as a
    data URL, decoded frame for frame): 32 of its 128 tokens reach the LLM (the prompt 96 shorter than unpruned),
    and the answer is right (as the HF wrap's is on this clip: tests/serving/test_video_served.py)."""
    import base64
    import urllib.request

    import cv2
    import numpy as np

    from vtprune import toy_video as tv

    sample = tv.eval_split(n=1)[0]
    frames = np.ascontiguousarray(sample["frames"].transpose(0, 2, 3, 1))
    path = str(tmp_path / "clip.avi")
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"FFV1"), tv.FPS, (tv.FRAME, tv.FRAME))
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    url = "data:video/x-msvideo;base64," + base64.b64encode(open(path, "rb").read()).decode()
    body = {"model": "toy-video", "max_tokens": 4, "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": sample["question"]}]}]}
    with server(["toy-video", "--method", "evs", "--keep", "0.25"]) as (port, _):
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as response:
            reply = json.loads(response.read())
    unpruned = len(tv.prompt_ids(sample["question"]))
    assert reply["usage"]["prompt_tokens"] == unpruned - 96
    assert reply["choices"][0]["message"]["content"].split() == [sample["answer"]]
