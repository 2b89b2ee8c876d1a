"""Every family in the architecture table, and every feature on the two added as table entries
only (Mistral, GPT-NeoX / Pythia), against independent references: TransformerLens's own
implementation on the same weights where it has one, else a plain-PyTorch forward pass
(``tests/references.py``), and plain PyTorch hooks on the Hugging Face modules (paths written
out here by hand)."""

import copy

import pytest
import torch

from lens_safety import Edit, residual_hooks
from pruning_bridge.bridge import attention
from pruning_bridge.bridge import ARCHITECTURES, HookBridge, UnknownHookError, head_counts
from pruning_bridge.heads import RoutedHeads, remove_heads
from pruning_bridge.models import TINY_MODELS, load_head_pruned
from pruning_bridge.pruning import (drop_layers, input_norms, magnitude_prune, prunable_linears,
                                    skip_layers, wanda_prune)
from pruning_bridge.pruning.layers import prefix_reused_logits
from references import PlainReference, by_transformer_lens, tl_hook_names, tl_reference

NEW = ["tiny-mistral", "tiny-pythia"]
TEXT = "The quick brown fox jumps over the lazy dog"
PROMPTS = [TEXT, "Hello there"]
# written out by hand: where the blocks and each block's attention output projection live
BLOCKS = {"tiny-mistral": "model.layers", "tiny-pythia": "gpt_neox.layers"}
OUT_PROJ = {"tiny-mistral": "self_attn.o_proj", "tiny-pythia": "attention.dense"}
LINEARS = {"tiny-mistral": {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                            "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"},
           "tiny-pythia": {"attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h",
                           "mlp.dense_4h_to_h"}}


def run(model, ids, mask=None, **kwargs):
    mask = torch.ones_like(ids) if mask is None else mask
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask,
                     position_ids=(mask.cumsum(-1) - 1).clamp(min=0), **kwargs).logits


def blocks(model, name):
    return model.get_submodule(BLOCKS[name])


def test_every_table_family_has_a_tiny_model(tiny):
    assert {tiny(name)[0].config.model_type for name in TINY_MODELS} == set(ARCHITECTURES) - {
        "qwen2"}  # Qwen2 is Llama's layout plus q/k/v biases: tests build it with biases


# ---------------------------------------------------------------- hooks


@pytest.mark.parametrize("name", TINY_MODELS)
def test_every_hook_equals_transformer_lens(tiny, name):
    """Every bridge hook point equals TransformerLens's on the same unprocessed weights."""
    model, tok = tiny(name)
    bridge, hooked = HookBridge(model, tok), tl_reference(model, tok)
    ids = tok(TEXT, return_tensors="pt")["input_ids"]
    logits, cache = bridge.run_with_cache(ids)
    with torch.no_grad():
        tl_logits, tl_cache = hooked.run_with_cache(ids)
    for hook in bridge.hook_names:
        assert cache[hook].shape == tl_cache[hook].shape, hook
        torch.testing.assert_close(cache[hook], tl_cache[hook], atol=1e-4, rtol=0, msg=hook)
    torch.testing.assert_close(logits, tl_logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_both_hook_styles_on_every_hook_equal_transformer_lens(tiny, name):
    """A hook may return a replacement or edit in place and return None: on every hook point
    (computed ones such as resid_mid and the norms' parts included) both change the logits
    exactly as the same edit does in TransformerLens."""
    model, tok = tiny(name)
    bridge, hooked = HookBridge(model, tok), tl_reference(model, tok)
    ids = tok(TEXT, return_tensors="pt")["input_ids"]

    def returning(x, *args, **kwargs):
        return x * 1.5 + 0.25

    def in_place(x, name):
        x.mul_(1.5).add_(0.25)

    clean = bridge(ids)
    for hook in bridge.hook_names:
        with torch.no_grad():
            expected = hooked.run_with_hooks(ids, fwd_hooks=[(hook, returning)])
        for fn in (returning, in_place):
            with bridge.hooks([(hook, fn)]):
                edited = bridge(ids)
            torch.testing.assert_close(edited, expected, atol=1e-4, rtol=1e-4,
                                       msg=f"{hook} ({fn.__name__})")
        assert not torch.allclose(edited, clean, atol=1e-5), hook


def tl_gap(bridge, tl_names) -> set[str]:
    """TransformerLens hook names (per layer with the block prefix dropped) the bridge lacks."""
    def short(n):
        return n.split(".", 2)[-1] if n.startswith("blocks.") else n
    return {short(n) for n in tl_names} - {short(n) for n in bridge.hook_names}


@pytest.mark.parametrize("name", TINY_MODELS)
def test_the_transformer_lens_names_the_bridge_does_not_offer(tiny, name):
    """The gap, visible: only Qwen3's q/k norms are missing."""
    model, tok = tiny(name)
    gap = set()
    if name == "tiny-qwen3":
        gap |= {f"attn.{n}_norm.hook_{k}" for n in "qk" for k in ("scale", "normalized")}
    assert tl_gap(HookBridge(model, tok), tl_hook_names(model, tok)) == gap


@pytest.mark.parametrize("name", TINY_MODELS)
def test_the_plain_reference_equals_transformer_lens_and_hf(tiny, name):
    """The plain-PyTorch reference gives HF's logits, and on every name it shares with
    TransformerLens's own implementation (HookedTransformer on 3.x; on 4.x the native model, for
    GPT-2 / Llama / Mistral) the same activations, and the same logits under an edit (of every
    such name in block 1 and outside the blocks: the other blocks run the same code)."""
    model, tok = tiny(name)
    plain, ref = PlainReference(model), tl_reference(model, tok)
    ids = tok(TEXT, return_tensors="pt")["input_ids"]
    logits, cache = plain.run_with_cache(ids)
    with torch.no_grad():
        torch.testing.assert_close(logits, model(input_ids=ids).logits, atol=1e-4, rtol=0)
        _, tl_cache = ref.run_with_cache(ids)
    if isinstance(ref, PlainReference):  # 4.x, a family beyond the native model: HF checks it
        return
    names = [n for n in cache if by_transformer_lens(ref, n)]
    assert len(names) > len(cache) // 2
    for hook in names:
        torch.testing.assert_close(cache[hook], tl_cache[hook], atol=1e-4, rtol=0, msg=hook)
        if by_transformer_lens(ref, hook, edit=True) and not hook.startswith(
                ("blocks.0.", "blocks.2.", "blocks.3.")):
            edit = [(hook, lambda x, hook: x * 1.5 + 0.25)]
            torch.testing.assert_close(plain.run_with_hooks(ids, edit),
                                       ref.run_with_hooks(ids, fwd_hooks=edit),
                                       atol=1e-4, rtol=1e-4, msg=hook)


@pytest.mark.slow
def test_smollm2_every_hook_and_edit_equals_transformer_lens(smollm2):
    """The real SmolLM2 (Llama family) through TransformerLens's own implementation: every
    shared name <= 1e-4, and zeroing a head's pattern or scaling mlp.hook_post gives the same
    logits through both."""
    model, tok = smollm2
    bridge, hooked = HookBridge(model, tok), tl_reference(model, tok)
    ids = tok(TEXT, return_tensors="pt")["input_ids"]
    logits, cache = bridge.run_with_cache(ids)
    with torch.no_grad():
        tl_logits, tl_cache = hooked.run_with_cache(ids)
    for hook in bridge.hook_names:  # SmolLM2 has massive activations (|x| ~ 8e3 late in the
        # stream): differences are measured relative to each tensor's largest entry
        ours, theirs = cache[hook], tl_cache[hook]
        finite = torch.isfinite(theirs)
        assert torch.equal(torch.isfinite(ours), finite), hook
        largest = max(1.0, theirs[finite].abs().max().item())
        assert (ours[finite] - theirs[finite]).abs().max().item() <= 1e-4 * largest, hook
    torch.testing.assert_close(logits, tl_logits, atol=1e-4, rtol=1e-4)

    def zero_head(pattern, *args, **kwargs):
        pattern = pattern.clone()
        pattern[:, 3] = 0
        return pattern

    def scale(x, *args, **kwargs):
        return x * 0.5

    for edits in ([("blocks.5.attn.hook_pattern", zero_head)], [("blocks.7.mlp.hook_post", scale)]):
        with bridge.hooks(edits):
            edited = bridge(ids)
        with torch.no_grad():
            expected = hooked.run_with_hooks(ids, fwd_hooks=edits)
        torch.testing.assert_close(edited, expected, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(edited, logits, atol=1e-3)


@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("hook", ["blocks.1.attn.hook_q", "blocks.1.attn.hook_k",
                                  "blocks.1.attn.hook_v", "blocks.1.attn.hook_z",
                                  "blocks.2.hook_attn_out", "blocks.2.hook_mlp_out",
                                  "blocks.0.hook_resid_pre", "blocks.3.hook_resid_post"])
def test_edits_equal_transformer_lens(tiny, name, hook):
    """Writing a hook point changes the logits exactly as the same edit in TransformerLens."""
    model, tok = tiny(name)
    bridge, hooked = HookBridge(model, tok), tl_reference(model, tok)
    ids = tok(TEXT, return_tensors="pt")["input_ids"]

    def edit(x, *args, **kwargs):  # the bridge passes the name, TransformerLens hook=
        x = x.clone()
        x[..., :3] = 2 * x[..., 3:6] + 1  # touches the first head / first features
        return x

    with bridge.hooks([(hook, edit)]):
        edited = bridge(ids)
    with torch.no_grad():
        expected = hooked.run_with_hooks(ids, fwd_hooks=[(hook, edit)])
    torch.testing.assert_close(edited, expected, atol=1e-4, rtol=0)
    assert not torch.allclose(edited, bridge(ids), atol=1e-3)


def test_parallel_residual_has_no_resid_mid(tiny):
    model, tok = tiny("tiny-pythia")
    bridge = HookBridge(model, tok)
    assert "blocks.0.hook_resid_mid" not in bridge.hook_names
    with pytest.raises(UnknownHookError, match="parallel residual.*no hook_resid_mid"):
        bridge.run_with_cache(TEXT, ["blocks.0.hook_resid_mid"])
    assert "blocks.0.hook_resid_mid" in HookBridge(*tiny("tiny-mistral")).hook_names


@pytest.mark.parametrize("name", NEW)
def test_generation_with_a_hook_equals_stepwise_decoding(tiny, name):
    model, tok = tiny(name)
    bridge = HookBridge(model, tok)
    shift = 3 * torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    with bridge.hooks([("blocks.1.hook_resid_post", lambda x, n: x + shift)]):
        out = bridge.generate(PROMPTS, max_new_tokens=5, return_text=False)
    ids, mask = bridge.tokenize(PROMPTS)
    handle = blocks(model, name)[1].register_forward_hook(
        lambda m, a, o: (o[0] + shift, *o[1:]) if isinstance(o, tuple) else o + shift)
    try:
        for _ in range(5):
            nxt = run(model, ids, mask, use_cache=False)[:, -1].argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    finally:
        handle.remove()
    assert torch.equal(out, ids)


# ---------------------------------------------------------------- attention internals


@pytest.mark.parametrize("name", TINY_MODELS)
def test_patterns_equal_hf_eager_attention_and_keep_the_kernel(tiny, name, monkeypatch):
    """Patterns equal HF's eager attention weights on a left-padded batch; only traces that
    touch them run the bridge's attention, only in the layers they touch, and every layer's
    output is still sdpa's (the pattern is only read), so the logits are the model's own."""
    model, tok = tiny(name)
    bridge = HookBridge(model, tok)
    ids, mask = bridge.tokenize(PROMPTS)
    kernel = model.config._attn_implementation
    fast_layers, hooked_layers = [], []
    sdpa, visit = attention.sdpa_attention_forward, attention._visit
    monkeypatch.setattr(attention, "sdpa_attention_forward",
                        lambda module, *a, **k: fast_layers.append(module.layer_idx) or
                        sdpa(module, *a, **k))
    monkeypatch.setattr(attention, "_visit", lambda name, value: hooked_layers.append(
        int(name.split(".")[1])) or visit(name, value))
    logits, cache = bridge.run_with_cache(ids, ["blocks.2.attn.hook_pattern",
                                                "blocks.2.attn.hook_attn_scores"],
                                          attention_mask=mask)
    assert model.config._attn_implementation == kernel == "sdpa"
    assert set(hooked_layers) == {2}
    assert fast_layers == list(range(model.config.num_hidden_layers))
    assert torch.equal(logits, run(model, ids, mask))
    eager = copy.deepcopy(model)
    eager.config._attn_implementation = "eager"
    with torch.no_grad():
        weights = eager(input_ids=ids, attention_mask=mask, output_attentions=True,
                        position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).attentions[2]
    pattern, scores = cache["blocks.2.attn.hook_pattern"], cache["blocks.2.attn.hook_attn_scores"]
    real = mask.bool()[:, None, :, None] & mask.bool()[:, None, None, :]  # both tokens real
    torch.testing.assert_close(pattern[real.expand_as(pattern)],
                               weights.float()[real.expand_as(weights)], atol=1e-5, rtol=0)
    assert torch.isneginf(scores[~real.expand_as(scores) & (pattern == 0)]).all()
    rows = pattern.sum(-1)[mask.bool()[:, None, :].expand(-1, pattern.shape[1], -1)]
    torch.testing.assert_close(rows, torch.ones_like(rows))  # every real query attends somewhere


@pytest.mark.parametrize("name", NEW + ["tiny-gpt2"])
def test_pattern_edits_during_generation_equal_stepwise_decoding(tiny, name):
    """Under the KV cache each step's pattern spans the cached keys; zeroing a head's pattern
    while generating equals decoding step by step without a cache under the same edit."""
    model, tok = tiny(name)
    bridge = HookBridge(model, tok)
    shapes = []

    def zero_head(pattern, name):
        shapes.append(tuple(pattern.shape))
        pattern[:, 1] = 0

    hooks = [("blocks.1.attn.hook_pattern", zero_head)]
    with bridge.hooks(hooks):
        out = bridge.generate(PROMPTS, max_new_tokens=4, return_text=False)
    ids, mask = bridge.tokenize(PROMPTS)
    width = ids.shape[1]
    assert shapes[0][2:] == (width, width) and shapes[1][2:] == (1, width + 1)
    for _ in range(4):
        with bridge.hooks(hooks):
            nxt = bridge(ids, mask, use_cache=False)[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    assert torch.equal(out, ids)
    with bridge.hooks(hooks + [("blocks.2.hook_resid_post", lambda x, n: None)]):  # + nnsight
        assert torch.equal(bridge.generate(PROMPTS, max_new_tokens=4, return_text=False), out)
    assert model.config._attn_implementation == "sdpa"


def test_patterns_in_bf16_and_with_heads_removed(tiny):
    model, tok = tiny("tiny-llama")
    half = HookBridge(copy.deepcopy(model).to(torch.bfloat16), tok)
    logits, cache = half.run_with_cache(PROMPTS, ["blocks.0.attn.hook_pattern"])
    assert cache["blocks.0.attn.hook_pattern"].dtype == torch.float32  # scores read in fp32
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
    pruned = remove_heads(copy.deepcopy(model), {0: [1], 2: [0, 1]})  # layer 2 loses kv 0
    _, cache = HookBridge(pruned, tok).run_with_cache(
        PROMPTS, ["blocks.0.attn.hook_pattern", "blocks.2.attn.hook_pattern",
                  "blocks.2.attn.hook_rot_k"])
    assert cache["blocks.0.attn.hook_pattern"].shape[1] == 3
    assert cache["blocks.2.attn.hook_pattern"].shape[1] == 2
    assert cache["blocks.2.attn.hook_rot_k"].shape[2] == 1  # its one remaining kv head


# ---------------------------------------------------------------- layers


@pytest.mark.parametrize("name", NEW)
def test_skip_drop_and_prefix_reuse_equal_a_deleted_block(tiny, name):
    model, tok = tiny(name)
    bridge = HookBridge(model, tok)
    ids, mask = bridge.tokenize(PROMPTS)
    full, *removed = list(prefix_reused_logits(model, ids, mask, [0, 2]))
    torch.testing.assert_close(full[1], run(model, ids, mask))
    for layer, logits in removed:
        reference = copy.deepcopy(model)
        del blocks(reference, name)[layer]
        expected = run(reference, ids, mask, use_cache=False)
        with skip_layers(bridge, [layer]):
            torch.testing.assert_close(bridge(ids, mask), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
        dropped = drop_layers(copy.deepcopy(model), [layer])
        torch.testing.assert_close(run(dropped, ids, mask), expected, atol=1e-5, rtol=0)
        generated = dropped.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4,
                                     do_sample=False, pad_token_id=tok.pad_token_id)
        with skip_layers(bridge, [layer]):
            assert torch.equal(generated, bridge.generate(ids, max_new_tokens=4,
                                                          attention_mask=mask))


# ---------------------------------------------------------------- weights


@pytest.mark.parametrize("name", NEW)
def test_magnitude_and_wanda_prune_every_block_linear_and_restore(tiny, name, data_dir):
    model, tok = tiny(name)
    linears = prunable_linears(model)
    expected = {f"{BLOCKS[name]}.{i}.{rel}" for i in range(4) for rel in LINEARS[name]}
    assert set(linears) == expected
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = tok(TEXT, return_tensors="pt")["input_ids"]
    dense = run(model, ids)
    with magnitude_prune(model, 0.5) as report:
        for module in linears.values():  # exactly half per matrix, the smallest |w| first
            w = module.weight
            assert int((w == 0).sum()) == w.numel() // 2
            kept = before[[k for k, m in model.named_modules() if m is module][0] + ".weight"]
            assert kept.abs()[w == 0].max() <= kept.abs()[w != 0].min()
        assert report.sparsity == pytest.approx(0.5)
        assert not torch.allclose(run(model, ids), dense)
    norms = input_norms(model, tok, [TEXT])
    x = {}
    handle = linears[f"{BLOCKS[name]}.1.{OUT_PROJ[name]}"].register_forward_pre_hook(
        lambda m, a: x.setdefault("in", a[0]))
    run(model, ids)
    handle.remove()
    torch.testing.assert_close(norms[f"{BLOCKS[name]}.1.{OUT_PROJ[name]}"].float(),
                               x["in"][0].double().pow(2).sum(0).sqrt().float())
    with wanda_prune(model, norms, 0.25):
        for module in linears.values():  # 25 % of every output row
            zeros = (module.weight == 0).sum(1)
            assert torch.all(zeros == round(0.25 * module.weight.shape[1]))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


# ---------------------------------------------------------------- heads


def zeroing_heads(model, name, heads_by_layer):
    """The reference: zero those heads' slices of the output projection's input (plain hooks)."""
    d_head = model.config.hidden_size // model.config.num_attention_heads
    handles = []
    for layer, heads in heads_by_layer.items():
        def pre(module, args, heads=heads):
            x = args[0].clone()
            for h in heads:
                x[..., h * d_head:(h + 1) * d_head] = 0
            return (x,)
        proj = blocks(model, name)[layer].get_submodule(OUT_PROJ[name])
        handles.append(proj.register_forward_pre_hook(pre))
    return handles


@pytest.mark.parametrize("name", NEW)
def test_head_removal_equals_zeroing_and_reloads(tiny, name, tmp_path):
    model, tok = tiny(name)
    plan = {0: [1], 1: [0, 3], 3: [2]}
    ids, mask = HookBridge(model, tok).tokenize(PROMPTS)
    handles = zeroing_heads(model, name, plan)
    try:
        expected = run(model, ids, mask)
    finally:
        for h in handles:
            h.remove()
    pruned = remove_heads(copy.deepcopy(model), plan)
    assert [q for q, _ in head_counts(pruned)] == [3, 2, 4, 3]
    torch.testing.assert_close(run(pruned, ids, mask), expected, atol=1e-5, rtol=0)
    pruned.save_pretrained(tmp_path)
    reloaded = load_head_pruned(tmp_path)
    torch.testing.assert_close(run(reloaded, ids, mask), expected, atol=1e-5, rtol=0)
    _, cache = HookBridge(reloaded, tok).run_with_cache(ids, ["blocks.1.attn.hook_z"],
                                                        attention_mask=mask)
    assert cache["blocks.1.attn.hook_z"].shape[2] == 2


@pytest.mark.parametrize("name", NEW)
def test_routed_heads_equal_plain_pytorch_gating(tiny, name):
    model, tok = tiny(name)
    bridge = HookBridge(model, tok)
    router = RoutedHeads(bridge, n_shared=1, top_k=2, seed=3)
    with torch.no_grad():
        for r in router.routers.values():
            r.weight.normal_(0, 1.0)  # decisive routing
    ids, mask = bridge.tokenize(PROMPTS)
    with router.routing(bridge):
        routed = bridge(ids, mask)
    d_head = model.config.hidden_size // model.config.num_attention_heads
    gates, handles = {}, []
    for layer in router.layers:
        block = blocks(model, name)[layer]

        def read(module, args, kwargs, layer=layer):
            x = args[0] if args else kwargs["hidden_states"]
            gates[layer] = router.routers[str(layer)](x, router.top_k).gates

        def gate(module, args, layer=layer):
            x = args[0]
            g = gates[layer].repeat_interleave(d_head, dim=-1)
            return ((x.float() * g).to(x.dtype),)

        handles += [block.register_forward_pre_hook(read, with_kwargs=True),
                    block.get_submodule(OUT_PROJ[name]).register_forward_pre_hook(gate)]
    try:
        expected = run(model, ids, mask)
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(routed, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(routed, run(model, ids, mask), atol=1e-3)


# ---------------------------------------------------------------- directions


@pytest.mark.parametrize("name", NEW)
def test_project_everywhere_equals_transformer_lens_and_orthogonalize(tiny, name):
    model, tok = tiny(name)
    bridge, hooked = HookBridge(model, tok), tl_reference(model, tok)
    d = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    d = d / d.norm()
    ids = tok(TEXT, return_tensors="pt")["input_ids"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    residual = ("hook_resid_pre", "hook_resid_post") if name == "tiny-pythia" else (
        "hook_resid_pre", "hook_resid_mid", "hook_resid_post")
    assert residual_hooks(bridge) == residual
    everywhere = Edit.from_direction(d, "project", layers=range(4), where=residual,
                                     skip_first=False)
    with everywhere.apply(bridge):
        ablated = bridge(ids)
    names = [f"blocks.{i}.{h}" for i in range(4) for h in residual]
    with torch.no_grad():
        expected = hooked.run_with_hooks(ids, fwd_hooks=[
            (n, lambda x, hook: x - (x @ d)[..., None] * d) for n in names])
    torch.testing.assert_close(ablated, expected, atol=1e-4, rtol=0)
    with Edit.from_direction(d, "orthogonalize").apply(bridge):
        baked = bridge(ids)
    torch.testing.assert_close(baked, ablated, atol=1e-4, rtol=0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
