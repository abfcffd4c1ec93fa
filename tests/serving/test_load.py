"""A bounded load test of ``vtprune serve`` on the toy model, with faults: a few hundred chat requests at
concurrency 8, a share of them bad (corrupt or non-image data, too many images, a prompt past the context,
malformed JSON, an unknown model, a budget of its own above the server's or malformed), the rest valid (1x1 and
very large images among them, some with a budget of their own). Every valid request is answered, with the image
tokens its budget keeps, every bad one gets a 4xx, the server is healthy afterwards and its memory flat."""

import base64
import io
import json
import os
import random
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

if os.environ.get("VTPRUNE_REQUIRE_VLLM") != "1":  # CI sets it: there a missing vLLM fails the run
    pytest.importorskip("vllm")

from served import server  # noqa: E402

VALID, BAD, CONCURRENCY = 240, 60, 8


def _png(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _chat(images, text, model="toy", keep=None):
    content = [{"type": "image_url", "image_url": {"url": url}} for url in images] + [{"type": "text", "text": text}]
    body = {"model": model, "max_tokens": 2, "temperature": 0.0, "messages": [{"role": "user", "content": content}]}
    if keep is not None:  # the request's own budget (vtprune serve --request-keep)
        body["mm_processor_kwargs"] = {"vtprune": {"keep": keep}}
    return body


OWN = {11: 0.1, 31: 16}  # sample -> a request's own keep, on every other request of that sample


def _requests():
    """``[(kind, body bytes, valid)]``: the valid ones (toy questions; a 1x1 and a 2048x2048 image among them)
    and the bad ones, shuffled."""
    from PIL import Image

    from vtprune import toy

    samples = toy.eval_split(n=40)
    urls = [_png(s["image"]) for s in samples]
    out = []
    for i in range(VALID):
        s, url = samples[i % len(samples)], urls[i % len(samples)]
        if i % 40 == 7:
            url = _png(Image.new("RGB", (1, 1), (200, 30, 30)))
        elif i % 40 == 23:
            url = _png(s["image"].resize((2048, 2048)))
        keep = OWN.get(i % 40) if i % 80 < 40 else None
        out.append((f"valid {i % 40} {keep}", json.dumps(_chat([url], s["question"], keep=keep)).encode(), True))
    bad = {
        "corrupt image": lambda: _chat(["data:image/png;base64," + base64.b64encode(os.urandom(300)).decode()], "what ?"),
        "not an image": lambda: _chat(["data:image/png;base64," + base64.b64encode(b"plain text").decode()], "what ?"),
        "too many images": lambda: _chat(urls[:3], "what color is the square ?"),
        "past the context": lambda: _chat(urls[:1], " ".join(["what color is the square ?"] * 200)),
        "unknown model": lambda: _chat(urls[:1], "what ?", model="no-such-model"),
        "a keep above the server's": lambda: _chat(urls[:1], "what ?", keep=0.5),
        "a keep out of range": lambda: _chat(urls[:1], "what ?", keep=-3),
    }
    for i in range(BAD):
        kind = list(bad) + ["malformed JSON"]
        kind = kind[i % len(kind)]
        body = b'{"model": "toy", "messages": [' if kind == "malformed JSON" else json.dumps(bad[kind]()).encode()
        out.append((kind, body, False))
    random.Random(0).shuffle(out)
    return out


def _post(port, body):
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, err.read()[:300]


def _rss(pid) -> int:
    """Resident bytes of the server and its children (vLLM's engine core runs in a child)."""
    import psutil

    process = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [process] + process.children(recursive=True))


def test_the_server_answers_valid_requests_and_refuses_bad_ones_under_load():
    from vtprune import toy

    answers = {s["answer"] for s in toy.eval_split(n=200)}
    requests = _requests()
    with server(["toy", "--method", "fastervlm", "--keep", "0.25", "--request-keep"]) as (port, process):
        with ThreadPoolExecutor(CONCURRENCY) as pool:  # warm-up: the first requests grow caches once
            list(pool.map(lambda r: _post(port, r[1]), requests[:32]))
        before = _rss(process.pid)
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            results = list(pool.map(lambda r: _post(port, r[1]), requests))
        after = _rss(process.pid)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=30) as health:
            assert health.status == 200
        status, reply = _post(port, requests[[r[2] for r in requests].index(True)][1])
        assert status == 200  # still answering
    wrong = []
    for (kind, _, valid), (status, reply) in zip(requests, results):
        if valid:
            ok = status == 200 and reply["choices"][0]["message"]["content"].split()[:1] != [] and \
                reply["choices"][0]["message"]["content"].split()[0] in answers
        else:
            ok = 400 <= status < 500
        if not ok:
            wrong.append((kind, status, str(reply)[:200]))
    assert not wrong, wrong[:5]
    assert sum(valid for _, _, valid in requests) == VALID and len(results) == VALID + BAD
    refused = {}
    for (kind, _, valid), (status, _) in zip(requests, results):
        if not valid:
            refused.setdefault(kind, set()).add(status)
    assert len(refused) == 8 and all(codes <= {400, 404, 413, 422} for codes in refused.values()), refused
    assert refused["a keep above the server's"] == refused["a keep out of range"] == {400}
    prompt = {kind: reply["usage"]["prompt_tokens"] for (kind, _, valid), (_, reply) in zip(requests, results) if valid}
    for sample, keep in OWN.items():  # the same question and image at its own keep: 64 image tokens less those kept
        assert prompt[f"valid {sample} None"] - prompt[f"valid {sample} {keep}"] == 64 - {0.1: 26, 16: 16}[keep]
    assert after < before * 1.1 + 64 * 2**20, (before, after)  # flat: no growth with the requests served
