"""SparseVLM: staged, rater-scored pruning with recycling, against the stock model with each stage's
tokens masked from its layer on and each merged token's hidden state replaced there by its cluster's
mean (hooks on the stock model, no vtprune code)."""

import math

import pytest
import torch
from reference import assert_merged_and_masked

import vtprune
from vtprune.methods.sparsevlm import TABLE, dpc_knn
from vtprune.testing import FAMILIES, IMAGE_TOKEN, tiny_inputs, tiny_model


def _model(family, layers=4):
    model = tiny_model(family, llm_layers=layers)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("rows,with_mask", [((1,), False), ((1, 2), True)])
def test_sparsevlm_equals_masked_and_merged_reference(family, rows, with_mask):
    model = _model(family)
    inputs = tiny_inputs(model, family, images_per_row=rows, with_mask=with_mask)
    with vtprune.wrapped(model, "sparsevlm", pruning_loc=[0, 1, 2]):
        with torch.no_grad():
            logits = model(**inputs).logits
            record = vtprune.record(model)
            stats = vtprune.stats(model)
            tokens = model.generate(**inputs, max_new_tokens=6, do_sample=False)[:, inputs["input_ids"].shape[1]:]
            generated = vtprune.record(model)
    visual = (inputs["input_ids"] == IMAGE_TOKEN).sum(1)
    assert [k for k, _, _ in record.exit.stages] == [1, 2, 3] and record.exit.merged
    per_layer = stats["samples"][-1]["visual_tokens_per_layer"]
    n = int(visual[-1])
    expected, current = [n], n  # table 192 scaled to n tokens, at most current - 1, plus the merged tokens
    for stage, count in enumerate(TABLE[192]):
        kept = min(max(1, round(count * n / 576)), current - 1)
        r = min(int(0.3 * (current - kept)) + 1, current - kept)
        current = kept + min(int(r / 10) + 1, r)
        expected.append(current)
    assert per_layer == expected
    assert_merged_and_masked(model, inputs, logits, tokens, record, generated)


def _dpc_brute(x, c):
    n = len(x)
    d = [[math.dist(x[i], x[j]) / math.sqrt(len(x[0])) for j in range(n)] for i in range(n)]
    density = [math.exp(-sum(v * v for v in sorted(row)[:c]) / c) for row in d]
    top = max(max(row) for row in d)
    parent = [min([d[i][j] for j in range(n) if density[j] > density[i]] or [top]) for i in range(n)]
    centres = sorted(range(n), key=lambda i: (-parent[i] * density[i], i))[:c]
    assign = [min(range(c), key=lambda j: (d[i][centres[j]], j)) for i in range(n)]
    for j, centre in enumerate(centres):
        assign[centre] = j
    return centres, assign


@pytest.mark.parametrize("seed", range(3))
def test_density_peak_clusters_equal_brute_force(seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.cat([torch.randn(6, 4, generator=gen) + 4, torch.randn(7, 4, generator=gen) - 4,
                   torch.randn(5, 4, generator=gen)])
    centres, assign = dpc_knn(x, 3)
    ref_centres, ref_assign = _dpc_brute(x.tolist(), 3)
    assert centres.tolist() == ref_centres and assign.tolist() == ref_assign


def test_sparsevlm_without_recycling_and_options():
    model = _model("llava")
    inputs = tiny_inputs(model, "llava", images_per_row=(1,))
    with vtprune.wrapped(model, "sparsevlm", pruning_loc=[0, 2], retain=64, recycle=False):
        with torch.no_grad():
            model(**inputs)
        record = vtprune.record(model)
        per_layer = vtprune.stats(model)["samples"][0]["visual_tokens_per_layer"]
    assert record.exit.merged == [] and per_layer == [16, 2, 2, 1]  # 66/576 and 30/576 of 16, at least 1
    for options, error, words in [({"retain": 100}, ValueError, "retain"), ({"layer": 2}, ValueError, "pruning_loc"),
                                  ({"recycle": 1}, TypeError, "recycle"), ({"pruning_loc": [3]}, ValueError, "must lie")]:
        with pytest.raises(error, match=words):
            vtprune.wrap(model, "sparsevlm", **options)
        assert not vtprune.is_wrapped(model)


def test_raters_and_scores_equal_eager_attention():
    """Raters from the stock input embeddings, scores from the eager attention probabilities of the
    pruning layer (mean over heads and raters): the kept tokens are the top ones."""
    model = _model("llava")
    inputs = tiny_inputs(model, "llava", images_per_row=(1,), with_mask=False)
    with vtprune.wrapped(model, "sparsevlm", pruning_loc=[1], retain=128, recycle=False):
        with torch.no_grad():
            model(**inputs)
        drop = vtprune.record(model).exit.drop[0]
    seen = {}
    handle = model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: seen.update(embeds=k["inputs_embeds"]), with_kwargs=True)
    model.set_attn_implementation({"text_config": "eager"})
    with torch.no_grad():
        attn = model(**inputs, output_attentions=True).attentions[1][0].mean(0)  # [L, L]
    handle.remove()
    ids = inputs["input_ids"][0]
    visual = (ids == IMAGE_TOKEN).nonzero().squeeze(1)
    after = torch.arange(ids.numel()) > int(visual.max())
    embeds = seen["embeds"][0]
    relevance = (embeds[visual] @ embeds[after].T).softmax(-1).mean(0)
    raters = after.nonzero().squeeze(1)[relevance > relevance.mean()]
    score = attn[raters][:, visual].mean(0)
    k = min(max(1, round(TABLE[128][0] * visual.numel() / 576)), visual.numel() - 1)
    kept = visual[torch.sort(score, descending=True, stable=True).indices[:k]]
    assert sorted(kept.tolist()) == sorted(visual[~drop[visual]].tolist())
