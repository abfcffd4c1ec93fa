"""The attention bias of served summary tokens / ``size_bias`` (``vtprune.serving.slot_bias``) against vLLM's own CPU
attention kernel (serving venv): a key biased by ``log(n)`` attends as the same key written ``n`` times, so the
reference is the kernel on a cache holding the biased keys ``n`` times over — no vtprune code in it."""

import math
import os
import types

import pytest

if os.environ.get("VTPRUNE_REQUIRE_VLLM") != "1":  # CI sets it: there a missing vLLM fails the run
    pytest.importorskip("vllm")

HEADS, KV_HEADS, D, BLOCK = 4, 2, 32, 16


def _kernel(requests, dtype):
    """vLLM's CPU attention over ``requests`` ([(keys [L, H_kv, d], values, queries [T, H, d])], the queries the
    last T positions): (output [sum T, H, d], the cache, the metadata, the slots of each request's keys)."""
    import torch
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    isa = _get_attn_isa(dtype, BLOCK, D)
    blocks_of = [math.ceil(k.shape[0] / BLOCK) + 1 for k, _, _ in requests]  # one spare block each
    cache = torch.zeros(sum(blocks_of) + 2, KV_HEADS, BLOCK, 2 * D, dtype=dtype)
    key_cache, value_cache = cache.view(cache.shape[0], KV_HEADS, 2 * BLOCK, D).chunk(2, dim=2)
    table = torch.zeros(len(requests), max(blocks_of), dtype=torch.int32)
    free = list(range(cache.shape[0]))[::-1]  # blocks handed out from the top: not in order
    all_slots = []
    for r, ((k, v, _), count) in enumerate(zip(requests, blocks_of)):
        table[r, :count] = torch.tensor([free.pop(0) for _ in range(count)], dtype=torch.int32)
        slots = (table[r, :count].long()[:, None] * BLOCK + torch.arange(BLOCK)).flatten()[:k.shape[0]]
        ops.cpu_attn_reshape_and_cache(k.to(dtype), v.to(dtype), key_cache, value_cache, slots, isa)
        all_slots.append(slots)
    starts = torch.tensor([0] + [q.shape[0] for _, _, q in requests], dtype=torch.int32).cumsum(0).to(torch.int32)
    lengths = torch.tensor([k.shape[0] for k, _, _ in requests], dtype=torch.int32)
    meta = types.SimpleNamespace(query_start_loc=starts, seq_lens=lengths, block_table=table)
    query = torch.cat([q for _, _, q in requests]).to(dtype)
    output = torch.zeros_like(query)
    scheduler = ops.cpu_attn_get_scheduler_metadata(len(requests), HEADS, KV_HEADS, D, lengths, dtype, starts, True,
                                                    -1, isa, False)
    ops.cpu_attention_with_kv_cache(query=query, key_cache=key_cache, value_cache=value_cache, output=output,
                                    query_start_loc=starts, seq_lens=lengths, scale=D ** -0.5, causal=True,
                                    alibi_slopes=None, sliding_window=-1, block_table=table, softcap=0.0,
                                    scheduler_metadata=scheduler, s_aux=None)
    return output, cache, meta, all_slots, query


def _requests(torch, generator, shapes):
    return [(torch.randn(n, KV_HEADS, D, generator=generator), torch.randn(n, KV_HEADS, D, generator=generator),
             torch.randn(t, HEADS, D, generator=generator)) for n, t in shapes]


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_the_bias_attends_as_repeated_keys_in_vllms_kernel(dtype_name):
    """A prefill (23 keys, 7 queries) and a decode step (40 keys, 1 query) of which some keys stand for 3 or 5
    tokens: ``SlotBias.rebias`` turns the kernel's output into the kernel's on the repeated keys; a request
    without a biased key keeps the kernel's output."""
    import torch

    from vtprune.serving.slot_bias import SlotBias, biased_attention, read_cache

    dtype = getattr(torch, dtype_name)
    generator = torch.Generator().manual_seed(0)
    requests = _requests(torch, generator, [(23, 7), (40, 1), (19, 4)])
    sizes = [{2: 3, 9: 5, 10: 2}, {0: 4, 31: 3}, {}]  # the third request has no biased key
    output, cache, meta, slots, query = _kernel(requests, dtype)

    keys, values = read_cache(cache, slots[0])  # the reader gives back what the kernel's cache write stored
    assert torch.equal(keys, requests[0][0].to(dtype)) and torch.equal(values, requests[0][1].to(dtype))
    plain = biased_attention(query[:7], keys, values, torch.zeros(23), D ** -0.5)
    assert torch.allclose(plain, output[:7].float(), atol=2e-2 if dtype == torch.bfloat16 else 1e-5)

    bias = SlotBias(layers=[0])
    bias.slots = torch.zeros(cache.shape[0] * BLOCK)
    for s, size in zip(slots, sizes):
        for i, n in size.items():
            bias.slots[s[i]] = math.log(n)
    impl = types.SimpleNamespace(num_heads=HEADS, scale=D ** -0.5)
    got = output.clone()
    bias.rebias(impl, query, cache, meta, got)

    repeated = [(k.repeat_interleave(torch.tensor([size.get(i, 1) for i in range(k.shape[0])]), 0),
                 v.repeat_interleave(torch.tensor([size.get(i, 1) for i in range(v.shape[0])]), 0), q)
                for (k, v, q), size in zip(requests, sizes)]
    want = _kernel(repeated, dtype)[0]
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-5
    assert torch.allclose(got.float(), want.float(), atol=tolerance)
    assert torch.equal(got[-4:], output[-4:])  # no biased key: untouched
    assert not torch.allclose(output[:8].float(), want[:8].float(), atol=0.1)  # the bias matters here
    assert bias.biased_calls == 1


def test_a_step_records_its_biases_at_the_slots_it_writes():
    """``record``: the step's biases go to the slots of its tokens (padding slots -1 skipped), a text token's
    bias is 0 (a reused slot forgets an old bias), and the cache layout is checked against what was written."""
    import torch

    from vtprune.serving.slot_bias import SlotBias

    output, cache, meta, slots, query = _kernel(_requests(torch, torch.Generator().manual_seed(1), [(20, 20)]),
                                                torch.float32)
    keys, values = _requests(torch, torch.Generator().manual_seed(1), [(20, 20)])[0][:2]
    bias = SlotBias(layers=[0])
    bias.step = torch.arange(20, dtype=torch.float32) / 10
    mapping = torch.cat([slots[0], torch.tensor([-1, -1])])
    bias.record(cache, mapping, torch.cat([keys, keys[:2]]), torch.cat([values, values[:2]]))
    assert bias.checked and torch.equal(bias.slots[slots[0]], bias.step)
    assert int((bias.slots != 0).sum()) == 19
    bias.step = torch.zeros(20)
    bias.record(cache, slots[0][:5], keys[:5], values[:5])
    assert float(bias.slots[slots[0][:5]].abs().sum()) == 0 and float(bias.slots[slots[0][5]]) == 0.5

    wrong = SlotBias(layers=[0])  # values where the keys are: the layout check refuses
    with pytest.raises(RuntimeError, match="cache layout"):
        wrong.record(cache, slots[0], values, keys)
