"""Caching attention internals leaves the run exactly as the model's own; editing them still edits.

A trace that only reads ``hook_pattern`` / ``hook_attn_scores`` / ``hook_rot_q`` / ``hook_rot_k``
gives bit-for-bit the plain HF sdpa forward's logits and hidden states (the reference: HF itself),
so caching a pattern does not perturb what is measured. A hook that zeroes one head's pattern, in
place or by returning a copy, equals a plain torch pre-hook that zeroes that head's slice of the
attention output projection's input (a zero pattern row means a zero ``hook_z``).
"""

import pytest
import torch

from pruning_bridge.bridge import HookBridge

TINY_MODELS = ("tiny-gpt2", "tiny-qwen3", "tiny-llama", "tiny-mistral", "tiny-pythia")
PROMPTS = ["The quick brown fox jumps over the lazy dog", "Hello there"]
LAYER, HEAD = 1, 2
# written out by hand: each family's attention output projection in layer LAYER
OUT_PROJ = {"tiny-gpt2": "transformer.h.1.attn.c_proj",
            "tiny-pythia": "gpt_neox.layers.1.attention.dense"}
INTERNALS = ("attn.hook_pattern", "attn.hook_attn_scores", "attn.hook_rot_q", "attn.hook_rot_k")


def plain(model, ids, mask, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask,
                     position_ids=(mask.cumsum(-1) - 1).clamp(min=0), **kwargs)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_caching_internals_is_bit_exact_to_hf_sdpa(tiny, name):
    model, tok = tiny(name)
    bridge = HookBridge(model, tok)
    ids, mask = bridge.tokenize(PROMPTS)  # left-padded
    names = [n for n in bridge.hook_names
             if n.split(".", 2)[-1] in INTERNALS or n.endswith("hook_resid_post")]
    names += [f"blocks.{LAYER}.{n}" for n in INTERNALS
              if f"blocks.{LAYER}.{n}" in bridge._order and f"blocks.{LAYER}.{n}" not in names]
    assert any("hook_pattern" in n for n in names)
    logits, cache = bridge.run_with_cache(ids, names=names, attention_mask=mask)
    reference = plain(model, ids, mask, output_hidden_states=True)
    assert torch.equal(logits, reference.logits)
    layers = model.config.num_hidden_layers
    for layer in range(layers - 1):  # HF's last hidden state is after the final norm
        assert torch.equal(cache[f"blocks.{layer}.hook_resid_post"],
                           reference.hidden_states[layer + 1])
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("name", TINY_MODELS)
@pytest.mark.parametrize("in_place", [True, False])
def test_zeroing_a_heads_pattern_equals_zeroing_its_output(tiny, name, in_place):
    model, tok = tiny(name)
    bridge = HookBridge(model, tok)
    ids, mask = bridge.tokenize(PROMPTS)
    config = model.config
    d_head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    def zero_pattern(pattern, hook):
        if not in_place:
            pattern = pattern.clone()
        pattern[:, HEAD] = 0
        return None if in_place else pattern

    def zero_slice(module, args):
        x = args[0].clone()
        x[..., HEAD * d_head:(HEAD + 1) * d_head] = 0
        return (x,)

    with bridge.hooks([(f"blocks.{LAYER}.attn.hook_pattern", zero_pattern)]):
        edited = bridge(ids, mask)
    out_proj = model.get_submodule(OUT_PROJ.get(name, f"model.layers.{LAYER}.self_attn.o_proj"))
    handle = out_proj.register_forward_pre_hook(zero_slice)
    try:
        expected = plain(model, ids, mask).logits
    finally:
        handle.remove()
    assert not torch.allclose(expected, plain(model, ids, mask).logits, atol=1e-4)
    torch.testing.assert_close(edited, expected, atol=1e-5, rtol=0)
