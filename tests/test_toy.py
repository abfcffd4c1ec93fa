"""Tests of the embedded toy VLM benchmark (vtprune.toy)."""

import json
import os

import numpy as np
import pytest
import torch

from vtprune import toy


def _scenes_and_questions(seed, n=5):
    rng = np.random.default_rng(seed)
    scenes = [toy.make_scene(rng) for _ in range(n)]
    return scenes, [toy.make_questions(s, rng, 6) for s in scenes]


def test_generator_is_deterministic():
    scenes_a, qs_a = _scenes_and_questions(7)
    scenes_b, qs_b = _scenes_and_questions(7)
    scenes_c, qs_c = _scenes_and_questions(8)
    assert scenes_a == scenes_b and qs_a == qs_b
    assert scenes_a != scenes_c and qs_a != qs_c
    img_a, img_b, img_c = (np.asarray(toy.render(s[0])) for s in (scenes_a, scenes_b, scenes_c))
    assert np.array_equal(img_a, img_b)
    assert not np.array_equal(img_a, img_c)


def test_eval_split_is_fixed_by_seed():
    a, b, c = toy.eval_split(8), toy.eval_split(8), toy.eval_split(8, seed=99)
    strip = lambda s: {k: v for k, v in s.items() if k != "image"}  # noqa: E731
    assert [strip(s) for s in a] == [strip(s) for s in b]
    assert np.array_equal(np.asarray(a[3]["image"]), np.asarray(b[3]["image"]))
    assert [strip(s) for s in a] != [strip(s) for s in c]


def test_scene_layout():
    rng = np.random.default_rng(0)
    for _ in range(200):
        scene = toy.make_scene(rng)
        objs = scene["objects"]
        assert toy.MIN_OBJECTS <= len(objs) <= toy.MAX_OBJECTS
        assert len({o["cell"] for o in objs}) == len(objs)  # one object per patch cell
        assert len({(o["color"], o["shape"]) for o in objs}) == len(objs)
        assert all(abs(o["dx"]) <= toy.JITTER and abs(o["dy"]) <= toy.JITTER for o in objs)
    image = toy.render(scene)
    assert image.mode == "RGB" and image.size == (toy.IMAGE_SIZE, toy.IMAGE_SIZE)
    assert toy.NUM_IMAGE_TOKENS == 256


def test_questions_are_consistent_with_scene():
    rng = np.random.default_rng(3)
    vocab = toy.vocab()
    for _ in range(100):
        scene = toy.make_scene(rng)
        objs = scene["objects"]
        questions = toy.make_questions(scene, rng, 6)
        assert len({q["question"] for q in questions}) == len(questions)
        for q in questions:
            assert q["answer"] in vocab and all(w in vocab for w in q["question"].split())
            words = q["question"].split()
            if q["type"] == "color":
                match = [o for o in objs if o["shape"] == words[-2]]
                assert len(match) == 1 and match[0]["color"] == q["answer"]
            elif q["type"] == "shape":
                match = [o for o in objs if o["color"] == words[-3]]
                assert len(match) == 1 and match[0]["shape"] == q["answer"]
            elif q["type"] == "exists":
                present = any(o["color"] == words[3] and o["shape"] == words[4] for o in objs)
                assert q["answer"] == ("yes" if present else "no")
            else:
                assert q["answer"] in toy.NUMBER_WORDS[1:]


def test_eval_split_balanced_with_hard_negatives():
    items = toy._split_items(400, 1234)
    types = [q["type"] for _, q in items]
    assert all(types.count(t) == 100 for t in toy.QUESTION_TYPES)
    exists = [(scene, q) for scene, q in items if q["type"] == "exists"]
    answers = [q["answer"] for _, q in exists]
    assert 35 <= answers.count("yes") <= 65
    hard = 0
    for scene, q in exists:
        if q["answer"] == "no":
            color, shape = q["question"].split()[3:5]
            hard += any(o["color"] == color or o["shape"] == shape for o in scene["objects"])
    assert 0.3 <= hard / answers.count("no") <= 0.8
    prior = toy.type_prior([q for _, q in items])
    assert all(p < 0.6 for p in prior.values())


def test_processor_round_trip():
    processor = toy.build_processor()
    sample = toy.eval_split(1)[0]
    out = processor(images=sample["image"], text=toy.prompt(sample["question"]), return_tensors="pt")
    image_id = toy.vocab()["<image>"]
    ids = out["input_ids"][0]
    assert int((ids == image_id).sum()) == toy.NUM_IMAGE_TOKENS
    assert ids[0].item() == processor.tokenizer.bos_token_id
    assert tuple(out["pixel_values"].shape) == (1, 3, toy.IMAGE_SIZE, toy.IMAGE_SIZE)
    assert processor.tokenizer.unk_token_id not in ids.tolist()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample["question"]}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    templated = processor(images=sample["image"], text=text, return_tensors="pt")["input_ids"][0]
    assert templated.tolist() == ids.tolist()
    assert processor.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == text


def test_tiny_model_forward_and_evaluate():
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(toy.build_config()).eval()
    processor = toy.build_processor()
    samples = toy.eval_split(4)
    res = toy.evaluate(model, processor, samples, batch_size=3, progress=False)
    assert res["n"] == 4 and len(res["predictions"]) == 4
    assert set(res["by_type"]) == set(toy.QUESTION_TYPES)
    assert 0.0 <= res["overall"] <= 1.0


def test_export_split(tmp_path):
    path = toy.export_split(tmp_path, n=6, seed=5)
    rows = [json.loads(line) for line in open(path)]
    assert len(rows) == 6
    for row in rows:
        assert os.path.exists(os.path.join(tmp_path, row["image"]))
        assert {"question", "answer", "type"} <= set(row)
    samples = toy.eval_split(6, seed=5)
    assert [r["question"] for r in rows] == [s["question"] for s in samples]


def test_load_missing_weights_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_toy_vlm"):
        toy.load(tmp_path / "nowhere")


def _has_weights():
    return os.path.isdir(toy.DEFAULT_PATH) and any(f.endswith(".safetensors") for f in os.listdir(toy.DEFAULT_PATH))


@pytest.mark.skipif(not _has_weights(), reason=f"no trained weights in {toy.DEFAULT_PATH}; "
                    "run scripts/train_toy_vlm.py to create them")
def test_shipped_model_accuracy():
    model, processor = toy.load()
    res = toy.evaluate(model, processor, toy.eval_split(200), progress=False)
    assert res["overall"] >= 0.9, res["by_type"]


@pytest.mark.skipif(not _has_weights(), reason=f"no trained weights in {toy.DEFAULT_PATH}")
def test_shipped_processor_matches_builder():
    from transformers import AutoProcessor

    shipped = AutoProcessor.from_pretrained(toy.DEFAULT_PATH)
    built = toy.build_processor()
    sample = toy.eval_split(1)[0]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample["question"]}]}]
    for proc in (shipped, built):
        text = proc.apply_chat_template(messages, add_generation_prompt=True)
        ids = proc(images=sample["image"], text=text, return_tensors="pt")["input_ids"][0].tolist()
        ref = built(images=sample["image"], text=toy.prompt(sample["question"]), return_tensors="pt")
        assert ids == ref["input_ids"][0].tolist()
