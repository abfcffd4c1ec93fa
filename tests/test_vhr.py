"""VHR against a straightforward eager reference: the image prompt and its text-only copy as a
batch of two, head divergence measured and heads scaled layer by layer in o_proj pre-hooks."""

import pytest
import torch

import vtprune
from vtprune.testing import IMAGE_TOKEN, tiny_inputs, tiny_model


class ReferenceVHR:
    """Stock model, eager attention; row 0 = image prompt, row 1 = the same prompt without image tokens."""

    def __init__(self, model, layers, alpha):
        self.model, self.alpha, self.heads, self.handles = model, alpha, {}, []
        for j in layers:
            attn = model.model.language_model.layers[j].self_attn
            self.handles.append(attn.o_proj.register_forward_pre_hook(self._hook(j, attn.config.num_attention_heads)))

    def _hook(self, j, n_heads):
        def hook(module, args):
            x = args[0]
            d = x.shape[-1] // n_heads
            if x.shape[0] == 2:  # the probe: decide the heads of this layer
                a, b = x[0, -1].view(n_heads, d), x[1, -1].view(n_heads, d)
                vhd = torch.stack([torch.dist(a[h], b[h]) for h in range(n_heads)])
                energy = torch.stack([b[h].pow(2).sum() for h in range(n_heads)])
                out = (vhd > vhd.mean() + vhd.std()) & (energy > energy.mean() + energy.std())
                vhd = torch.where(out, torch.zeros_like(vhd), vhd)
                self.heads[j] = [h for h in range(n_heads) if vhd[h] > vhd.median()]
            y = x.clone()
            for h in self.heads[j]:
                y[..., h * d:(h + 1) * d] *= self.alpha
            return (y,)
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def _greedy_reference(model, inputs, steps):
    ids = inputs["input_ids"][0]
    text_ids = ids[ids != IMAGE_TOKEN]
    n, m = ids.numel(), text_ids.numel()
    batch_ids = torch.stack([ids, torch.cat([torch.zeros(n - m, dtype=torch.long), text_ids])])
    mask = torch.stack([torch.ones(n, dtype=torch.long), torch.cat([torch.zeros(n - m), torch.ones(m)]).long()])
    pos = torch.stack([torch.arange(n), torch.cat([torch.zeros(n - m), torch.arange(m)]).long()])
    with torch.no_grad():
        images = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
        out = model(input_ids=batch_ids, attention_mask=mask, position_ids=pos, use_cache=True, **images)
        first = out.logits[0, -1]
        cache = out.past_key_values
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys[:1], layer.values[:1]
        tokens, tok, position = [], out.logits[:1, -1].argmax(-1, keepdim=True), n
        for _ in range(steps):
            tokens.append(tok)
            out = model(input_ids=tok, position_ids=torch.tensor([[position]]), past_key_values=cache, use_cache=True)
            tok, position = out.logits[:, -1].argmax(-1, keepdim=True), position + 1
    return first, torch.cat(tokens, 1)


def _wrapped_run(family, alpha):
    """VHR's last-position logits, greedy tokens and stats on a one-image prompt; the model comes back
    unwrapped, on eager attention (for the reference)."""
    model = tiny_model(family)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    inputs = tiny_inputs(model, family, images_per_row=(1,), with_mask=False)
    vtprune.wrap(model, "vhr", alpha=alpha, layers=[0, 1])
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1]
        tokens = model.generate(**inputs, max_new_tokens=6, do_sample=False)[:, inputs["input_ids"].shape[1]:]
        stats = vtprune.stats(model)["vhr"]
    vtprune.unwrap(model)
    model.set_attn_implementation({"text_config": "eager"})
    return model, inputs, logits, tokens, stats


@pytest.mark.parametrize("family,alpha", [("llava", 2.0), ("llava", 0.5), ("llava_next", 2.0), ("internvl", 2.0)])
def test_vhr_equals_eager_reference(family, alpha):
    model, inputs, logits, tokens, stats = _wrapped_run(family, alpha)
    ref = ReferenceVHR(model, [0, 1], alpha)
    try:
        ref_logits, ref_tokens = _greedy_reference(model, inputs, 6)
    finally:
        ref.close()
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    assert torch.equal(tokens, ref_tokens)
    assert stats["heads_per_layer"] == {j: [len(h)] for j, h in ref.heads.items()}


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "qwen3_vl", "internvl", "qwen3_5"])  # qwen3_5: linear-
def test_vhr_identity_and_composition(family):  # attention states, cut back to the real rows after the doubled prefill
    model = tiny_model(family)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    inputs = tiny_inputs(model, family, images_per_row=(1, 2))
    with torch.no_grad():
        stock = model(**inputs).logits
        stock_tokens = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    with vtprune.wrapped(model, "vhr", alpha=1.0):
        with torch.no_grad():
            torch.testing.assert_close(model(**inputs).logits, stock, atol=1e-6, rtol=0)
            assert torch.equal(model.generate(**inputs, max_new_tokens=5, do_sample=False), stock_tokens)
    with vtprune.wrapped(model, [vtprune.methods.get("fastervlm")(keep=0.5), vtprune.methods.get("vhr")()]):
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        stats = vtprune.stats(model)
    assert out.shape == stock_tokens.shape and stats["visual_tokens_out"] < stats["visual_tokens_in"]
    assert stats["vhr"]["layers"]


def test_vhr_errors():
    model = tiny_model("llava")
    with pytest.raises(ValueError, match="alpha"):
        vtprune.wrap(model, "vhr", alpha=0)
    with pytest.raises(ValueError, match="do not exist"):
        vtprune.wrap(model, "vhr", layers=[5])
    with pytest.raises(ValueError, match="does not compose"):
        vtprune.wrap(model, ["exit", "vhr"])
    assert not vtprune.is_wrapped(model)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_vhr_equals_eager_reference_on_qwen(family):
    """Qwen: the doubled prefill carries 3-D (mrope) positions — the image row's own, and plain text
    positions for its text-only copy — and Qwen3-VL's deepstack mask doubled with it."""
    from reference import positions

    model, inputs, logits, tokens, stats = _wrapped_run(family, 2.0)
    ref = ReferenceVHR(model, [0, 1], 2.0)
    try:
        ids = inputs["input_ids"][0]
        text_ids = ids[ids != IMAGE_TOKEN]
        n, m = ids.numel(), text_ids.numel()
        batch_ids = torch.stack([ids, torch.cat([torch.zeros(n - m, dtype=torch.long), text_ids])])
        mask = torch.stack([torch.ones(n, dtype=torch.long), torch.cat([torch.zeros(n - m), torch.ones(m)]).long()])
        image_pos = positions(model, {**inputs, "attention_mask": mask[:1]}, for_generate=True)  # [4, 1, n]
        text_pos = torch.cat([torch.zeros(n - m), torch.arange(m)]).long().expand(image_pos.shape[0], 1, n)
        types = torch.stack([inputs["mm_token_type_ids"][0], torch.zeros_like(inputs["mm_token_type_ids"][0])])
        with torch.no_grad():
            out = model(input_ids=batch_ids, attention_mask=mask, position_ids=torch.cat([image_pos, text_pos], 1),
                        pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"],
                        mm_token_type_ids=types, use_cache=True)
            ref_logits = out.logits[0, -1]
            cache = out.past_key_values
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys[:1], layer.values[:1]
            tok, pos, ref_tokens = out.logits[:1, -1].argmax(-1, keepdim=True), image_pos[..., -1:], []
            full_mask = mask[:1]
            for _ in range(6):
                ref_tokens.append(tok)
                pos, full_mask = pos + 1, torch.cat([full_mask, torch.ones_like(tok)], 1)
                out = model(input_ids=tok, attention_mask=full_mask, position_ids=pos, past_key_values=cache,
                            use_cache=True)
                tok = out.logits[:, -1].argmax(-1, keepdim=True)
    finally:
        ref.close()
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    assert torch.equal(tokens, torch.cat(ref_tokens, 1))
    assert stats["heads_per_layer"] == {j: [len(h)] for j, h in ref.heads.items()}
