"""The lmms-eval plugin on clips: the toy video task through lmms-eval's own Qwen3-VL loop, and the two pieces that
let it run without torchvision (``vtprune.eval.qwen_clips`` against ``qwen_vl_utils`` itself,
``vtprune.qwen_processor.QwenProcessor`` against the toy model's inputs; against transformers' processors in
``tests/serving/test_video_inputs.py``)."""

import importlib.util
import json
import math
import os
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vtprune
from vtprune import toy_video
from vtprune.eval import qwen_clips, toytask
from vtprune.qwen_processor import QwenProcessor, load, slice_times

from test_eval import need_lmms


@pytest.fixture(scope="module")
def video_task(tmp_path_factory):
    return toytask.write(tmp_path_factory.mktemp("toy_video_task"), n=10, video=True)


def test_lmms_eval_on_the_toy_video_task_matches_native(video_task):
    """lmms-eval's Qwen3-VL chat class (batches of 4, sorted its way, ``generate``), reading the clips with vtprune's
    reader and processor: the same answer per question as ``toy_video.evaluate`` of the same wrap, and the visual
    tokens the wrap counted."""
    need_lmms()
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from vtprune.eval.lmms import VtpruneQwen3Vl

    samples = toy_video.eval_split(n=10)
    model = VtpruneQwen3Vl(pretrained="toy-video", device="cpu", dtype="float32", batch_size=4)
    model.vtprune_reuse = True
    assert type(model.processor).__name__ in ("QwenProcessor", "Qwen3VLProcessor") and model.model.dtype == torch.float32
    reference, _ = toy_video.load()
    for method, options in [(None, {}), ("evs", {"keep": 0.25}), ("divprune", {"keep": 0.1}),
                            ("fastv", {"keep": 0.25, "layer": 1})]:
        model.rewrap(method, **options)
        results = simple_evaluate(model=model, tasks=[toytask.VIDEO_TASK], batch_size=4, log_samples=True,
                                  task_manager=TaskManager(include_path=video_task))
        answers = {s["doc_id"]: s["resps"][0][0] for s in results["samples"][toytask.VIDEO_TASK]}
        with vtprune.wrapped(reference, method, **options) if method else _nothing():
            native = toy_video.evaluate(reference, samples, progress=False)
            kept = vtprune.stats(reference)["totals"]["visual_tokens_out"] if method else 10 * 128
        assert [answers[i] for i in range(10)] == native["predictions"], method
        assert results["results"][toytask.VIDEO_TASK]["accuracy,none"] == pytest.approx(native["overall"])
        assert model.vtprune_totals["visual_tokens_out"] == kept and model.vtprune_totals["samples"] == 10


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_plugin_dtype_is_checked_before_loading():
    need_lmms()
    from vtprune.eval.lmms import VtpruneQwen3Vl

    with pytest.raises(ValueError, match="dtype must name a torch dtype.*'float33'"):
        VtpruneQwen3Vl(pretrained="/nonexistent", dtype="float33")


def test_toy_video_task_folder(video_task):
    import datasets

    text = open(os.path.join(video_task, "vtprune_toy_video.yaml")).read()
    assert "task: vtprune_toy_video" in text
    assert "doc_to_clip as doc_to_visual" in open(os.path.join(video_task, "utils.py")).read()
    data = datasets.load_from_disk(os.path.join(video_task, "data"))["test"]
    reference = toy_video.eval_split(n=10)
    assert [d["answer"] for d in data] == [s["answer"] for s in reference]
    path = toytask.doc_to_clip(data[3])[0]
    import decord

    reader = decord.VideoReader(path)
    assert len(reader) == toy_video.FRAMES and reader.get_avg_fps() == toy_video.FPS
    frames = reader.get_batch(list(range(toy_video.FRAMES))).asnumpy()
    assert np.array_equal(frames, reference[3]["frames"].transpose(0, 2, 3, 1))  # lossless
    stamp = os.path.getmtime(path)
    assert toytask.doc_to_clip(data[3]) == [path] and os.path.getmtime(path) == stamp  # rendered once


def test_cli_writes_the_toy_video_task(tmp_path, capsys):
    from vtprune.cli import main

    assert main(["toy-task", "--video", str(tmp_path / "t"), "--n", "3"]) == 0
    assert (tmp_path / "t" / "vtprune_toy_video.yaml").exists()
    assert "'vtprune_toy_video'" in capsys.readouterr().out


# ------------------------------------------------------------------ the processor stand-in

def test_qwen_processor_gives_the_toy_models_inputs():
    """The toy video model's chat template and tokenizer through ``QwenProcessor``: a left-padded batch of two
    clips equal to ``toy_video.inputs`` (ids, mask, token types, pixels, grids)."""
    processor = load(toy_video.DEFAULT_PATH, "qwen3_vl")
    samples = toy_video.eval_split(n=3)[1:3]
    chats = [[{"role": "system", "content": [{"type": "text", "text": "ignored by the toy template"}]},
              {"role": "user", "content": [{"type": "video", "video": "x"}, {"type": "text", "text": s["question"]}]}]
             for s in samples]
    texts = processor.apply_chat_template(chats, tokenize=False, add_generation_prompt=True)
    metadata = [{"fps": toy_video.FPS, "frames_indices": list(range(16)), "total_num_frames": 16}] * 2
    ours = processor(text=texts, videos=[torch.as_tensor(s["frames"]).float() for s in samples],
                     video_metadata=metadata, padding=True, padding_side="left", do_resize=False, return_tensors="pt",
                     do_sample_frames=False, min_pixels=1)
    reference = toy_video.inputs([s["frames"] for s in samples], [s["question"] for s in samples])
    assert set(ours) == set(reference)
    for key, value in reference.items():
        assert torch.equal(ours[key].to(value.dtype), value), key


def test_qwen_processor_layouts_and_errors():
    processor = load(toy_video.DEFAULT_PATH, "qwen2_5_vl")
    frames = torch.randint(0, 256, (6, 3, 56, 84), dtype=torch.uint8)
    out = processor(text="<s> USER: <|vision_start|><|video_pad|><|vision_end|> what ASSISTANT:", videos=[frames],
                    video_metadata=[{"fps": 30.0, "frames_indices": [0, 10, 20, 30, 40, 50], "total_num_frames": 60}],
                    return_tensors="pt", do_resize=False)
    assert out["video_grid_thw"].tolist() == [[3, 4, 6]]
    assert int((out["input_ids"] == processor.video_token_id).sum()) == 3 * 4 * 6 // 4
    assert out["second_per_grid_ts"].tolist() == [pytest.approx(2 / 3.0)]  # temporal 2 / sampled 3 fps
    with pytest.raises(ValueError, match="more clip placeholders"):
        processor(text="<|video_pad|> <|video_pad|>", videos=[frames], do_resize=False)
    with pytest.raises(ValueError, match="without a placeholder"):
        processor(text="no placeholder", videos=[frames], do_resize=False)
    with pytest.raises(ValueError, match="image processor"):
        processor(text="<|image_pad|>", images=[np.zeros((56, 56, 3), np.uint8)])
    with pytest.raises(TypeError, match="unexpected options.*'colour'"):
        processor(text="x", colour=1)
    with pytest.raises(ValueError, match="not a multiple of 28"):
        processor(text="<|video_pad|>", videos=[frames[..., :50]], do_resize=False)
    with pytest.raises(ValueError, match="not a Qwen tokenizer"):
        QwenProcessor(vtprune.toy.load()[1].tokenizer, "qwen3_vl")


def test_slice_times_are_qwen3_vls():
    """transformers' own ``Qwen3VLProcessor._calculate_timestamps`` (it loads without torchvision) as reference."""
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    for indices, fps in [(list(range(16)), 1.0), ([0, 7, 15, 22, 30], 30.0), ([3, 9, 14], 2.5)]:
        assert slice_times(indices, fps) == Qwen3VLProcessor._calculate_timestamps(None, list(indices), fps, 2)


# ---------------------------------------------------------- the reader against qwen_vl_utils

def _torchvision_stand_in():
    """Just what ``qwen_vl_utils.vision_process`` takes from torchvision: its v1 tensor resize (bicubic on floats,
    clamped, rounded back to the input's uint8; ``tests/serving/test_video_inputs.py`` checks it against the real
    one) and the names it imports."""
    def resize(video, size, interpolation=None, antialias=True):
        out = F.interpolate(video.float(), size=size, mode="bicubic", antialias=antialias, align_corners=False)
        return out.clamp(0, 255).round().to(video.dtype)

    vision = types.ModuleType("torchvision")
    vision.__version__ = "0.0"
    vision.io = types.ModuleType("torchvision.io")
    vision.transforms = types.ModuleType("torchvision.transforms")
    vision.transforms.functional = types.SimpleNamespace(resize=resize)
    vision.transforms.InterpolationMode = types.SimpleNamespace(BICUBIC="bicubic")
    return vision


@pytest.fixture(scope="module")
def qwen_vl_utils():
    """``qwen_vl_utils.vision_process`` itself (the eval extra installs it), loaded beside the stand-in."""
    spec = importlib.util.find_spec("qwen_vl_utils")
    if spec is None:
        if os.environ.get("VTPRUNE_REQUIRE_EVAL") == "1":
            raise AssertionError("qwen_vl_utils is not installed (the eval extra)")
        pytest.skip("qwen_vl_utils is not installed")
    path = os.path.join(os.path.dirname(spec.origin), "vision_process.py")
    vision = _torchvision_stand_in()
    saved = {k: sys.modules.get(k) for k in ("torchvision", "torchvision.transforms", "torchvision.io")}
    sys.modules.update({"torchvision": vision, "torchvision.transforms": vision.transforms, "torchvision.io": vision.io})
    try:
        module_spec = importlib.util.spec_from_file_location("_reference_vision_process", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    finally:
        for key, value in saved.items():
            if value is None:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = value
    module.FORCE_QWENVL_VIDEO_READER = "decord"
    return module


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    """An mp4 of 61 frames at 12 fps, 90 x 160, each frame distinct."""
    av = pytest.importorskip("av")
    path = str(tmp_path_factory.mktemp("clip") / "clip.mp4")
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (90, 160, 3)).astype(np.int16)
    with av.open(path, "w") as container:
        stream = container.add_stream("mpeg4", rate=12)
        stream.width, stream.height, stream.pix_fmt = 160, 90, "yuv420p"
        for i in range(61):
            frame = np.clip(base + 3 * i, 0, 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.mark.parametrize("options", [{}, {"fps": 1.0}, {"nframes": 9}, {"fps": 4.0, "max_frames": 10},
                                     {"min_pixels": 16 * 32 * 32, "max_pixels": 40 * 32 * 32},
                                     {"total_pixels": 20 * 4 * 32 * 32}, {"video_start": 1.1, "video_end": 3.9},
                                     {"total_pixels": 20 * 32 * 32, "max_pixels": 900 * 32 * 32,
                                      "min_pixels": 4 * 32 * 32},
                                     {"fps": 0.5, "min_frames": 6},
                                     {"resized_height": 70, "resized_width": 100}])
@pytest.mark.parametrize("patch", [14, 16])
def test_reader_equals_qwen_vl_utils_on_a_video_file(qwen_vl_utils, clip_file, options, patch):
    element = {"type": "video", "video": clip_file, **options}
    chat = [{"role": "user", "content": [element, {"type": "text", "text": "what"}]}]
    ref = qwen_vl_utils.process_vision_info(chat, return_video_kwargs=True, return_video_metadata=True,
                                            image_patch_size=patch)
    ours = qwen_clips.process_vision_info(chat, return_video_kwargs=True, return_video_metadata=True,
                                          image_patch_size=patch)
    (ref_frames, ref_meta), (our_frames, our_meta) = ref[1][0], ours[1][0]
    assert our_frames.dtype == ref_frames.dtype == torch.float32
    assert torch.equal(our_frames, ref_frames)
    assert {k: our_meta[k] for k in ref_meta} == ref_meta
    assert ours[0] is ref[0] is None and ours[2] == ref[2]
    # without metadata: the sampled fps per clip, as Qwen2.5-VL's processor takes it
    ref = qwen_vl_utils.process_vision_info(chat, return_video_kwargs=True, image_patch_size=patch)
    ours = qwen_clips.process_vision_info(chat, return_video_kwargs=True, image_patch_size=patch)
    assert torch.equal(ours[1][0], ref[1][0]) and ours[2] == ref[2]


def test_reader_on_a_toy_clip_and_images(qwen_vl_utils, tmp_path):
    """A toy clip written by the toy task comes back exactly at its size; images as qwen_vl_utils resizes them."""
    from PIL import Image

    frames = toy_video.render(toy_video.eval_clips(1)[0][0])
    toytask.write_clip(str(tmp_path / "c.avi"), frames, 1.0)
    element = {"video": str(tmp_path / "c.avi"), "nframes": 16, "min_pixels": 128 * 128, "max_pixels": 128 * 128}
    got, metadata, sample_fps = qwen_clips.fetch_video(element, image_patch_size=16)
    assert torch.equal(got, torch.as_tensor(frames).float())
    assert metadata["frames_indices"] == list(range(16)) and metadata["fps"] == 1.0 and sample_fps == 1.0
    got, metadata, _ = qwen_clips.fetch_video({**element, "nframes": 6})
    assert metadata["frames_indices"] == torch.linspace(0, 15, 6).round().long().tolist() == [0, 3, 6, 9, 12, 15]
    rng = np.random.default_rng(1)
    rgba = Image.fromarray(rng.integers(0, 256, (50, 300, 4)).astype(np.uint8), "RGBA")
    rgba.save(tmp_path / "i.png")
    for element in [{"image": str(tmp_path / "i.png")}, {"image": rgba, "max_pixels": 20 * 28 * 28},
                    {"image": rgba.convert("L"), "min_pixels": 400 * 28 * 28}]:
        ours, ref = qwen_clips.fetch_image(element), qwen_vl_utils.fetch_image(element)
        assert ours.size == ref.size and np.array_equal(np.asarray(ours), np.asarray(ref))
    with pytest.raises(ValueError, match="nframes must be within"):
        qwen_clips.fetch_video({"video": str(tmp_path / "c.avi"), "nframes": 32})
    with pytest.raises(FileNotFoundError, match="no clip at"):
        qwen_clips.fetch_video({"video": str(tmp_path / "missing.mp4")})
    assert math.isclose(qwen_clips.frame_count({"fps": 2.0}, 100, 25.0), 8)
    assert json.dumps(qwen_clips.process_vision_info([{"role": "user", "content": "text only"}])) == "[null, null]"


def test_cli_eval_toy_video_through_lmms_eval(tmp_path, capsys):
    """``vtprune eval --model toy-video --lmms``: the sweep's cells through lmms-eval, the answers and visual tokens
    of the native cells."""
    need_lmms()
    from vtprune.cli import main

    args = ["eval", "--model", "toy-video", "--methods", "evs", "--keep", "1,0.25", "--limit", "6"]
    assert main(args + ["--lmms", "--out", str(tmp_path / "l")]) == 0
    assert main(args + ["--out", str(tmp_path / "n")]) == 0
    capsys.readouterr()
    lmms = {r["method"]: r for r in json.load(open(tmp_path / "l" / "results.json"))}
    native = {r["method"]: r for r in json.load(open(tmp_path / "n" / "results.json"))}
    assert set(lmms) == set(native) == {"stock", "evs"}
    for method in lmms:
        assert lmms[method]["runner"] == "lmms-eval" and native[method]["runner"] == "native"
        assert lmms[method]["answers"] == native[method]["answers"] and len(lmms[method]["answers"]) == 6
        assert lmms[method]["score"] == pytest.approx(native[method]["score"])
        assert lmms[method]["visual_tokens_out"] == native[method]["visual_tokens_out"]
    assert lmms["evs"]["visual_tokens_out"] == 32
