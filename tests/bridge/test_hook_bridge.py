"""HookBridge against independent references: TransformerLens, HF hidden states, plain PyTorch."""

import copy
import hashlib

import pytest
import torch

from pruning_bridge.bridge import UnsupportedArchitectureError
from pruning_bridge.bridge import HookBridge, UnknownHookError

PROMPTS = ["The quick brown fox jumps over", "Hello"]  # padded batch: different lengths


def state_hash(model) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def hf_run(model, ids, mask, **kwargs):
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=pos, **kwargs)


@pytest.fixture(scope="module")
def bridges(tiny):
    made = {}

    def get(name):
        if name not in made:
            model, tok = tiny(name)
            made[name] = HookBridge(model, tok)
        return made[name]

    return get


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-qwen3"])
def test_llama_qwen3_cache_against_hf(bridges, tiny, arch):
    check_llama_like(bridges(arch), *tiny(arch))


def check_llama_like(bridge, model, tok):
    """Against HF's own forward (its sdpa kernel): so no attention-internal names, which switch
    the trace to the bridge's eager attention (equal to ~1e-5, tested in test_families)."""
    logits, cache = bridge.run_with_cache(
        PROMPTS, names=lambda n: not any(k in n for k in ("rot_", "attn_scores", "pattern")))
    ids, mask = bridge.tokenize(PROMPTS)
    assert torch.equal(cache.attention_mask, mask)
    out = hf_run(model, ids, mask, output_hidden_states=True)
    n = model.config.num_hidden_layers
    torch.testing.assert_close(cache["hook_embed"], out.hidden_states[0])
    for layer in range(n):
        attn = model.model.layers[layer].self_attn
        pre, mid, post = (cache[f"blocks.{layer}.hook_{k}"] for k in ("resid_pre", "resid_mid",
                                                                      "resid_post"))
        attn_out, mlp_out = cache[f"blocks.{layer}.hook_attn_out"], cache[f"blocks.{layer}.hook_mlp_out"]
        torch.testing.assert_close(pre, out.hidden_states[layer])
        if layer < n - 1:  # the last hidden state is taken after the final norm
            torch.testing.assert_close(post, out.hidden_states[layer + 1])
        torch.testing.assert_close(pre + attn_out, mid)
        torch.testing.assert_close(mid + mlp_out, post)
        z = cache[f"blocks.{layer}.attn.hook_z"]
        assert z.shape[2] == model.config.num_attention_heads
        torch.testing.assert_close(attn.o_proj(z.flatten(2)), attn_out, rtol=1e-4, atol=1e-4)
        k = cache[f"blocks.{layer}.attn.hook_k"]
        assert k.shape[2] == model.config.num_key_value_heads  # grouped-query attention
    norm = model.model.norm
    torch.testing.assert_close(cache["ln_final.hook_normalized"] * norm.weight,
                               norm(out.hidden_states[-1] * 0 + cache[f"blocks.{n - 1}.hook_resid_post"]))
    torch.testing.assert_close(logits, out.logits)


@pytest.mark.slow
def test_smollm2_cache_against_hf(smollm2):
    model, tok = smollm2
    check_llama_like(HookBridge(model, tok), model, tok)


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-qwen3", "tiny-gpt2"])
def test_zeroing_a_head_equals_plain_pytorch(bridges, tiny, arch):
    bridge = bridges(arch)
    model, _ = tiny(arch)
    ids, mask = bridge.tokenize(PROMPTS)
    layer, head = 1, 2
    cfg = model.config
    d_head = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    def zero(z, name):
        z = z.clone()
        z[:, :, head] = 0
        return z

    with bridge.hooks([(f"blocks.{layer}.attn.hook_z", zero)]):
        edited = bridge(ids, attention_mask=mask)
    o_proj = (model.transformer.h[layer].attn.c_proj if arch == "tiny-gpt2"
              else model.model.layers[layer].self_attn.o_proj)

    def pre_hook(module, args):
        x = args[0].clone()
        x[..., head * d_head:(head + 1) * d_head] = 0
        return (x,)

    handle = o_proj.register_forward_pre_hook(pre_hook)
    try:
        expected = hf_run(model, ids, mask).logits
    finally:
        handle.remove()
    torch.testing.assert_close(edited, expected)
    assert not torch.allclose(edited, hf_run(model, ids, mask).logits)


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gpt2"])
def test_replacing_resid_post_by_resid_pre_removes_the_layer(bridges, tiny, arch):
    bridge = bridges(arch)
    model, _ = tiny(arch)
    ids, mask = bridge.tokenize(PROMPTS)
    layer, saved = 2, {}

    def keep(x, name):
        saved["pre"] = x.clone()

    with bridge.hooks([(f"blocks.{layer}.hook_resid_pre", keep),
                       (f"blocks.{layer}.hook_resid_post", lambda x, name: saved["pre"])]):
        logits = bridge(ids, attention_mask=mask)
    pruned = copy.deepcopy(model)
    layers = pruned.transformer.h if arch == "tiny-gpt2" else pruned.model.layers
    del layers[layer]
    expected = hf_run(pruned, ids, mask, use_cache=False).logits
    torch.testing.assert_close(logits, expected)


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-qwen3", "tiny-gpt2"])
def test_resid_mid_write_and_ln_final_write(bridges, tiny, arch):
    """Writes to names that are not module outputs in HF (resid_mid, ln_final.hook_normalized)."""
    bridge = bridges(arch)
    model, _ = tiny(arch)
    ids, mask = bridge.tokenize(PROMPTS)
    shift = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with bridge.hooks([("blocks.1.hook_resid_mid", lambda x, n: x + shift)]):
        _, cache = bridge.run_with_cache(ids, ["blocks.1.hook_resid_mid", "blocks.1.hook_resid_post",
                                               "blocks.1.hook_mlp_out"], attention_mask=mask)
    _, clean = bridge.run_with_cache(ids, ["blocks.1.hook_resid_mid"], attention_mask=mask)
    torch.testing.assert_close(cache["blocks.1.hook_resid_mid"], clean["blocks.1.hook_resid_mid"] + shift)
    torch.testing.assert_close(cache["blocks.1.hook_resid_mid"] + cache["blocks.1.hook_mlp_out"],
                               cache["blocks.1.hook_resid_post"])
    with bridge.hooks([("ln_final.hook_normalized", lambda x, n: torch.zeros_like(x))]):
        logits = bridge(ids, attention_mask=mask)
    head = model.lm_head
    norm = model.transformer.ln_f if arch == "tiny-gpt2" else model.model.norm
    bias = getattr(norm, "bias", None)
    base = bias if bias is not None else torch.zeros(model.config.hidden_size)
    expected = head(base.expand(*ids.shape, -1))
    torch.testing.assert_close(logits, expected)


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-qwen3", "tiny-gpt2"])
def test_generation_with_hook_equals_stepwise_decoding(bridges, tiny, arch):
    bridge = bridges(arch)
    model, tok = tiny(arch)
    layers = model.transformer.h if arch == "tiny-gpt2" else model.model.layers
    shift = 3 * torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    with bridge.hooks([("blocks.1.hook_resid_post", lambda x, n: x + shift)]):
        out = bridge.generate(PROMPTS, max_new_tokens=6, return_text=False)
    ids, mask = bridge.tokenize(PROMPTS)
    handle = layers[1].register_forward_hook(
        lambda m, a, o: (o[0] + shift, *o[1:]) if isinstance(o, tuple) else o + shift)
    try:
        seq, m = ids, mask
        for _ in range(6):
            nxt = hf_run(model, seq, m, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq, m = torch.cat([seq, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
    finally:
        handle.remove()
    assert torch.equal(out, seq)
    plain = bridge.generate(PROMPTS, max_new_tokens=6, return_text=False)
    assert not torch.equal(plain, out)


def test_padded_batch_equals_single_runs(bridges):
    bridge = bridges("tiny-gpt2")
    _, cache = bridge.run_with_cache(PROMPTS, ["blocks.2.hook_resid_post"])
    for i, prompt in enumerate(PROMPTS):
        _, single = bridge.run_with_cache(prompt, ["blocks.2.hook_resid_post"])
        n = single["blocks.2.hook_resid_post"].shape[1]
        torch.testing.assert_close(cache["blocks.2.hook_resid_post"][i, -n:],
                                   single["blocks.2.hook_resid_post"][0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(tiny, dtype):
    model, tok = tiny("tiny-qwen3")
    half = copy.deepcopy(model).to(dtype)
    bridge = HookBridge(half, tok)
    shift = torch.ones(model.config.hidden_size)  # fp32 edits are cast to the model's dtype
    with bridge.hooks([("blocks.0.hook_resid_post", lambda x, n: x + shift),
                       ("blocks.1.attn.hook_z", lambda z, n: z * 0.5)]):
        logits, cache = bridge.run_with_cache(PROMPTS, ["blocks.0.hook_resid_post"])
        text = bridge.generate("Hello", max_new_tokens=3)
    assert logits.dtype == dtype and cache["blocks.0.hook_resid_post"].dtype == dtype
    assert torch.isfinite(logits.float()).all() and len(text) == 1


def test_model_unchanged_after_calls_and_exceptions(tiny):
    model, tok = tiny("tiny-llama")
    before = state_hash(model)
    ids = tok(PROMPTS[0], return_tensors="pt")["input_ids"]
    reference = hf_run(model, ids, torch.ones_like(ids)).logits
    bridge = HookBridge(model, tok)
    assert tok.padding_side == "right"  # nnsight got a copy of the tokenizer

    def boom(x, name):
        raise RuntimeError("hook failed")

    with pytest.raises(RuntimeError, match="hook failed"):
        with bridge.hooks([("blocks.0.hook_resid_post", boom)]):
            bridge(ids)
    assert bridge._hooks == []
    with pytest.raises(ValueError):
        with bridge.hooks([("blocks.0.hook_mlp_out", lambda x, n: x * 0)]):
            raise ValueError("user error inside the block")
    assert bridge._hooks == []
    torch.testing.assert_close(bridge(ids), reference)
    torch.testing.assert_close(hf_run(model, ids, torch.ones_like(ids)).logits, reference)
    assert state_hash(model) == before


def test_unknown_hook_name_lists_close_names(bridges):
    bridge = bridges("tiny-llama")
    with pytest.raises(UnknownHookError, match="blocks.1.hook_resid_post"):
        bridge.run_with_cache("hi", ["blocks.1.hook_resid_pots"])
    with pytest.raises(UnknownHookError, match="4 layers"):
        with bridge.hooks([("blocks.9.hook_resid_post", lambda x, n: x)]):
            pass
    _, cache = bridge.run_with_cache("hi", lambda n: n.endswith("hook_z"))
    assert len(cache) == 4
    with pytest.raises(KeyError, match="closest"):
        cache["blocks.0.attn.hook_zz"]


def test_unsupported_architecture_names_the_supported_ones():
    from transformers import OPTConfig, OPTForCausalLM

    model = OPTForCausalLM(OPTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     ffn_dim=64, vocab_size=100, word_embed_proj_dim=32))
    with pytest.raises(UnsupportedArchitectureError, match="gpt2, gpt_neox, llama, mistral, qwen2, qwen3"):
        HookBridge(model)


def test_evals_run_through_the_bridge(bridges, tiny, data_dir):
    from pruning_bridge.evals import mmlu_accuracy

    model, tok = tiny("tiny-llama")
    bridge = bridges("tiny-llama")
    plain = mmlu_accuracy(model, tok, limit=60, data_dir=data_dir, progress=False)
    with bridge.hooks([("blocks.0.hook_resid_post", lambda x, n: None)]):
        bridged = mmlu_accuracy(bridge, tok, limit=60, data_dir=data_dir, progress=False)
    assert [r["prediction"] for r in plain.records] == [r["prediction"] for r in bridged.records]
    torch.testing.assert_close(torch.tensor([r["letter_logits"] for r in bridged.records]),
                               torch.tensor([r["letter_logits"] for r in plain.records]))
