"""Triton kernels (run in Triton's interpreter on CPU) are bitwise equal to the torch reference."""

import os

import pytest
import torch

triton = pytest.importorskip("triton", reason="the triton extra is not installed")

from vtprune.kernels import gather as ref  # noqa: E402
from vtprune.kernels.triton_gather import gather_cut_triton  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="Triton kernels need a GPU or TRITON_INTERPRET=1")


def _plan(b, length, keep, gen):
    rows = [torch.sort(torch.randperm(length, generator=gen)[:k]).values for k in keep]
    width = max(keep) if keep else 0
    index = torch.zeros(b, width, dtype=torch.long)
    real = torch.zeros(b, width, dtype=torch.bool)
    for i, r in enumerate(rows):
        index[i, width - r.numel():] = r
        real[i, width - r.numel():] = True
    return index, real


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,keep", [((2, 19, 40), [7, 3]), ((1, 8, 16), [8]), ((3, 12, 130), [1, 12, 5])])
@pytest.mark.parametrize("pos_rows", [0, 1, 3])
def test_gather_cut_bitwise(dtype, shape, keep, pos_rows):
    gen = torch.Generator().manual_seed(sum(shape) + pos_rows)
    b, length, d = shape
    embeds = torch.randn(b, length, d, generator=gen).to(dtype)
    mask = torch.randint(0, 2, (b, length), generator=gen)
    positions = None
    if pos_rows == 1:
        positions = torch.randint(0, 100, (b, length), generator=gen)
    elif pos_rows == 3:
        positions = torch.randint(0, 100, (3, b, length), generator=gen)
    index, real = _plan(b, length, keep, gen)
    for m in (mask, None):
        want = ref.gather_cut(embeds, index, real, m, positions)
        got = gather_cut_triton(embeds, index, real, m, positions)
        for w, g in zip(want, got):
            if w is None:
                assert g is None
            else:
                assert g.dtype == w.dtype and g.shape == w.shape and torch.equal(g, w)


def test_gather_cut_non_contiguous_and_empty():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(2, 30, 48, generator=gen)
    embeds = base.transpose(0, 1).contiguous().transpose(0, 1)[:, ::2]  # strided view
    mask = torch.ones(2, 30, dtype=torch.long)[:, ::2]
    positions = torch.arange(30).expand(2, 30)[:, ::2]
    index, real = _plan(2, 15, [4, 6], gen)
    want = ref.gather_cut(embeds, index, real, mask, positions)
    got = gather_cut_triton(embeds, index, real, mask, positions)
    assert all(torch.equal(w, g) for w, g in zip(want, got))
    empty_index, empty_real = torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, 0, dtype=torch.bool)
    out, m, p = gather_cut_triton(embeds, empty_index, empty_real, mask, positions)
    assert out.shape == (2, 0, 48) and m.shape == (2, 0) and p.shape == (2, 0)


def test_wrap_exactness_with_triton_backend(monkeypatch):
    """The full cut runs through the Triton kernel when selected, with identical results."""
    import vtprune
    from vtprune.testing import tiny_inputs, tiny_model

    model = tiny_model("qwen2_vl")
    inputs = tiny_inputs(model, "qwen2_vl", images_per_row=(1, 2))
    outs = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("VTPRUNE_KERNELS", backend)
        with vtprune.wrapped(model, "uniform", keep=0.5):
            with torch.no_grad():
                outs[backend] = model(**inputs).logits
    assert torch.equal(outs["torch"], outs["triton"])


@pytest.mark.parametrize("family", ["llava", "llava_next", "internvl", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("rows,with_mask", [((1,), False), ((1, 2), True), ((0, 1), True)])
def test_exactness_suite_with_triton_backend(monkeypatch, family, rows, with_mask):
    """The pruned ≡ masked-reference test of test_exact.py, with the cut running through Triton."""
    from test_exact import test_pruning_equals_masked_reference

    monkeypatch.setenv("VTPRUNE_KERNELS", "triton")
    test_pruning_equals_masked_reference(family, rows, with_mask, "random", 0.5)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "qwen3_vl"])
def test_in_llm_exit_gathers_through_the_cut_kernel(monkeypatch, family):
    """The in-LLM exit cuts hidden states and position embeddings with the pre-LLM cut's kernel
    (``vtprune.kernels.gather_seq``): its masked-reference test passes with the Triton backend, and
    the Triton and torch results are bitwise equal."""
    from test_exit import LAYOUTS, test_exit_equals_layer_masked_reference
    from vtprune.kernels import gather_seq

    gen = torch.Generator().manual_seed(0)
    index, real = _plan(3, 12, [5, 5, 5], gen)
    for t in (torch.randn(3, 12, 8, generator=gen), torch.randn(1, 12, 4, 2, generator=gen)):
        outs = {}
        for backend in ("torch", "triton"):
            monkeypatch.setenv("VTPRUNE_KERNELS", backend)
            outs[backend] = gather_seq(t, index)
        expected = t.expand(3, *t.shape[1:]).gather(1, index.view(3, 5, *[1] * (t.dim() - 2)).expand(3, 5, *t.shape[2:]))
        assert torch.equal(outs["torch"], expected) and torch.equal(outs["triton"], expected)
    monkeypatch.setenv("VTPRUNE_KERNELS", "triton")
    rows, with_mask = LAYOUTS[1]
    test_exit_equals_layer_masked_reference(family, rows, with_mask)
