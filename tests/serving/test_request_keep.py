"""A budget per request (``mm_processor_kwargs={"vtprune": {"keep": K}}``, ``vtprune.serving.request_keep``):
requests with their own ``keep`` and without one, in one ``generate`` call, each answered token for token as the
HF wrap at that request's ``keep`` answers, with its kept indices and prompt length; a bad budget refused by name
before anything runs (the HTTP 400 is in test_load.py)."""

import json
import os
import subprocess
import sys

import pytest
from served import hf_run, until_eos

if os.environ.get("VTPRUNE_REQUIRE_VLLM") != "1":  # CI sets it: there a missing vLLM fails the run
    pytest.importorskip("vllm")

N = 12
# a request's own keep (None: the server's, 0.25 below; a count under its 64 and 9), repeated over the prompts
KEEPS = {"toy": [0.1, None, 10, 0.25], "qwen2_5_vl": [0.1, None, 5, 0.25]}

SCRIPT = """
import json, os, sys
sys.path.insert(0, sys.argv[3])
from vllm import SamplingParams
from vtprune import toy
from vtprune.serving import LLM, last_kept
model, method, n = sys.argv[1], sys.argv[2], int(sys.argv[4])
keeps = json.loads(sys.argv[5])
if model == "toy":
    prompt, options = toy.prompt, {}
else:
    import tiny_qwen
    prompt, options = tiny_qwen.prompt, {"dtype": "float32", "max_model_len": 512}
samples = toy.eval_split(n=n)
llm = LLM(model, method=method, keep=0.25, enforce_eager=True, **options)
requests = [{"prompt": prompt(s["question"]), "multi_modal_data": {"image": s["image"]},
             **({"mm_processor_kwargs": {"vtprune": {"keep": k}}} if k is not None else {})}
            for s, k in zip(samples, keeps)]
outs = llm.generate(requests, SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False)
refused = []
for bad in ({"keep": 0.5}, {"keep": 0}, {"keep": "all"}, {"budget": 0.1}, 0.1):
    try:
        llm.generate([dict(requests[0], mm_processor_kwargs={"vtprune": bad})], SamplingParams(max_tokens=1),
                     use_tqdm=False)
        refused.append(None)
    except ValueError as err:
        refused.append(str(err))
print("RESULT " + json.dumps({"tokens": [list(o.outputs[0].token_ids) for o in outs],
                              "prompt_tokens": [len(o.prompt_token_ids) for o in outs],
                              "kept": last_kept(llm, n + 5)[:n], "refused": refused}), flush=True)
"""


def _serve(model, method, keeps):
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_ALLOW_INSECURE_SERIALIZATION="1",
               VLLM_ENABLE_V1_MULTIPROCESSING="0")
    out = subprocess.run([sys.executable, "-c", SCRIPT, model, method, os.path.dirname(__file__), str(len(keeps)),
                          json.dumps(keeps)], capture_output=True, text=True, env=env, timeout=600)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, out.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.parametrize("model,method", [("toy", "fastervlm"), ("qwen2_5_vl", "divprune")])
def test_each_request_is_pruned_to_its_own_keep_as_the_hf_wrap_prunes_it(model, method, tmp_path):
    import transformers as tf

    from vtprune import toy
    from vtprune.serving import POSITIONS

    keeps = (KEEPS[model] * N)[:N]
    if model == "toy":
        folder = model
        hf, processor = toy.load()
        prompt, model_type = toy.prompt, "llava"
    else:
        import tiny_qwen

        folder = tiny_qwen.build(str(tmp_path / model), model)
        hf = tf.AutoModelForImageTextToText.from_pretrained(folder).eval()
        processor = tf.AutoProcessor.from_pretrained(folder)
        prompt, model_type = tiny_qwen.prompt, model
    served = _serve(folder, method, keeps)
    samples = toy.eval_split(n=N)
    everything = []
    for keep in set(keeps):
        rows = [i for i, k in enumerate(keeps) if k == keep]
        batch = processor(images=[samples[i]["image"] for i in rows], text=[prompt(samples[i]["question"]) for i in rows],
                          return_tensors="pt", padding=True)
        tokens, kept = hf_run(hf, batch, method, 0.25 if keep is None else keep, steps=4,
                              positions=POSITIONS[model_type])
        assert [until_eos(served["tokens"][i]) for i in rows] == tokens, keep
        everything += kept
        lengths = batch["attention_mask"].sum(1).tolist()
        n = {"llava": 256}.get(model_type, 36)
        assert [served["prompt_tokens"][i] for i in rows] == [length - n + len(k) for length, k in zip(lengths, kept)]
    assert sorted(map(tuple, served["kept"])) == sorted(map(tuple, everything))  # (vLLM's order of embedding)
    assert sorted({len(k) for k in served["kept"]}) == sorted({"toy": [10, 26, 64], "qwen2_5_vl": [4, 5, 9]}[model])
    refused = served["refused"]
    assert None not in refused, refused
    assert "more than the server's keep=0.25" in refused[0]
    assert all("mm_processor_kwargs['vtprune']" in r for r in refused)
