"""vtprune inside vLLM on tiny random LLaVA-NeXT, LLaVA-OneVision, InternVL, Qwen2-VL, Qwen2.5-VL, Qwen3-VL(-MoE),
GLM-4.1V, Gemma 3 and Gemma 4 models
(serving venv): the processor's kept placeholder count, the kept rows and their positions.  Reference:
the HF model wrapped with the same method and the ``positions`` vLLM matches — Qwen and GLM-4.1V: ``"original"``
(kept tokens at their (t, h, w) mrope positions as EVS rewrites them, the text after the image at its
unpruned positions; Qwen3-VL with its deepstack features cut alike); LLaVA-NeXT, InternVL, Gemma 3 and Gemma 4:
``"renumber"`` (1-D positions numbered afresh; their tiny models are built so that the two numberings
answer differently; LLaVA-NeXT with ``newlines="all"``) — token for token, which a wrong position
breaks."""

import os

import pytest
from served import hf_run, result, serve, until_eos

if os.environ.get("VTPRUNE_REQUIRE_VLLM") != "1":  # CI sets it: there a missing vLLM fails the run
    pytest.importorskip("vllm")

N = 16
STEPS = 4


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return {}


@pytest.fixture
def tiny(request, built, tmp_path_factory):
    """(folder, HF model, batch, model type) of the tiny model the test names (built once per module)."""
    model_type = request.param
    if model_type not in built:
        built[model_type] = _build(model_type, str(tmp_path_factory.mktemp(model_type)))
    return built[model_type]


def _build(model_type, folder):
    import tiny_gemma3
    import tiny_gemma4
    import tiny_glm4v
    import tiny_internvl
    import tiny_llava_next
    import tiny_llava_onevision
    import tiny_qwen
    import transformers as tf

    from vtprune import toy

    tiny = {"internvl": tiny_internvl, "llava_next": tiny_llava_next,
            "llava_onevision": tiny_llava_onevision, "gemma4": tiny_gemma4,
            "gemma3": tiny_gemma3, "glm4v": tiny_glm4v}.get(model_type, tiny_qwen)
    prompt = tiny.prompt
    folder = tiny.build(folder, model_type) if tiny is tiny_qwen else tiny.build(folder)
    model = tf.AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = tf.AutoProcessor.from_pretrained(folder)
    samples = toy.eval_split(n=N)
    gemma = model_type in ("gemma3", "gemma4")
    images = [[s["image"]] if gemma else s["image"] for s in samples]  # (Gemma's: per prompt)
    batch = processor(images=images, text=[prompt(s["question"]) for s in samples], return_tensors="pt", padding=True)
    # vLLM's CPU attention runs Gemma 3's image tokens causally (no bidirectional blocks, stock or pruned): so does
    # transformers without the token types that mark them
    batch.pop("token_type_ids", None)
    return folder, model, batch, model_type


# (selections that read only the features, divprune and pool, equal the HF wrap's on every family in the main
# suite, tests/test_serving_selection.py: here each family's binding runs end to end)
@pytest.mark.parametrize("tiny,method,keep", [("llava_next", None, 1.0),
                                              ("internvl", None, 1.0),
                                              ("qwen2_vl", "pool", 0.25),
                                              ("qwen2_5_vl", None, 1.0),
                                              ("qwen3_vl", None, 1.0),
                                              # summary tokens and the size bias: the bias column travels
                                              # with the rows (before Qwen's position channels), the bias
                                              # inside vLLM's attention (vtprune.serving.slot_bias)
                                              ("llava_next", "uniform:summary=2;size_bias=true", 0.25),
                                              ("llava_next", "pool", 0.25),  # windows on the packed grids
                                              ("internvl", "visionzip", 0.1),  # merged after pixel shuffle
                                              # no [CLS]: the attention each patch receives, over windows too
                                              ("qwen3_vl", "vtc_cls", 0.25),
                                              ("qwen3_vl", "divprune:summary=2", 0.25),
                                              ("qwen3_vl_moe", "divprune", 0.1),  # the MoE language model
                                              ("llava_onevision", "divprune", 0.25),  # SigLIP, anyres-max packing
                                              ("llava_onevision", "fastervlm", 0.25),  # its received attention
                                              # per-layer inputs and shared keys and values, windows on the
                                              # aspect ratio's grid
                                              ("gemma4", None, 1.0), ("gemma4", "divprune", 0.25),
                                              ("gemma4", "pool", 0.25),
                                              # Gemma 3: a square grid of pooled tokens, positions numbered afresh
                                              ("gemma3", None, 1.0), ("gemma3", "divprune", 0.25),
                                              ("gemma3", "pool", 0.25), ("gemma3", "fastervlm", 0.25),
                                              ("gemma3", "holov", 0.25),  # SigLIP's received attention
                                              # GLM-4.1V: Qwen's binding, its placeholders numbered from the
                                              # image grid; the tower's received attention
                                              ("glm4v", None, 1.0), ("glm4v", "divprune", 0.25),
                                              ("glm4v", "fastervlm", 0.25),
                                              # served by their needs, not by a list (vtprune.serving.check);
                                              # each reads the tower as fastervlm does (the [CLS] or received
                                              # attention of the projector's layer), and more:
                                              ("qwen2_5_vl", "vispruner", 0.25),  # the windowed tower
                                              ("internvl", "holov", 0.25),  # InternViT's q/k, 4 patches a token
                                              ("llava_next", "vispruner:scope=tile", 0.25)],  # CLIP tiles
                         indirect=["tiny"])
def test_a_served_tiny_model_keeps_and_answers_as_the_hf_wrap(tiny, method, keep):
    from vtprune.serving import POSITIONS, check
    from vtprune.serving.llava_next import image_layout
    from vtprune.serving.llava_onevision import image_layout as onevision_layout
    from vtprune.serving.rows import kept_count
    from vtprune.spec import parse_spec

    folder, model, batch, model_type = tiny
    name, spec_options = (None, {}) if method is None else (parse_spec(method)[0][0], parse_spec(method)[1])
    newlines = model_type in ("llava_next", "llava_onevision")
    options = {"positions": POSITIONS[model_type], **({"newlines": "all"} if newlines else {})}
    tokens, kept = hf_run(model, batch, name, keep, steps=STEPS, **options, **spec_options)
    served = serve(method or "random", keep, N, folder)
    assert [until_eos(t) for t in served["tokens"]] == tokens
    if kept is not None:
        assert sorted(map(tuple, served["kept"])) == sorted(map(tuple, kept))
    # tokens per image: LLaVA-NeXT (and LLaVA-OneVision) a 4 x 4 base and 2 x 2 crops packed into 8 rows of 8 and
    # a newline each;
    # InternVL 4 crops and a thumbnail of 4 x 4 each; Qwen a 6 x 6 grid of merged tokens; Gemma 4 an 8 x 8 grid (the
    # 224-pixel toy images at a budget of 70 tokens)
    shapes = {"llava_next": (88, None, 8), "llava_onevision": (88, None, 8), "internvl": (80, [(4, 4)] * 5, 0),
              "gemma4": (64, (8, 8), 0), "gemma3": (16, (4, 4), 0)}
    n, grid, _ = shapes.get(model_type, (36, (6, 6), 0))
    layouts = {"llava_next": image_layout, "llava_onevision": onevision_layout}
    counted = kept_count(check(name or "random", keep, spec_options, model_type), n, grid,
                         layouts[model_type](model.config, batch["image_sizes"][0].tolist()) if newlines else None)
    assert kept is None or {len(k) for k in kept} == {counted}  # what the HF wrap kept
    lengths = batch["attention_mask"].sum(1).tolist()
    assert served["prompt_tokens"] == [length - (n - counted) for length in lengths]
    assert counted < n or method is None


@pytest.mark.parametrize("tiny", ["qwen3_5"], indirect=True)
def test_qwen3_5_served_in_bf16_keeps_and_answers_as_the_hf_wrap(tiny):
    """Qwen3.5: vLLM's CPU build runs its linear-attention layers in bf16 only (and a head 128 wide), so the HF wrap
    runs in bf16 too. The kept tokens (``uniform``: the layout's, not the features') and the prompt lengths are
    the HF wrap's, and so is every answer's first token, which reads the whole pruned prefill at its mrope
    positions; later tokens may part on bf16 rounding (stock, unpruned: 15 of 16 answers agree on 4 tokens)."""
    import torch

    from vtprune.serving import check
    from vtprune.serving.rows import kept_count

    folder, model, batch, _ = tiny
    model.to(torch.bfloat16)
    tokens, kept = hf_run(model, batch, "uniform", 0.25, steps=STEPS, positions="original")
    served = serve("uniform", 0.25, N, folder)
    assert sorted(map(tuple, served["kept"])) == sorted(map(tuple, kept))
    answers = [until_eos(t) for t in served["tokens"]]
    assert [a[:1] for a in answers] == [t[:1] for t in tokens]
    assert sum(a == t for a, t in zip(answers, tokens)) >= N - 3
    counted = kept_count(check("uniform", 0.25, {}, "qwen3_5"), 36, (6, 6))
    assert counted == 9 and {len(k) for k in kept} == {counted}
    assert served["prompt_tokens"] == [length - (36 - counted) for length in batch["attention_mask"].sum(1).tolist()]


PAN = """
import json, os, sys
from vtprune.serving import ENV, check
os.environ[ENV] = json.dumps(check("pool", 0.25, {}, "gemma3").to_dict())
from vtprune.serving.plugin import register
register()
from vllm.config import ModelConfig
from vllm.multimodal import MULTIMODAL_REGISTRY
info = MULTIMODAL_REGISTRY.create_processor(ModelConfig(model=sys.argv[1], dtype="float32", max_model_len=512)).info
hf = info.get_hf_processor()
print("placeholders", info.get_num_image_tokens(image_width=112, image_height=112, processor=hf, mm_kwargs={}))
try:
    info.get_num_image_tokens(image_width=1200, image_height=400, processor=hf, mm_kwargs={"do_pan_and_scan": True})
except ValueError as err:
    print("refused", err)
"""


@pytest.mark.parametrize("tiny", ["gemma3"], indirect=True)
def test_gemma3_serves_whole_images_and_refuses_pan_and_scan_crops(tiny):
    """Processor level (a process of its own: vLLM keeps one input processor per process): a Gemma 3 image's 16
    tokens become the 4 that ``pool`` keeps; a request that asks for pan-and-scan crops (which the served binding
    does not lay out) is refused by name."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", PAN, tiny[0]], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1"))
    lines = done.stdout.splitlines()
    assert "placeholders 4" in lines, done.stderr[-2000:]
    refused = [line for line in lines if line.startswith("refused")]
    assert refused and "3 pan-and-scan crops" in refused[0] and "do_pan_and_scan=False" in refused[0]


MIXED = """
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[5])
from vllm import SamplingParams
from vtprune import toy
from vtprune.serving import LLM
folder, method, keep, media = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
samples = toy.eval_split(n=6)
limits = {"image": 2, "video": 1} if media == "clip" else {"image": 2}
dtype = "bfloat16" if "qwen3_5" in folder else "float32"  # vLLM's CPU build runs Qwen3.5 in bf16 only
engine = json.loads(sys.argv[8]) if len(sys.argv) > 8 else {}  # chunks and the prefix cache (below)
if method == "stock":  # vLLM itself, no vtprune
    import vllm
    llm = vllm.LLM(folder, enforce_eager=True, dtype=dtype, max_model_len=1024, limit_mm_per_prompt=limits, **engine)
else:
    llm = LLM(folder, method=method, keep=keep, enforce_eager=True, dtype=dtype, max_model_len=1024,
              limit_mm_per_prompt=limits, **engine)
requests = []
for i, s in enumerate(samples):
    other = samples[(i + 1) % len(samples)]
    if media == "clip":
        frames, fps = json.loads(sys.argv[7])
        clip = np.stack([np.asarray(samples[(i + k) % len(samples)]["image"].resize((64, 64))) for k in range(frames)])
        meta = {"fps": fps, "frames_indices": list(range(frames)), "total_num_frames": frames,
                "duration": frames / fps, "video_backend": "opencv"}
        data = {"image": s["image"], "video": (clip, meta)}
    else:
        data = {"image": [s["image"], other["image"]]}
    requests.append({"prompt": json.loads(sys.argv[6])[i], "multi_modal_data": data,
                     "mm_processor_kwargs": {"do_sample_frames": False}})
if engine:  # the media again, each under the next request's question: its blocks (and the media's) from the cache
    requests += [dict(r, prompt=n["prompt"]) for r, n in zip(requests, requests[1:] + requests[:1])]
outs = llm.generate(requests, SamplingParams(max_tokens=4, temperature=0.0, logprobs=0), use_tqdm=False)
print("RESULT " + json.dumps({"tokens": [list(o.outputs[0].token_ids) for o in outs],
                              "prompt_tokens": [len(o.prompt_token_ids) for o in outs],
                              "logprobs": [o.outputs[0].cumulative_logprob for o in outs],
                              "cached": [o.num_cached_tokens or 0 for o in outs],
                              "ids": [list(o.prompt_token_ids) for o in outs]}), flush=True)
"""


@pytest.mark.parametrize("model_type,media,method,keep", [("qwen2_5_vl", "images", "divprune", 0.25),
                                                          ("qwen3_vl", "clip", "divprune", 0.25),
                                                          ("qwen3_vl", "clip", "evs", 0.25),
                                                          ("qwen3_5", "clip", "evs", 0.25),  # bf16 (below)
                                                          # a clip as one block, vtprune's own rows: 4 slices at
                                                          # 4/3 position steps (EVS's truncated seconds give 0)
                                                          ("qwen2_5_vl", "clip", "evs", 0.25),
                                                          ("qwen2_5_vl", "clip", "divprune", 0.1),
                                                          ("qwen2_vl", "clip", "vidcom2", 0.25)])
def test_several_media_in_one_prompt_serve_as_the_hf_wrap(tmp_path, model_type, media, method, keep):
    """Two pruned images in one prompt, and an image then a clip (Qwen3-VL: with the clip's own start and end tokens
    around its frames, as transformers 5's processor keeps them): vLLM numbers such a prompt from each image's whole
    grid and rewrites the kept tokens' positions image by image and clip by clip; token for token as the HF wrap.
    Qwen2(.5)-VL clips: 8 frames at 6 fps, 4 temporal slices a third of a second apart (Qwen2.5-VL numbers them 0,
    1, 2, 4: 4 tokens a second)."""
    import json

    import numpy as np
    import tiny_qwen
    import torch
    import transformers as tf

    from vtprune import toy

    folder = tiny_qwen.build(str(tmp_path / model_type), model_type)
    model = tf.AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = tf.AutoProcessor.from_pretrained(folder)
    samples = toy.eval_split(n=6)
    image = "<|vision_start|><|image_pad|><|vision_end|>"
    frames, fps = (4, 2.0) if model_type.startswith("qwen3") else (8, 6.0)
    if media == "clip":
        prompts = [image + "<|vision_start|><|video_pad|><|vision_end|>" + s["question"] for s in samples]
        clips = [np.stack([np.asarray(samples[(i + k) % 6]["image"].resize((64, 64))) for k in range(frames)])
                 for i in range(6)]
        metadata = {"fps": fps, "frames_indices": list(range(frames)), "total_num_frames": frames}
        batch = processor(text=prompts, images=[s["image"] for s in samples], videos=clips,
                          video_metadata=[metadata] * 6, videos_kwargs={"do_sample_frames": False},
                          return_tensors="pt", padding=True)
    else:
        prompts = [image + image + s["question"] for s in samples]
        batch = processor(text=prompts, images=[[s["image"], samples[(i + 1) % 6]["image"]]
                                                for i, s in enumerate(samples)], return_tensors="pt", padding=True)
    if model_type == "qwen3_5":
        model.to(torch.bfloat16)
    tokens, _ = hf_run(model, batch, method, keep, steps=STEPS, positions="original")
    served = result(["-c", MIXED, folder, method, str(keep), media, os.path.dirname(__file__), json.dumps(prompts),
                     json.dumps([frames, fps])])
    answers = [until_eos(t) for t in served["tokens"]]
    if model_type == "qwen3_5":  # bf16: every first token (the whole pruned prefill), later ones may part on rounding
        assert [a[:1] for a in answers] == [t[:1] for t in tokens]
        assert sum(a == t for a, t in zip(answers, tokens)) >= len(tokens) - 2
    else:
        assert answers == tokens
    full = batch["attention_mask"].sum(1).tolist()
    assert all(p < n for p, n in zip(served["prompt_tokens"], full))  # pruned


def _mixed(folder, method, keep, prompts, frames, fps, media="clip", **engine):
    import json

    # VTPRUNE_SERVE dropped: set where a test served in this process, and stock vLLM runs without it
    return result(["-c", MIXED, folder, method, str(keep), media, os.path.dirname(__file__), json.dumps(prompts),
                   json.dumps([frames, fps]), *([json.dumps(engine)] if engine else [])], VTPRUNE_SERVE=None)


def test_a_long_qwen2_5_vl_clip_at_keep_all_serves_as_stock_vllm(tmp_path):
    """A clip whose temporal positions run past its rows and columns (8 frames at 2 fps: slices at 0, 4, 8, 12):
    vLLM continues the text after it at 13, its largest position + 1 (transformers 5 at 6, its widest side), and so
    does the served model's numbering of the prompt: at keep 1 the served answers equal stock vLLM's."""
    import tiny_qwen

    from vtprune import toy

    folder = tiny_qwen.build(str(tmp_path / "qwen2_5_vl"), "qwen2_5_vl")
    samples = toy.eval_split(n=6)
    prompts = ["<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|video_pad|><|vision_end|>" + s["question"]
               for s in samples]
    stock = _mixed(folder, "stock", 1.0, prompts, 8, 2.0)
    served = _mixed(folder, "evs", 1.0, prompts, 8, 2.0)
    assert served["prompt_tokens"] == stock["prompt_tokens"]
    assert served["tokens"] == stock["tokens"], (served, stock)


ONEVISION_CLIPS = """
import json, sys
import numpy as np
from vllm import SamplingParams
from vtprune import toy
from vtprune.serving import LLM, last_kept
folder, method, keep, frames = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
samples = toy.eval_split(n=8)
llm = LLM(folder, method=method, keep=keep, enforce_eager=True, dtype="float32", max_model_len=1024,
          limit_mm_per_prompt={"image": 1, "video": 1})
requests = []
for i, s in enumerate(samples):
    clip = np.stack([np.asarray(samples[(i + k) % len(samples)]["image"].resize((56, 56))) for k in range(frames)])
    requests.append({"prompt": toy.prompt(s["question"]).replace("<image>", "<video>"),
                     "multi_modal_data": {"video": clip}})
if method == "fastervlm":  # it cannot serve a clip: refused by name, the server's images still served
    try:
        llm.generate(requests[:1], SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False)
        refused = ""
    except ValueError as err:
        refused = str(err)
    image = llm.generate([{"prompt": toy.prompt(samples[0]["question"]), "multi_modal_data": {"image":
                          samples[0]["image"]}}], SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False)
    print("RESULT " + json.dumps({"refused": refused, "image_tokens": list(image[0].outputs[0].token_ids)}))
    sys.exit(0)
outs = llm.generate(requests, SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False)
print("RESULT " + json.dumps({"tokens": [list(o.outputs[0].token_ids) for o in outs],
                              "prompt_tokens": [len(o.prompt_token_ids) for o in outs],
                              "kept": last_kept(llm, len(outs))}), flush=True)
"""


@pytest.mark.parametrize("method,keep", [("evs", 0.25), ("divprune", 0.25), ("uniform_time", 0.5)])
def test_llava_onevision_clips_serve_as_the_hf_wrap(tmp_path, method, keep):
    """LLaVA-OneVision clips (6 frames of 2 x 2 tokens and a newline after the last) pruned in vLLM: the prompt's run
    cut to the kept count, the kept tokens those the HF wrap keeps (every newline kept, positions numbered afresh),
    token for token."""

    import numpy as np
    import tiny_llava_onevision
    import transformers as tf

    from vtprune import toy

    folder = tiny_llava_onevision.build(str(tmp_path / "llava_onevision"))
    model = tf.AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = tf.AutoProcessor.from_pretrained(folder)
    samples, frames = toy.eval_split(n=8), 6
    clips = [np.stack([np.asarray(samples[(i + k) % 8]["image"].resize((56, 56))) for k in range(frames)])
             for i in range(8)]
    prompts = [toy.prompt(s["question"]).replace("<image>", "<video>") for s in samples]
    batch = processor(text=prompts, videos=clips, return_tensors="pt", padding=True)
    tokens, kept = hf_run(model, batch, method, keep, steps=STEPS, positions="renumber", newlines="all")
    served = result(["-c", ONEVISION_CLIPS, folder, method, str(keep), str(frames)])
    n = frames * 4 + 1
    assert [len(k) for k in served["kept"]] == [len(k) for k in kept] and all(n - 1 in k for k in kept)
    assert served["kept"] == kept
    assert [until_eos(t) for t in served["tokens"]] == tokens
    full = batch["attention_mask"].sum(1).tolist()
    assert [f - p for f, p in zip(full, served["prompt_tokens"])] == [n - len(k) for k in kept]


def test_a_llava_onevision_server_refuses_a_clip_it_cannot_prune_and_serves_its_images(tmp_path):

    import tiny_llava_onevision

    folder = tiny_llava_onevision.build(str(tmp_path / "llava_onevision"))
    served = result(["-c", ONEVISION_CLIPS, folder, "fastervlm", "0.25", "6"])
    assert "with fastervlm, not its videos: fastervlm reads the vision tower's attention over a clip" in served["refused"]
    assert served["image_tokens"]


@pytest.mark.parametrize("media,method,keep", [("images", "divprune", 0.5), ("clip", "evs", 0.5)])
def test_prefill_chunks_and_cache_hits_inside_pruned_media_answer_as_whole_prefills(tmp_path, media, method, keep):
    """A tiny Qwen2.5-VL's pruned media (two images a prompt; an image and a clip of vtprune's own rows) prefilled in
    chunks of 48 tokens, which end inside media and hold the end of one media and the start of the next, and each
    media requested again under another question, which finds its first blocks in the prefix cache: every answer's
    log-probability as with each prompt prefilled whole (vLLM's own rewrite misplaced such chunks' tokens)."""
    import tiny_qwen
    import transformers as tf

    from vtprune import toy

    folder = tiny_qwen.build(str(tmp_path / "qwen2_5_vl"), "qwen2_5_vl")
    samples = toy.eval_split(n=6)
    image = "<|vision_start|><|image_pad|><|vision_end|>"
    second = "<|vision_start|><|video_pad|><|vision_end|>" if media == "clip" else image
    prompts = [image + second + s["question"] for s in samples]
    whole = _mixed(folder, method, keep, prompts, 8, 6.0, media, enable_prefix_caching=False,
                   max_num_batched_tokens=8192)
    chunked = _mixed(folder, method, keep, prompts, 8, 6.0, media, enable_prefix_caching=True,
                     block_size=32, max_num_batched_tokens=48)
    assert chunked["prompt_tokens"] == whole["prompt_tokens"]
    pads = tf.AutoTokenizer.from_pretrained(folder).convert_tokens_to_ids(["<|image_pad|>", "<|video_pad|>"])
    inside = [c for c, ids in zip(chunked["cached"], chunked["ids"]) if c and {ids[c - 1], ids[c]} <= set(pads)]
    assert not any(whole["cached"]) and inside  # cache hits that end inside a media's kept tokens
    assert chunked["tokens"] == whole["tokens"]
    assert chunked["logprobs"] == pytest.approx(whole["logprobs"], abs=1e-5)
