"""The hook points TransformerLens computes only on request (``hook_attn_in``, ``hook_q_input``,
``hook_k_input``, ``hook_v_input``, ``attn.hook_result``, ``hook_mlp_in``) and the unembedding's
(``unembed.hook_in`` / ``hook_out``): equal to TransformerLens's values and edits
(tl_reference.with_flags), to plain PyTorch on the HF modules (paths written out here by hand),
and free for the traces that do not ask for them."""

import copy

import pytest
import torch

from pruning_bridge.bridge import HookBridge
from pruning_bridge.heads import remove_heads
from pruning_bridge.random_models import TINY_MODELS
from tl_reference import TL4, with_flags

TEXT = "The quick brown fox jumps over the lazy dog"
PROMPTS = [TEXT, "Hello there"]
SPLIT = ("hook_q_input", "hook_k_input", "hook_v_input")
FLAG_NAMES = {"use_attn_result": ("attn.hook_result",), "use_split_qkv_input": SPLIT,
              "use_hook_mlp_in": ("hook_mlp_in",), "use_attn_in": ("hook_attn_in",)}
UNEMBED = ("unembed.hook_in", "unembed.hook_out")
# written out by hand: blocks, pre-attention norm, q/k/v projection(s) and their layout, output
# projection, pre-MLP norm, LM head
LLAMA = ("model.layers", "input_layernorm", ("self_attn.q_proj", "self_attn.k_proj",
                                             "self_attn.v_proj"), "separate", "self_attn.o_proj",
         "post_attention_layernorm")
PATHS = {"tiny-llama": LLAMA, "tiny-qwen3": LLAMA, "tiny-mistral": LLAMA,
         "tiny-gpt2": ("transformer.h", "ln_1", ("attn.c_attn",), "stacked", "attn.c_proj",
                       "ln_2"),
         "tiny-pythia": ("gpt_neox.layers", "input_layernorm", ("attention.query_key_value",),
                         "per_head", "attention.dense", "post_attention_layernorm")}


def hf_run(model, ids, mask=None):
    mask = torch.ones_like(ids) if mask is None else mask
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask,
                     position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits


def vector(size: int, seed: int) -> torch.Tensor:
    return torch.randn(size, generator=torch.Generator().manual_seed(seed))


def add_to_first(x, hook):
    """Not affine per copy (a norm would undo a scale): add a fixed vector to head 0 (or to
    every position of a ``[batch, pos, d]`` tensor)."""
    x = x.clone()
    if x.ndim == 4:
        x[:, :, 0] += vector(x.shape[-1], 1)
    else:
        x += vector(x.shape[-1], 1)
    return x


@pytest.fixture(scope="module")
def bridges(tiny):
    made = {}

    def get(name):
        if name not in made:
            made[name] = HookBridge(*tiny(name))
        return made[name]

    return get


# ---------------------------------------------------------------- against TransformerLens


@pytest.mark.parametrize("flags", [("use_attn_result", "use_split_qkv_input", "use_hook_mlp_in"),
                                   ("use_attn_in",)], ids=["result-split-mlp_in", "attn_in"])
@pytest.mark.parametrize("name", TINY_MODELS)
def test_values_and_edits_equal_transformer_lens(tiny, bridges, name, flags):
    """Every layer's value, and an edit in layer 1 (or of the unembedding), give TransformerLens's
    activations and logits (3.9: HookedTransformer; 4.x: TransformerBridge)."""
    model, tok = tiny(name)
    gqa = getattr(model.config, "num_key_value_heads", None) not in (None,
                                                                     model.config.num_attention_heads)
    if flags == ("use_attn_in",) and gqa and not TL4:
        pytest.skip("TransformerLens 3.9 refuses use_attn_in with grouped-query attention")
    bridge, tl = bridges(name), with_flags(model, tok, flags)
    ids = tok(TEXT, return_tensors="pt")["input_ids"]
    short = [n for flag in flags for n in FLAG_NAMES[flag]]
    names = [f"blocks.{layer}.{n}" for layer in range(4) for n in short] + list(UNEMBED)
    with torch.no_grad():
        _, tl_cache = tl.run_with_cache(ids)
    logits, cache = bridge.run_with_cache(ids, names)
    for hook in names:
        torch.testing.assert_close(cache[hook], tl_cache[hook], atol=1e-5, rtol=0, msg=hook)
    for hook in [f"blocks.1.{n}" for n in short] + list(UNEMBED):
        with torch.no_grad():
            expected = tl.run_with_hooks(ids, fwd_hooks=[(hook, add_to_first)])
        edited = bridge.run_with_hooks(ids, fwd_hooks=[(hook, add_to_first)])
        torch.testing.assert_close(edited, expected, atol=1e-4, rtol=0, msg=hook)
        assert (edited - logits).abs().max() > 1e-3, hook


# ---------------------------------------------------------------- against plain PyTorch


def _project(module, x):
    """An HF projection's output for ``x`` (Conv1D stores its weight [in, out])."""
    if type(module).__name__ == "Conv1D":
        return x @ module.weight + module.bias
    return torch.nn.functional.linear(x, module.weight, module.bias)


def per_head_reference(model, name, layer, edits, ids):
    """Logits when q/k/v head ``head`` of ``part`` reads ``ln1(resid_pre + delta)``, for each
    ``(part, head, delta)`` in ``edits``: hooks on the HF modules."""
    blocks, ln1, qkv, layout, _, _ = PATHS[name]
    block = model.get_submodule(blocks)[layer]
    d_head = model.config.hidden_size // model.config.num_attention_heads
    stash, handles = {}, []

    def read(module, args, kwargs):
        stash["x"] = args[0] if args else kwargs["hidden_states"]

    def columns(part, head):
        if layout == "separate":
            return slice(head * d_head, (head + 1) * d_head)
        if layout == "stacked":  # [q | k | v]
            start = part * model.config.hidden_size + head * d_head
        else:  # [head, (q, k, v), d_head]
            start = head * 3 * d_head + part * d_head
        return slice(start, start + d_head)

    def replace(module, args, out, path):
        out = out.clone()
        for part, head, delta in edits:
            if path == qkv[part if layout == "separate" else 0]:
                full = _project(module, block.get_submodule(ln1)(stash["x"] + delta))
                cols = columns(part, head)
                out[..., cols] = full[..., cols]
        return out

    handles.append(block.register_forward_pre_hook(read, with_kwargs=True))
    for path in qkv:
        handles.append(block.get_submodule(path).register_forward_hook(
            lambda m, a, o, path=path: replace(m, a, o, path)))
    try:
        return hf_run(model, ids)
    finally:
        for handle in handles:
            handle.remove()


def module_hooks_reference(model, hooks, ids):
    """Logits with ``[(module, kind, fn)]`` registered (``kind``: "pre" or "post")."""
    handles = [m.register_forward_pre_hook(fn) if kind == "pre" else m.register_forward_hook(fn)
               for m, kind, fn in hooks]
    try:
        return hf_run(model, ids)
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("name", TINY_MODELS)
def test_edits_equal_plain_pytorch(tiny, bridges, name):
    """Each new name's edit acts on the HF modules as TransformerLens defines it: per-head copies
    taken before ln1 (key/value head g reads hook_attn_in's copy g), head results summed with the
    output bias, the MLP's input only, the LM head's input and output."""
    model, tok = tiny(name)
    bridge = bridges(name)
    blocks, _, _, _, out_proj, ln2 = PATHS[name]
    block = model.get_submodule(blocks)[1]
    ids = tok(TEXT, return_tensors="pt")["input_ids"]
    d = vector(model.config.hidden_size, 2)
    n_kv = getattr(model.config, "num_key_value_heads", None) or model.config.num_attention_heads
    d_head = model.config.hidden_size // model.config.num_attention_heads

    def head(index, delta=d):
        def fn(x, hook):
            x = x.clone()
            x[:, :, index] += delta
            return x
        return fn

    clean = hf_run(model, ids)
    cases = {  # the bridge's edit -> the plain-PyTorch reference
        "hook_q_input": (head(1), lambda: per_head_reference(model, name, 1, [(0, 1, d)], ids)),
        "hook_k_input": (head(n_kv - 1), lambda: per_head_reference(
            model, name, 1, [(1, n_kv - 1, d)], ids)),
        "hook_v_input": (head(0), lambda: per_head_reference(model, name, 1, [(2, 0, d)], ids)),
        "hook_attn_in": (head(0), lambda: per_head_reference(
            model, name, 1, [(0, 0, d), (1, 0, d), (2, 0, d)], ids)),
    }
    for short, (fn, reference) in cases.items():
        with bridge.hooks([(f"blocks.1.{short}", fn)]):
            edited = bridge(ids)
        torch.testing.assert_close(edited, reference(), atol=1e-5, rtol=0, msg=short)
        assert (edited - clean).abs().max() > 1e-4, short

    def result_edit(x, hook):  # zero head 2, add d to head 0
        x = x.clone()
        x[:, :, 2] = 0
        x[:, :, 0] += d
        return x

    def zero_z(module, args):
        z = args[0].clone()
        z[..., 2 * d_head:3 * d_head] = 0
        return (z,)

    references = {
        "blocks.1.attn.hook_result": (result_edit, [
            (block.get_submodule(out_proj), "pre", zero_z),
            (block.get_submodule(out_proj), "post", lambda m, a, o: o + d)]),
        "blocks.1.hook_mlp_in": (add_to_first, [
            (block.get_submodule(ln2), "pre", lambda m, a: (a[0] + vector(d.shape[0], 1),))]),
        "unembed.hook_in": (add_to_first, [
            (model.lm_head, "pre", lambda m, a: (a[0] + vector(d.shape[0], 1),))]),
        "unembed.hook_out": (add_to_first, [
            (model.lm_head, "post", lambda m, a, o: o + vector(o.shape[-1], 1))]),
    }
    for hook, (fn, module_hooks) in references.items():
        with bridge.hooks([(hook, fn)]):
            edited = bridge(ids)
        torch.testing.assert_close(edited, module_hooks_reference(model, module_hooks, ids),
                                   atol=1e-5, rtol=0, msg=hook)
        assert (edited - clean).abs().max() > 1e-4, hook


# ---------------------------------------------------------------- cost, flags, generation


@pytest.mark.parametrize("name", TINY_MODELS)
def test_reading_them_keeps_the_model_exact(tiny, bridges, name):
    """Caching every new name leaves the logits bit-equal to the HF model's own run (sdpa), and
    the values fit together: head results sum to hook_attn_out, the copies are resid_pre's,
    hook_mlp_in is the MLP branch's input, the unembedding's are ln_final's output and the
    logits."""
    model, bridge = tiny(name)[0], bridges(name)
    ids, mask = bridge.tokenize(PROMPTS)
    short = ("hook_resid_pre", "hook_attn_in", *SPLIT, "attn.hook_result", "hook_attn_out",
             "hook_mlp_in", "hook_resid_mid")
    names = [f"blocks.{layer}.{n}" for layer in range(4) for n in short
             if n != "hook_resid_mid" or not bridge.adapter.parallel]
    logits, cache = bridge.run_with_cache(ids, names + list(UNEMBED) + ["ln_final.hook_normalized"],
                                          attention_mask=mask)
    assert torch.equal(logits, hf_run(model, ids, mask))
    n_kv = getattr(model.config, "num_key_value_heads", None) or model.config.num_attention_heads
    out_proj = PATHS[name][4]
    for layer in range(4):
        def get(short_name, layer=layer):
            return cache[f"blocks.{layer}.{short_name}"]

        copies = get("hook_resid_pre")[:, :, None].expand(-1, -1, 4, -1)
        for hook, heads in (("hook_attn_in", 4), ("hook_q_input", 4), ("hook_k_input", n_kv),
                            ("hook_v_input", n_kv)):
            assert torch.equal(get(hook), copies[:, :, :heads]), hook
        bias = model.get_submodule(PATHS[name][0])[layer].get_submodule(out_proj).bias
        summed = get("attn.hook_result").sum(2) + (0 if bias is None else bias)
        torch.testing.assert_close(summed, get("hook_attn_out"), atol=1e-5, rtol=0)
        mlp_input = get("hook_resid_pre" if bridge.adapter.parallel else "hook_resid_mid")
        assert torch.equal(get("hook_mlp_in"), mlp_input)
    norm = bridge.ln_final
    expected_in = cache["ln_final.hook_normalized"] * norm.weight + (
        norm.bias if getattr(norm, "bias", None) is not None else 0)
    torch.testing.assert_close(cache["unembed.hook_in"], expected_in)
    assert torch.equal(cache["unembed.hook_out"], logits)


def test_flags_add_them_to_the_full_cache(tiny):
    """As TransformerLens's flags: off by default (a full cache leaves them out), on with
    set_use_*; named explicitly they are computed whatever the flags."""
    bridge = HookBridge(*tiny("tiny-gpt2"))
    gated = {f"blocks.{layer}.{n}" for layer in range(4) for names in FLAG_NAMES.values()
             for n in names}
    assert not gated & set(bridge.hook_names) and set(UNEMBED) <= set(bridge.hook_names)
    _, full = bridge.run_with_cache("Hello there")
    assert not gated & set(full) and set(UNEMBED) <= set(full)
    _, named = bridge.run_with_cache("Hello there", names_filter="blocks.2.hook_q_input")
    assert list(named) == ["blocks.2.hook_q_input"]
    bridge.set_use_attn_result(True)
    bridge.set_use_split_qkv_input(True)
    results = {f"blocks.{layer}.attn.hook_result" for layer in range(4)}
    _, full = bridge.run_with_cache("Hello there")
    assert gated & set(full) == results | {f"blocks.{layer}.{n}" for layer in range(4)
                                           for n in SPLIT}
    assert set(bridge.resolve(lambda n: n.endswith("hook_result"))) == results
    assert bridge.cfg.use_attn_result and not bridge.cfg.use_hook_mlp_in
    bridge.set_use_attn_result(False)
    assert not results & set(bridge.hook_names)
    with pytest.raises(KeyError, match="blocks.0.hook_mlp_in"):
        bridge.resolve(["blocks.0.hook_mlp_inn"])


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_edits_during_generation_equal_stepwise_decoding(bridges, name):
    """Under the KV cache an edited key input and an edited head result act at every step as
    they do when each step is run without the cache."""
    bridge = bridges(name)
    def steer(x, hook):  # zero head 1's output, push head 0's
        x = x.clone()
        x[:, :, 1] = 0
        x[:, :, 0] += 5 * vector(x.shape[-1], 3)
        return x

    hooks = [("blocks.1.hook_k_input", add_to_first), ("blocks.2.attn.hook_result", steer)]
    with bridge.hooks(hooks):
        out = bridge.generate(PROMPTS, max_new_tokens=4, return_text=False)
    ids, mask = bridge.tokenize(PROMPTS)
    for _ in range(4):
        with bridge.hooks(hooks):
            nxt = bridge(ids, mask, use_cache=False)[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    assert torch.equal(out, ids)
    assert not torch.equal(out, bridge.generate(PROMPTS, max_new_tokens=4, return_text=False))


def test_pruned_heads_and_half_precision(tiny):
    """Per-layer head counts come from the weights (a model with heads removed), and edits keep
    a bf16 model's dtype."""
    model, tok = tiny("tiny-llama")
    pruned = remove_heads(copy.deepcopy(model), {2: [0, 1]})  # layer 2: 2 query, 1 kv head
    bridge = HookBridge(pruned, tok)
    names = ["blocks.2.attn.hook_result", "blocks.2.hook_q_input", "blocks.2.hook_k_input",
             "blocks.2.hook_attn_out"]
    _, cache = bridge.run_with_cache(TEXT, names)
    assert cache["blocks.2.attn.hook_result"].shape[2] == cache["blocks.2.hook_q_input"].shape[2] == 2
    assert cache["blocks.2.hook_k_input"].shape[2] == 1
    torch.testing.assert_close(cache["blocks.2.attn.hook_result"].sum(2),
                               cache["blocks.2.hook_attn_out"], atol=1e-5, rtol=0)
    with bridge.hooks([("blocks.2.hook_q_input", add_to_first)]):
        assert not torch.allclose(bridge(TEXT), bridge.model(**tok(TEXT, return_tensors="pt")).logits)
    half = HookBridge(copy.deepcopy(model).to(torch.bfloat16), tok)
    with half.hooks([("blocks.1.hook_v_input", add_to_first),
                     ("blocks.1.attn.hook_result", add_to_first),
                     ("blocks.1.hook_mlp_in", add_to_first)]):
        logits = half(PROMPTS)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_a_simulated_server_runs_them(tiny, bridges):
    """Their functions travel to a server by value: a simulated NDIF round trip caches and
    edits them as the local bridge does."""
    model, tok = tiny("tiny-qwen3")
    local, remote = bridges("tiny-qwen3"), HookBridge.remote(model, tokenizer=tok, simulate=True)
    names = ["blocks.1.hook_q_input", "blocks.1.attn.hook_result", "blocks.1.hook_mlp_in",
             "unembed.hook_in"]
    logits, cache = remote.run_with_cache(TEXT, names)
    local_logits, local_cache = local.run_with_cache(TEXT, names)
    assert torch.equal(logits, local_logits)
    for name in names:
        assert torch.equal(cache[name], local_cache[name]), name

    def shift(x, hook):  # sent as source: torch only
        return x + 0.5

    hooks = [("blocks.1.hook_k_input", shift), ("blocks.2.attn.hook_result", shift)]
    with remote.hooks(hooks):
        edited = remote(TEXT)
    with local.hooks(hooks):
        torch.testing.assert_close(edited, local(TEXT))
    assert remote.traffic.requests == 2
