"""Physical head removal, checked against zeroing the heads' outputs with a plain PyTorch hook."""

import copy
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from pruning_bridge.heads.removal import (
    head_counts,
    heads_to_remove,
    load_head_pruned,
    remove_heads,
)

ARCHS = ["tiny-llama", "tiny-qwen3", "tiny-gpt2"]
# name: (heads to remove, expected (query, kv) heads per layer for 4 query / 2 kv heads)
CASES = {
    # layer 0 keeps 1 + 2 heads on the two kv heads -> kv replicated to 3; layer 1 loses kv
    # group 0 entirely; layer 2 keeps one head per kv head
    "uneven": ({0: [0], 1: [0, 1], 2: [1, 3]}, [(3, 3), (2, 1), (2, 2), (4, 2)]),
    "kv_groups": ({1: [2, 3], 3: [0, 1]}, [(4, 2), (2, 1), (4, 2), (2, 1)]),
    "uniform": ({i: [1, 2] for i in range(4)}, [(2, 2)] * 4),
}


def tiny_qwen2_with_biases():
    """Qwen2 has q/k/v biases; random non-zero ones, so that dropping their rows matters."""
    config = Qwen2Config(vocab_size=1000, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("_proj.bias"):
                    param.normal_()
    return model


def get_model(tiny, arch):
    return tiny_qwen2_with_biases() if arch == "tiny-qwen2" else tiny(arch)[0]


def is_gpt2(model):
    return model.config.model_type == "gpt2"


@contextmanager
def heads_zeroed(model, heads_by_layer):
    """The reference: zero those heads' slices of the output projection's input."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    handles = []
    for layer, heads in heads_by_layer.items():
        if is_gpt2(model):
            proj = model.transformer.h[layer].attn.c_proj
        else:
            proj = model.model.layers[layer].self_attn.o_proj

        def zero(module, args, heads=list(heads)):
            z = args[0].unflatten(-1, (-1, head_dim)).clone()
            z[..., heads, :] = 0
            return (z.flatten(-2), *args[1:])

        handles.append(proj.register_forward_pre_hook(zero))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def token_ids(model, shape=(2, 9)):
    return torch.randint(0, 1000, shape, generator=torch.Generator().manual_seed(0))


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def expected_layout(model, case):
    layout = CASES[case][1]
    return [(q, q) for q, _ in layout] if is_gpt2(model) else layout


def removed_params(model, layout):
    """Parameters that ``layout`` saves versus 4 query / 2 kv heads (GPT-2: 4 heads)."""
    d = model.config.hidden_size
    head = d // 4  # every tiny model has head_dim 16 = 64 / 4
    if is_gpt2(model):  # c_attn: the head's q, k, v columns and biases; c_proj: its rows
        return sum((4 * d * head + 3 * head) * (4 - q) for q, _ in layout)
    proj_head = d * head + (head if model.config.model_type == "qwen2" else 0)  # + q/k/v bias
    return sum((proj_head + d * head) * (4 - q) + 2 * proj_head * (2 - kv) for q, kv in layout)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("arch", [*ARCHS, "tiny-qwen2"])
def test_removal_equals_zeroed_heads(tiny, arch, case):
    model = get_model(tiny, arch)
    heads, _ = CASES[case]
    ids = token_ids(model)
    with heads_zeroed(model, heads):
        reference = logits(model, ids)
    pruned = remove_heads(copy.deepcopy(model), heads)
    layout = expected_layout(model, case)
    assert head_counts(pruned) == layout
    assert n_params(model) - n_params(pruned) == removed_params(model, layout)
    torch.testing.assert_close(logits(pruned, ids), reference, atol=1e-4, rtol=0)


def test_uneven_gqa_with_eager_attention(tiny):
    model, _ = tiny("tiny-llama")
    heads, _ = CASES["uneven"]
    ids = token_ids(model)
    with heads_zeroed(model, heads):
        reference = logits(model, ids)
    pruned = remove_heads(copy.deepcopy(model), heads)
    pruned.set_attn_implementation("eager")  # repeat_kv with each layer's num_key_value_groups
    torch.testing.assert_close(logits(pruned, ids), reference, atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", ["uneven", "uniform"])
@pytest.mark.parametrize("arch", ARCHS)
def test_generation_with_kv_cache_equals_zeroed(tiny, arch, case):
    model, tok = tiny(arch)
    heads, _ = CASES[case]
    ids = token_ids(model, (2, 5))
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
              pad_token_id=tok.pad_token_id)
    with torch.no_grad(), heads_zeroed(model, heads):
        reference = model.generate(ids, **kw)
    pruned = remove_heads(copy.deepcopy(model), heads)
    with torch.no_grad():
        assert torch.equal(pruned.generate(ids, **kw), reference)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("arch", ARCHS)
def test_save_and_reload(tiny, tmp_path, arch, case):
    model, _ = tiny(arch)
    heads, _ = CASES[case]
    pruned = remove_heads(copy.deepcopy(model), heads)
    pruned.save_pretrained(tmp_path)
    ids = token_ids(model)
    standard = case == "uniform" and not is_gpt2(model)
    if standard:  # the plain config describes it: 2 query / 2 kv heads of the old size
        assert not hasattr(pruned.config, "head_layout")
        assert (pruned.config.num_attention_heads, pruned.config.num_key_value_heads) == (2, 2)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    else:
        assert pruned.config.head_layout == [list(c) for c in expected_layout(model, case)]
        with pytest.raises(RuntimeError, match="mismatch"):  # never silently re-initialised
            AutoModelForCausalLM.from_pretrained(tmp_path)
        reloaded = load_head_pruned(tmp_path)
    assert type(reloaded) is type(model)
    assert head_counts(reloaded) == head_counts(pruned)
    torch.testing.assert_close(logits(reloaded.eval(), ids), logits(pruned, ids), atol=0, rtol=0)
    if case == "uneven":  # from_pretrained's options still apply
        assert next(load_head_pruned(tmp_path, dtype=torch.bfloat16).parameters()).dtype \
            == torch.bfloat16


def test_layouts_the_standard_config_cannot_express(tiny, tmp_path):
    model, _ = tiny("tiny-llama")
    pruned = remove_heads(copy.deepcopy(model), {i: [0] for i in range(4)})
    assert pruned.config.head_layout == [[3, 3]] * 4  # uniform, but 64 % 3 != 0 for Llama
    pruned.save_pretrained(tmp_path)
    ids = token_ids(model)
    torch.testing.assert_close(logits(load_head_pruned(tmp_path), ids), logits(pruned, ids),
                               atol=0, rtol=0)
    gpt2 = remove_heads(copy.deepcopy(tiny("tiny-gpt2")[0]), {})
    assert not hasattr(gpt2.config, "head_layout")  # all heads: plain GPT-2 again


def test_removing_twice_uses_current_indices(tiny):
    model, _ = tiny("tiny-llama")
    ids = token_ids(model)
    with heads_zeroed(model, {0: [0, 1], 1: [1, 2]}):
        reference = logits(model, ids)
    pruned = remove_heads(copy.deepcopy(model), {0: [0], 1: [1]})
    remove_heads(pruned, {0: [0], 1: [1]})  # now original heads 1 and 2
    assert head_counts(pruned)[:2] == [(2, 1), (2, 2)]
    torch.testing.assert_close(logits(pruned, ids), reference, atol=1e-4, rtol=0)


def test_bad_input_errors_leave_the_model_unchanged(tiny):
    model = copy.deepcopy(tiny("tiny-llama")[0])
    before = head_counts(model)
    with pytest.raises(IndexError, match=r"Layer 4 .* 4 layers \(valid: 0..3\)"):
        remove_heads(model, {0: [1], 4: [0]})
    with pytest.raises(IndexError, match=r"\[4\] .*layer 1, .*\(valid: 0..3\)"):
        remove_heads(model, {0: [1], 1: [4]})
    with pytest.raises(ValueError, match="all 4 heads of layer 2.*drop_layers"):
        remove_heads(model, {0: [1], 2: [0, 1, 2, 3]})
    assert head_counts(model) == before


def test_heads_to_remove_picks_the_least_important():
    importance = torch.tensor([[1.0, 5.0, 3.0, 2.0], [0.5, 0.1, 9.0, 8.0]])
    assert heads_to_remove(importance, 0.5, mode="uneven") == {0: [0, 3], 1: [0, 1]}
    assert heads_to_remove(importance.numpy(), 0.0, mode="uneven") == {}
    # the most important head of each layer always stays
    assert heads_to_remove(importance, 0.75, mode="uneven") == {0: [0, 2, 3], 1: [0, 1, 3]}
    # balanced (4 query over 2 kv heads): one head per kv group, or a whole group
    assert heads_to_remove(importance, 0.5, [(4, 2)] * 2) == {0: [0, 3], 1: [0, 1]}
    # whole kv groups, scored by their sum: [6, 5] and [0.6, 17]
    assert heads_to_remove(np.asarray(importance), 0.5, kv_groups=2) == {0: [2, 3], 1: [0, 1]}


def test_heads_to_remove_errors():
    importance = torch.ones(2, 4)
    with pytest.raises(ValueError, match="at most 6"):
        heads_to_remove(importance, 1.0, mode="uneven")
    with pytest.raises(ValueError, match="fraction"):
        heads_to_remove(importance, 1.5)
    with pytest.raises(ValueError, match="kv_groups=3"):
        heads_to_remove(importance, 0.5, kv_groups=3)
    with pytest.raises(ValueError, match="n_layers, n_heads"):
        heads_to_remove(torch.ones(4), 0.5)


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gpt2"])
def test_bridge_on_a_model_with_uneven_heads(tiny, arch):
    """The bridge reads head counts from the tensors, so per-layer layouts work through it."""
    from pruning_bridge.bridge import HookBridge

    model, tok = tiny(arch)
    pruned = remove_heads(copy.deepcopy(model), {0: [1], 2: [0, 3]})
    bridge = HookBridge(pruned, tok)
    ids = torch.randint(0, 50000, (2, 9), generator=torch.Generator().manual_seed(0))
    logits, cache = bridge.run_with_cache(ids, names=["blocks.0.attn.hook_z",
                                                      "blocks.1.attn.hook_z",
                                                      "blocks.2.attn.hook_q"])
    assert cache["blocks.0.attn.hook_z"].shape[2] == 3
    assert cache["blocks.1.attn.hook_z"].shape[2] == 4
    assert cache["blocks.2.attn.hook_q"].shape[2] == 2
    with torch.no_grad():
        assert torch.allclose(logits, pruned(ids).logits, atol=1e-5)
