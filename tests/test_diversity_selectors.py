"""VisPruner, CDPruner and HoloV against independent references of their definitions (plain loops, a naive
greedy log-determinant, the stock model's own embeddings and eager [CLS] attention), and the cut
contract (the stock model with the dropped tokens masked) on six families."""

import math

import pytest
import torch
from reference import drop_mask, image_runs, masked_forward, masked_greedy

import vtprune
from vtprune.budget import tokens_to_keep
from vtprune.layout import ImageLayout
from vtprune.methods import ScoreContext, get
from vtprune.methods.cdpruner import greedy_map
from vtprune.testing import FAMILIES, tiny_inputs, tiny_model


def _cos(u, v):
    return sum(a * b for a, b in zip(u, v)) / math.sqrt(sum(a * a for a in u) * sum(b * b for b in v))


def _vispruner_brute(att, feats, budget, ratio):
    """VisPruner's selection written out with lists: important by attention, then rounds that drop up to
    8 tokens of the even places whose best cosine match among the odd places is highest."""
    n = len(att)
    budget = min(budget, n)
    important = int(budget * ratio)
    order = sorted(range(n), key=lambda i: (-att[i], i))
    res, div = order[important:], budget - important
    while div > 0:
        k = min(8, len(res) - div)
        if k <= 0:
            break
        a, b = res[0::2], res[1::2]
        s = [max(_cos(feats[x], feats[y]) for y in b) for x in a]
        ranked = sorted(range(len(a)), key=lambda i: (-s[i], i))
        res = [a[i] for i in ranked[k:]] + b
    return sorted(order[:important] + (res if div > 0 else []))


@pytest.mark.parametrize("n,budget,ratio", [(40, 12, 0.5), (41, 9, 0.5), (30, 20, 0.75), (25, 6, 0.0), (25, 6, 1.0),
                                            (64, 13, 0.5)])
def test_vispruner_equals_brute_force(n, budget, ratio):
    gen = torch.Generator().manual_seed(n + budget)
    att = torch.rand(n, generator=gen)
    feats = torch.randn(n, 6, generator=gen)
    feats[1::5] = feats[0::5][: feats[1::5].shape[0]] + 0.01  # near-duplicates to find
    ctx = ScoreContext(layouts=[ImageLayout.flat(n)], budgets=[budget], rows=[0], features=[feats], generator=gen,
                       cls_attention={0: [att]})
    scores = get("vispruner")(keep=budget, important_ratio=ratio).score(ctx)[0]
    ours = sorted(scores.nonzero().squeeze(1).tolist())
    assert ours == _vispruner_brute(att.tolist(), feats.tolist(), budget, ratio)
    assert len(ours) == budget


def _greedy_logdet(kernel, k):
    """Greedy MAP of a DPP the slow way: each step the token that maximises det(L[S + j, S + j])."""
    chosen = []
    for _ in range(k):
        best, value = None, -math.inf
        for j in range(kernel.shape[0]):
            if j in chosen:
                continue
            idx = chosen + [j]
            sign, logdet = torch.linalg.slogdet(kernel[idx][:, idx])
            if sign > 0 and logdet > value:
                best, value = j, float(logdet)
        chosen.append(best)
    return chosen


@pytest.mark.parametrize("seed", range(4))
def test_greedy_map_equals_naive_log_determinant(seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(24, 16, generator=gen, dtype=torch.float64), dim=-1)
    r = torch.rand(24, generator=gen, dtype=torch.float64) + 0.1
    kernel = r[:, None] * (x @ x.T) * r[None, :]
    assert greedy_map(kernel, 10).tolist() == _greedy_logdet(kernel, 10)


def _stock_embeds(model, inputs):
    seen = {}
    handle = model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: seen.update(embeds=k["inputs_embeds"].clone()), with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    return seen["embeds"]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "internvl"])
def test_cdpruner_selects_as_defined_on_the_stock_embeddings(family):
    """Relevance to the instruction (the text after the image) and the DPP, computed from the stock model's
    own input embeddings in float64 with the naive greedy, select the tokens the wrapped model kept."""
    model = tiny_model(family)
    inputs = tiny_inputs(model, family, images_per_row=(1, 1))
    embeds = _stock_embeds(model, inputs).double()
    with vtprune.wrapped(model, "cdpruner", keep=0.4, theta=0.5):
        with torch.no_grad():
            model(**inputs)
        kept = vtprune.last_kept(model)
    mask = inputs["attention_mask"].bool()
    for b, runs in enumerate(image_runs(inputs["input_ids"])):
        (run,) = runs
        feats = torch.nn.functional.normalize(embeds[b, run], dim=-1)
        after = torch.arange(mask.shape[1]) > int(run[-1])
        text = torch.nn.functional.normalize(embeds[b, mask[b] & after], dim=-1)
        rel = (feats @ text.T).mean(1)
        rel = (rel - rel.min() + 1e-6) / (rel.max() - rel.min())
        rel = torch.exp(0.5 / (2 * 0.5) * rel)
        kernel = rel[:, None] * (feats @ feats.T) * rel[None, :]
        expected = sorted(_greedy_logdet(kernel, tokens_to_keep(0.4, run.numel())))
        assert kept[b][0].tolist() == expected


def _llava_reference_inputs():
    """A tiny LLaVA, one image, its stock LLM-input embeddings and the eager tower's [CLS] row (feature layer)."""
    model = tiny_model("llava")
    inputs = tiny_inputs(model, "llava", images_per_row=(1,))
    embeds = _stock_embeds(model, inputs)
    eager = tiny_model("llava", attn_implementation="eager")
    with torch.no_grad():
        att = eager.model.vision_tower(pixel_values=inputs["pixel_values"], output_attentions=True).attentions[-2]
    return model, inputs, embeds, att[0, :, 0, 1:].mean(0)


def test_vispruner_selects_as_defined_on_the_stock_model():
    """LLaVA: the eager tower's [CLS] attention (feature layer) and the stock LLM-input features."""
    model, inputs, embeds, cls = _llava_reference_inputs()
    with vtprune.wrapped(model, "vispruner", keep=7):
        with torch.no_grad():
            model(**inputs)
        kept = vtprune.last_kept(model)[0][0].tolist()
    (run,) = image_runs(inputs["input_ids"])[0]
    assert kept == _vispruner_brute(cls.tolist(), embeds[0, run].tolist(), 7, 0.5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["vispruner", "cdpruner", "holov"])
def test_pruning_equals_masked_reference(family, method):
    model = tiny_model(family)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    inputs = tiny_inputs(model, family, images_per_row=(1, 2))
    with vtprune.wrapped(model, method, keep=0.3):
        with torch.no_grad():
            logits = model(**inputs).logits
            kept = vtprune.last_kept(model)
            tokens = model.generate(**inputs, max_new_tokens=6, do_sample=False)[:, inputs["input_ids"].shape[1]:]
            kept_generate = vtprune.last_kept(model)
        stats = vtprune.stats(model)
    assert stats["visual_tokens_out"] < stats["visual_tokens_in"]
    ref = masked_forward(model, inputs, drop_mask(inputs["input_ids"], kept))
    torch.testing.assert_close(logits[:, -1], ref[:, -1], atol=1e-5, rtol=0)
    assert torch.equal(tokens, masked_greedy(model, inputs, drop_mask(inputs["input_ids"], kept_generate), steps=6))


def _holov_brute(att, feats, budget, crops, alpha=0.09):
    """HoloV's selection as its code computes it, with lists (chunk scores, floor allocation, the remainder
    to the largest weights, overflow moved on), kept indices sorted."""
    n = len(att)
    size, extra = divmod(n, crops)
    chunks, start = [], 0
    for p in range(crops):
        chunks.append(list(range(start, start + size + (p < extra))))
        start = chunks[-1][-1] + 1 if chunks[-1] else start
    scores = []
    for c in chunks:
        if len(c) <= 1:
            scores.append(sum(att[i] for i in c) / max(len(c), 1))
            continue
        big = [1000 * att[i] for i in c]
        sims = [[0.0 if i == j else _cos(feats[i], feats[j]) for j in c] for i in c]
        mean = [sum(row) / (len(c) - 1) for row in sims]
        var = [sum((x - m) ** 2 for x in row) / (len(c) - 1) for row, m in zip(sims, mean)]
        scale = (sum(abs(b) for b in big) / len(c)) / (sum(abs(v) for v in var) / len(c) + 1e-6)
        scores.append(sum(b + alpha * v * scale for b, v in zip(big, var)) / len(c))
    total = sum(scores) + 1e-6
    w = [s / total for s in scores]
    alloc = [math.floor(x * budget) for x in w]
    order = sorted(range(crops), key=lambda p: (-w[p], p))
    for p in order[:budget - sum(alloc)]:
        alloc[p] += 1
    spare = sum(max(0, a - len(c)) for a, c in zip(alloc, chunks))
    alloc = [min(a, len(c)) for a, c in zip(alloc, chunks)]
    while spare:
        for p in order:
            if spare and alloc[p] < len(chunks[p]):
                alloc[p] += 1
                spare -= 1
    kept = []
    for c, k in zip(chunks, alloc):
        kept += sorted(c, key=lambda i: (-att[i], i))[:k]
    return sorted(kept)


@pytest.mark.parametrize("n,budget,crops", [(36, 8, 4), (50, 7, 5), (30, 20, 6), (24, 4, None)])
def test_holov_equals_brute_force(n, budget, crops):
    gen = torch.Generator().manual_seed(n * budget)
    att = torch.rand(n, generator=gen) ** 4  # peaked, as [CLS] attention is: some chunks overflow
    feats = torch.randn(n, 5, generator=gen)
    ctx = ScoreContext(layouts=[ImageLayout.flat(n)], budgets=[budget], rows=[0], features=[feats], generator=gen,
                       cls_attention={0: [att]})
    scores = get("holov")(keep=budget, crops=crops).score(ctx)[0]
    default = max(1, int((1024 / 576) * n / budget))
    ours = sorted(scores.nonzero().squeeze(1).tolist())
    assert ours == _holov_brute(att.tolist(), feats.tolist(), budget, crops or default)
    assert len(ours) == budget


def test_options_are_checked():
    model = tiny_model("llava")
    for method, options, words in [("vispruner", {"important_ratio": 1.5}, "important_ratio"),
                                   ("cdpruner", {"theta": 1.0}, "theta"), ("cdpruner", {"negate": "no"}, "negate"),
                                   ("holov", {"crops": 0}, "crops"), ("holov", {"alpha": -1}, "alpha")]:
        with pytest.raises((ValueError, TypeError), match=words):
            vtprune.wrap(model, method, **options)
        assert not vtprune.is_wrapped(model)


def test_holov_selects_as_defined_on_the_stock_model():
    model, inputs, embeds, cls = _llava_reference_inputs()
    with vtprune.wrapped(model, "holov", keep=6, crops=4):
        with torch.no_grad():
            model(**inputs)
        kept = vtprune.last_kept(model)[0][0].tolist()
    (run,) = image_runs(inputs["input_ids"])[0]
    assert kept == _holov_brute(cls.tolist(), embeds[0, run].tolist(), 6, 4)
