"""Videos served pruned (``vtprune.serving.qwen_video``): the toy video model (a tiny Qwen3-VL, 8 temporal slices of
4 x 4 tokens a clip) in vLLM with a vtprune method answers token for token as the HF wrap with that method
(``positions="original"``: vLLM's Qwen3-VL path keeps a clip's kept tokens at their unpruned positions and every
frame's timestamp), keeps the same tokens of each clip and sizes each prompt by them; a request's own keep applies
to its clip; a method that cannot serve a clip is refused per request, by name."""

import json
import os

import pytest
from served import result, until_eos

if os.environ.get("VTPRUNE_REQUIRE_VLLM") != "1":  # CI sets it: there a missing vLLM fails the run
    pytest.importorskip("vllm")

N = 8
TOKENS = 128  # a toy clip's tokens

SCRIPT = """
import json, sys
import numpy as np
from vllm import SamplingParams
from vtprune import toy_video as tv
from vtprune.serving import LLM, last_kept
method, keep, keeps = sys.argv[1], float(sys.argv[2]), json.loads(sys.argv[3])
samples = tv.eval_split(n=len(keeps))
llm = LLM("toy-video", method=method, keep=keep, enforce_eager=True)
requests = [{"prompt": tv.served_prompt(s["question"]),
             "multi_modal_data": {"video": (np.ascontiguousarray(s["frames"].transpose(0, 2, 3, 1)), tv.video_metadata())},
             **({"mm_processor_kwargs": {"vtprune": {"keep": k}}} if k is not None else {})}
            for s, k in zip(samples, keeps)]
try:
    outs = llm.generate(requests, SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False)
except ValueError as err:
    print("RESULT " + json.dumps({"refused": str(err)}), flush=True)
else:
    print("RESULT " + json.dumps({"tokens": [list(o.outputs[0].token_ids) for o in outs],
                                  "prompt_tokens": [len(o.prompt_token_ids) for o in outs],
                                  "kept": last_kept(llm, len(keeps))}), flush=True)
"""


def _serve(method, keep, keeps):
    return result(["-c", SCRIPT, method, str(keep), json.dumps(keeps)], VLLM_ALLOW_INSECURE_SERIALIZATION="1")


@pytest.fixture(scope="module")
def toy():
    from vtprune import toy_video as tv

    model, _ = tv.load()
    samples = tv.eval_split(n=N)
    return model, samples


def _hf(model, samples, method, keep):
    """The HF wrap's answers (up to EOS) and kept tokens of each clip."""
    import torch

    import vtprune
    from vtprune import toy_video as tv

    batch = tv.inputs([s["frames"] for s in samples], [s["question"] for s in samples])
    with vtprune.wrapped(model, method, keep=keep, positions="original"):
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=4, do_sample=False)
        kept = [clip[0].tolist() for clip in vtprune.last_kept(model)]
    lengths = batch["attention_mask"].sum(1).tolist()
    return [until_eos(r.tolist()) for r in out[:, batch["input_ids"].shape[1]:]], kept, lengths


@pytest.mark.parametrize("method,keep", [("evs", 0.25), ("vidcom2", 0.1), ("uniform_time", 0.25), ("divprune", 0.1)])
def test_a_served_clip_is_pruned_and_answered_as_the_hf_wrap(toy, method, keep):
    model, samples = toy
    tokens, kept, lengths = _hf(model, samples, method, keep)
    served = _serve(method, keep, [None] * N)
    assert [until_eos(t) for t in served["tokens"]] == tokens
    assert sorted(map(tuple, served["kept"])) == sorted(map(tuple, kept))
    assert served["prompt_tokens"] == [length - TOKENS + len(k) for length, k in zip(lengths, kept)]
    assert {len(k) for k in kept} < {n for n in range(1, TOKENS)}  # pruned


def test_a_clips_own_keep_applies_to_it(toy):
    """A server at evs 0.25; every other request asks for 0.1: each half as the HF wrap at its keep."""
    model, samples = toy
    keeps = [0.1 if i % 2 == 0 else None for i in range(N)]
    served = _serve("evs", 0.25, keeps)
    everything = []
    for keep, rows in ((0.1, range(0, N, 2)), (0.25, range(1, N, 2))):
        tokens, kept, lengths = _hf(model, [samples[i] for i in rows], "evs", keep)
        assert [until_eos(served["tokens"][i]) for i in rows] == tokens, keep
        assert [served["prompt_tokens"][i] for i in rows] == [n - TOKENS + len(k) for n, k in zip(lengths, kept)]
        everything += kept
    assert sorted(map(tuple, served["kept"])) == sorted(map(tuple, everything))
    assert {len(k) for k in everything} == {16, 32}  # EVS keeps the first slice whole (16 > int(128 x 0.1)); int(128 x 0.25)


@pytest.mark.parametrize("method,why", [("fastervlm", "fastervlm reads the vision tower's attention over a clip"),
                                        ("pool", "pool merges a clip's tokens")])
def test_a_method_that_cannot_serve_a_clip_is_refused_by_name(method, why):
    refused = _serve(method, 0.25, [None])["refused"]
    assert f"with {method}, not its videos: {why}" in refused and "evs, vidcom2" in refused


CACHED = """
import json, sys
import numpy as np
from vllm import SamplingParams
from vtprune import toy_video as tv
from vtprune.serving import LLM
samples = tv.eval_split(n=6)
llm = LLM("toy-video", method=sys.argv[1], keep=float(sys.argv[2]), enforce_eager=True, enable_prefix_caching=True,
          block_size=32)
requests = [{"prompt": tv.served_prompt(" ".join([s["question"]] * 9)),  # the text after the clip past a block
             "multi_modal_data": {"video": (np.ascontiguousarray(s["frames"].transpose(0, 2, 3, 1)), tv.video_metadata())}}
            for s in samples]
params = SamplingParams(max_tokens=4, temperature=0.0, logprobs=1)
first = llm.generate(requests, params, use_tqdm=False)
again = llm.generate(requests, params, use_tqdm=False)  # the clip and what follows it up to a block: from the cache
print("RESULT " + json.dumps({"cached": [o.num_cached_tokens for o in again], "prompt": [len(o.prompt_token_ids) for o in again],
                              "first": [o.outputs[0].cumulative_logprob for o in first],
                              "again": [o.outputs[0].cumulative_logprob for o in again]}), flush=True)
"""


def test_a_prefix_cache_hit_past_a_pruned_clip_answers_as_without_it():
    """The same clip requests twice: the second finds the clip and the text after it, up to a block, in vLLM's
    prefix cache, so its remaining text is numbered before the clip is embedded (vLLM's EVS lumps a pruned clip's
    kept tokens into its first frame there, and numbered that text wrong): the served model numbers it as the unpruned
    clip does, and both passes agree."""
    served = result(["-c", CACHED, "evs", "0.25"])
    clip_end = 2 + 8 * 4 + 32  # "<s> USER:", 8 slices of a stamp (2 tokens), start and end; evs 0.25 keeps 32
    assert all(clip_end < c < p for c, p in zip(served["cached"], served["prompt"]))
    assert served["again"] == pytest.approx(served["first"], abs=1e-4)


CHUNKED = """
import json, sys
import numpy as np
from vllm import SamplingParams
from vtprune import toy_video as tv
from vtprune.serving import LLM
samples = tv.eval_split(n=6)
llm = LLM("toy-video", method=sys.argv[1], keep=float(sys.argv[2]), enforce_eager=True, **json.loads(sys.argv[3]))
clips = [(np.ascontiguousarray(s["frames"].transpose(0, 2, 3, 1)), tv.video_metadata()) for s in samples]
questions = [s["question"] for s in samples]
requests = [{"prompt": tv.served_prompt(q), "multi_modal_data": {"video": c}}
            for c, q in zip(clips + clips, questions + questions[1:] + questions[:1])]  # each clip twice
outs = llm.generate(requests, SamplingParams(max_tokens=4, temperature=0.0, logprobs=0), use_tqdm=False)
print("RESULT " + json.dumps({"tokens": [list(o.outputs[0].token_ids) for o in outs],
                              "logprobs": [o.outputs[0].cumulative_logprob for o in outs],
                              "cached": [o.num_cached_tokens or 0 for o in outs]}), flush=True)
"""


@pytest.mark.parametrize("method,keep", [("evs", 0.25), ("divprune", 0.1)])
def test_prefill_chunks_and_cache_hits_inside_a_pruned_clip_answer_as_whole_prefills(method, keep):
    """Each clip prefilled in chunks of 48 tokens (they end inside clips: a clip's frames and stamps are one media to
    vLLM) and requested again under another question, which finds the clip's first blocks (32 or 64 tokens, short of
    its end) in the prefix cache: every answer's log-probability as with each prompt prefilled whole.  vLLM's rewrite
    took a Qwen3-VL clip cut there as done (its answers moved by up to 0.3)."""
    def run(**engine):
        return result(["-c", CHUNKED, method, str(keep), json.dumps(engine)], VLLM_ALLOW_INSECURE_SERIALIZATION="1")

    whole = run(enable_prefix_caching=False, max_num_batched_tokens=8192)
    chunked = run(enable_prefix_caching=True, block_size=32, max_num_batched_tokens=48)
    clip_end = 2 + 8 * 4 + int(TOKENS * keep)  # "<s> USER:", a stamp (2 tokens), start and end a slice, kept tokens
    hits = chunked["cached"][len(chunked["cached"]) // 2:]  # the second request of each clip
    assert not any(whole["cached"]) and all(2 < c < clip_end for c in hits)  # hits that end inside the clip
    assert chunked["tokens"] == whole["tokens"]
    assert chunked["logprobs"] == pytest.approx(whole["logprobs"], abs=1e-5)
