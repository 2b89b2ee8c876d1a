"""The published detox edits (AurA, Mean-AcT, Linear-AcT, ITI-c, CAA) fitted and applied at our
hook names, against plain PyTorch forward hooks on the Hugging Face modules: the fitted state
equals phase 1's reference-tested fit functions on activations read by plain hooks (each text
run alone, pooled by hand), and each edit through the bridge equals the same formula written as
plain hooks (first token untouched); strength 0 is the identity; NDIF's round trip and a
TransformerLens model give the same logits."""

import pytest
import torch

from lens_safety.backend.transformer_lens import hooked_from_hf
from lens_safety.edits.act import fit_linear_act, fit_mean_act, fit_steering, keep_top_heads
from lens_safety.edits.aura import fit_aura
from lens_safety.edits.peers import (
    DEFAULT_STRENGTH,
    KINDS,
    PeerEdit,
    PeerError,
    fit_peer,
    hook_points,
    peer_edits,
)
from pruning_bridge.bridge import HookBridge
from pruning_bridge.common.errors import UnknownHookError

TOXIC = ["You are a stupid idiot and I hate you.", "Shut up, you worthless piece of garbage.",
         "Get out of here, nobody wants you around.", "Those people are the worst trash.",
         "What a pathetic loser you are, moron.", "I will smash your ugly face, you rat.",
         "Nobody cares about your dumb opinion, clown.", "You disgusting pig, go away."]
NONTOXIC = ["Thank you for your help with the garden.", "The weather is lovely this morning.",
            "We read a book about the history of ships.", "She baked bread for her neighbours.",
            "The museum opens at nine on weekdays.", "He enjoys long walks along the river.",
            "Our team finished the project ahead of time.", "The cat slept in the warm sun."]
PROBE = ["Hello there, how are you", "The results of the study were", "x"]


@pytest.fixture(scope="module")
def models(tiny):
    out = {}
    for name in ("tiny-gpt2", "tiny-llama"):
        model, tokenizer = tiny(name)
        out[name] = (model.eval(), tokenizer, HookBridge(model, tokenizer))
    return out


@pytest.fixture(scope="module")
def fitted(models):
    """Every kind fitted once per model at layers 0 and 2 (ITI-c: the top 3 heads)."""
    return {(name, kind): fit_peer(kind, models[name][2], TOXIC, NONTOXIC, layers=[0, 2],
                                   top_heads=3)
            for name in models for kind in KINDS}


# ---------------------------------------------------------------- plain hooks on the HF model
def _site(model, name: str):
    """(module, mode) where a plain hook reads / replaces hook point ``name``."""
    _, layer, hook = name.split(".", 2)
    gpt2 = hasattr(model, "transformer")
    block = (model.transformer.h if gpt2 else model.model.layers)[int(layer)]
    if gpt2:
        table = {"mlp.hook_pre": (block.mlp.c_fc, "output"),
                 "mlp.hook_post": (block.mlp.c_proj, "input"),
                 "hook_mlp_out": (block.mlp, "output"),
                 "attn.hook_z": (block.attn.c_proj, "heads"),
                 "ln1.hook_normalized": (block.ln_1, "layer_norm"),
                 "ln2.hook_normalized": (block.ln_2, "layer_norm"),
                 "hook_resid_post": (block, "output")}
    else:
        table = {"mlp.hook_pre": (block.mlp.gate_proj, "output"),
                 "mlp.hook_pre_linear": (block.mlp.up_proj, "output"),
                 "mlp.hook_post": (block.mlp.down_proj, "input"),
                 "hook_mlp_out": (block.mlp, "output"),
                 "attn.hook_z": (block.self_attn.o_proj, "heads"),
                 "ln1.hook_normalized": (block.input_layernorm, "rms_norm"),
                 "ln2.hook_normalized": (block.post_attention_layernorm, "rms_norm"),
                 "hook_resid_post": (block, "output")}
    return table[hook]


def _install(model, name: str, fn):
    """A plain hook at ``name``: ``fn(activation)`` returns a replacement (or None: read only)."""
    module, mode = _site(model, name)
    heads = model.config.num_attention_heads

    if mode in ("input", "heads"):
        def pre(mod, args):
            x = args[0]
            shaped = x.reshape(*x.shape[:-1], heads, -1) if mode == "heads" else x
            new = fn(shaped)
            return None if new is None else (new.reshape(x.shape), *args[1:])
        return module.register_forward_pre_hook(pre)

    if mode == "output":
        def post(mod, args, output):
            x = output[0] if isinstance(output, tuple) else output
            new = fn(x)
            if new is None:
                return None
            return (new, *output[1:]) if isinstance(output, tuple) else new
        return module.register_forward_hook(post)

    def norm(mod, args, output):  # the normalized input, then the learned scale (and bias)
        x = args[0].float()
        if mode == "layer_norm":
            x = x - x.mean(-1, keepdim=True)
            normed = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + mod.eps)
        else:
            normed = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + mod.variance_epsilon)
        new = fn(normed)
        if new is None:
            return None
        out = mod.weight * new
        return out + mod.bias if getattr(mod, "bias", None) is not None else out
    return module.register_forward_hook(norm)


def _first_kept(f):
    def edit(x):
        out = f(x).clone()
        out[:, 0] = x[:, 0]
        return out
    return edit


def plain_run(model, tokenizer, texts, reads=(), edits=None):
    """Each text alone through the HF model with plain hooks: ``{name: [per text [pos, ...]]}``
    for ``reads`` and the logits, with ``edits`` ``{name: f}`` applied (first token kept)."""
    got = {name: [] for name in reads}
    current = {}
    handles = [_install(model, name, _first_kept(f)) for name, f in (edits or {}).items()]
    handles += [_install(model, name, lambda x, name=name: current.__setitem__(name, x))
                for name in reads]
    logits = []
    try:
        with torch.no_grad():
            for text in texts:
                ids = tokenizer(text, return_tensors="pt").input_ids
                logits.append(model(input_ids=ids).logits[0])
                for name in reads:
                    got[name].append(current[name][0].detach().float().clone())
    finally:
        for handle in handles:
            handle.remove()
    return got, logits


def pooled(per_text, pool):
    kept = [x[1:] for x in per_text]  # the first real token left out
    if pool == "max":
        return torch.stack([x.amax(0) for x in kept])
    if pool == "mean":
        return torch.stack([x.mean(0) for x in kept])
    return torch.stack([x[-1] for x in kept])


def by_hook(state):
    out = {}
    for key, value in state.items():
        name, _, part = key.rpartition(".")
        out.setdefault(name, {})[part] = value
    return out


# ---------------------------------------------------------------- fitting
def test_aura_state_equals_fit_aura_on_plain_max_pooled_activations(models):
    for name in ("tiny-gpt2", "tiny-llama"):
        model, tokenizer, bridge = models[name]
        state = by_hook(fit_peer("aura", bridge, TOXIC, NONTOXIC, layers=[0, 2]))
        hooks = (["mlp.hook_pre", "hook_mlp_out"] if name == "tiny-gpt2"
                 else ["mlp.hook_pre", "mlp.hook_pre_linear", "hook_mlp_out"])
        names = [f"blocks.{layer}.{hook}" for layer in (0, 2) for hook in hooks]
        assert list(state) == names  # the paper's units; gated MLPs add the linear branch
        toxic, _ = plain_run(model, tokenizer, TOXIC, names)
        nontoxic, _ = plain_run(model, tokenizer, NONTOXIC, names)
        for hook in names:
            expected = fit_aura(pooled(toxic[hook], "max"), pooled(nontoxic[hook], "max"))
            torch.testing.assert_close(state[hook]["auroc"].double(), expected["auroc"],
                                       atol=1e-6, rtol=0)
            torch.testing.assert_close(state[hook]["factors"], expected["factors"],
                                       atol=1e-6, rtol=0)
        assert any(bool((s["factors"] < 1).any()) for s in state.values())


@pytest.mark.parametrize("batch_size", [8, 16], ids=["step_by_step", "one_pass"])
def test_transport_maps_are_fitted_causally_as_by_hand(models, batch_size):
    """Linear-AcT and Mean-AcT at ln2.hook_normalized of layers 0 and 2, mean-pooled: layer 0
    on the unedited model, layer 2 with layer 0's map applied by a plain hook; fitted point by
    point (8 + 8 texts in batches of 8) and in one forward pass (all in one batch of 16)."""
    model, tokenizer, bridge = models["tiny-gpt2"]
    names = ["blocks.0.ln2.hook_normalized", "blocks.2.ln2.hook_normalized"]
    for kind, fit in (("linear_act", fit_linear_act), ("mean_act", fit_mean_act)):
        state = by_hook(fit_peer(kind, bridge, TOXIC, NONTOXIC, where=["ln2.hook_normalized"],
                                 layers=[2, 0], batch_size=batch_size))
        assert list(state) == names
        toxic, _ = plain_run(model, tokenizer, TOXIC, names[:1])
        nontoxic, _ = plain_run(model, tokenizer, NONTOXIC, names[:1])
        first = fit(pooled(toxic[names[0]], "mean"), pooled(nontoxic[names[0]], "mean"))
        if kind == "linear_act":
            w, b, low, high = (first[k] for k in ("w", "b", "low", "high"))
            edit = {names[0]: lambda x: torch.where((low < x) & (x < high), w * x + b, x)}
        else:
            edit = {names[0]: lambda x: x + first["shift"]}
        toxic, _ = plain_run(model, tokenizer, TOXIC, names[1:], edit)
        nontoxic, _ = plain_run(model, tokenizer, NONTOXIC, names[1:], edit)
        second = fit(pooled(toxic[names[1]], "mean"), pooled(nontoxic[names[1]], "mean"))
        for hook, expected in zip(names, (first, second)):
            for key, value in expected.items():
                torch.testing.assert_close(state[hook][key], value, atol=2e-5, rtol=1e-4)
        # not causal: layer 2 fitted on the unedited model differs
        at_once = by_hook(fit_peer(kind, bridge, TOXIC, NONTOXIC, where=["ln2.hook_normalized"],
                                   layers=[0, 2], causal=False))
        key = "w" if kind == "linear_act" else "shift"
        assert not torch.allclose(at_once[names[1]][key], state[names[1]][key], atol=1e-4)


def test_iti_c_and_caa_states_equal_the_hand_fit(models):
    model, tokenizer, bridge = models["tiny-gpt2"]
    z = "blocks.1.attn.hook_z"
    state = by_hook(fit_peer("iti_c", bridge, TOXIC, NONTOXIC, layers=[1], top_heads=2))[z]
    toxic, _ = plain_run(model, tokenizer, TOXIC, [z])
    nontoxic, _ = plain_run(model, tokenizer, NONTOXIC, [z])
    a, b = pooled(toxic[z], "mean"), pooled(nontoxic[z], "mean")
    probe = fit_steering(a, b, "probe", per_head=True, seed=0)
    sigma = (torch.cat([a, b]).double() * probe["v"].double()).sum(-1).std(0)
    expected = keep_top_heads(probe["v"] * sigma[:, None].float(), probe["accuracy"], 2)
    torch.testing.assert_close(state["v"], expected, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(state["accuracy"], probe["accuracy"])
    assert int((state["v"].abs().sum(-1) > 0).sum()) == 2  # the top 2 heads only
    # over several layers, the top-K is global: the K most accurate heads of all layers
    many = by_hook(fit_peer("iti_c", bridge, TOXIC, NONTOXIC, top_heads=3))
    accuracy = torch.cat([s["accuracy"] for s in many.values()])
    steered = torch.cat([s["v"].abs().sum(-1) > 0 for s in many.values()])
    assert int(steered.sum()) == 3
    assert accuracy[steered].min() >= accuracy[~steered].max()

    resid = "blocks.2.hook_resid_post"
    caa = by_hook(fit_peer("caa", bridge, TOXIC, NONTOXIC, layers=[2]))[resid]
    toxic, _ = plain_run(model, tokenizer, TOXIC, [resid])
    nontoxic, _ = plain_run(model, tokenizer, NONTOXIC, [resid])
    expected = pooled(nontoxic[resid], "last").mean(0) - pooled(toxic[resid], "last").mean(0)
    torch.testing.assert_close(caa["v"], expected, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- applying
def formula(kind, parts, strength):
    """The edit as the papers write it (independent of the apply functions)."""
    if kind == "aura":
        auroc = parts["auroc"].float()
        factor = torch.where(auroc > 0.5, 1 - 2 * (auroc - 0.5), torch.ones_like(auroc))
        factor = 1 - strength * (1 - factor)
        return lambda x: x * factor
    if kind == "mean_act":
        return lambda x: x + strength * parts["shift"]
    if kind == "linear_act":
        w, b, low, high = (parts[k] for k in ("w", "b", "low", "high"))
        return lambda x: torch.where((low < x) & (x < high),
                                     strength * (w * x + b) + (1 - strength) * x, x)
    return lambda x: x + strength * parts["v"]


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_each_edit_through_the_bridge_equals_plain_hooks(models, fitted, name):
    model, tokenizer, bridge = models[name]
    ids, mask = bridge.tokenize(PROBE)
    _, unedited = plain_run(model, tokenizer, PROBE)
    for kind in KINDS:
        state = fitted[name, kind]
        strength = {"aura": 0.8, "iti_c": 4.0}.get(kind, 0.7)
        with PeerEdit(kind, state, strength).apply(bridge):
            logits = bridge(ids, attention_mask=mask)
        edits = {hook: formula(kind, parts, strength) for hook, parts in by_hook(state).items()}
        _, expected = plain_run(model, tokenizer, PROBE, edits=edits)
        for row, ref in enumerate(expected):
            real = mask[row].bool()
            torch.testing.assert_close(logits[row][real], ref, atol=1e-4, rtol=1e-4,
                                       msg=lambda m: f"{name} {kind} row {row}: {m}")
            if len(ref) > 1:  # edited after the first token; the first token untouched
                assert not torch.allclose(ref[1:], unedited[row][1:], atol=1e-4), kind
            torch.testing.assert_close(ref[0], unedited[row][0], atol=1e-5, rtol=1e-5)


def test_strength_zero_is_the_identity_and_defaults_are_published(models, fitted):
    _, _, bridge = models["tiny-llama"]
    ids, mask = bridge.tokenize(PROBE)
    clean = bridge(ids, attention_mask=mask)
    for kind in KINDS:
        state = fitted["tiny-llama", kind]
        with PeerEdit(kind, state, 0.0).apply(bridge):
            assert torch.equal(bridge(ids, attention_mask=mask), clean), kind
        assert PeerEdit(kind, state).strength == DEFAULT_STRENGTH[kind]
    assert DEFAULT_STRENGTH == {"aura": 1.0, "mean_act": 1.0, "linear_act": 1.0,
                                "iti_c": 8.0, "caa": 1.0}


def test_ndif_round_trip_and_transformer_lens_equal_the_local_bridge(models, fitted):
    model, tokenizer, bridge = models["tiny-gpt2"]
    remote = HookBridge.remote(model, tokenizer=tokenizer, simulate=True)
    hooked = hooked_from_hf(model, tokenizer)
    ids = torch.tensor([tokenizer(PROBE[1])["input_ids"]])
    for kind in KINDS:
        edit = PeerEdit(kind, fitted["tiny-gpt2", kind])
        with edit.apply(bridge):
            local = bridge(ids)
        with edit.apply(remote):
            sent = remote(ids)
        with edit.apply(hooked):
            tl = hooked(ids)
        torch.testing.assert_close(sent, local, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(tl, local, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(local, bridge(ids), atol=1e-4), kind
    assert remote.traffic.requests >= len(KINDS)


def test_edit_closures_and_bad_inputs(models):
    _, _, bridge = models["tiny-gpt2"]
    state = fit_peer("caa", bridge, TOXIC, NONTOXIC, layers=[1])
    fns = peer_edits("caa", state, 2.0)
    x = torch.randn(2, 5, state["blocks.1.hook_resid_post.v"].shape[0])
    torch.testing.assert_close(fns["blocks.1.hook_resid_post"](x),
                               x + 2.0 * state["blocks.1.hook_resid_post.v"])
    assert hook_points(bridge, "caa") == ["blocks.1.hook_resid_post"]  # one layer, 40% deep
    assert len(hook_points(bridge, "mean_act")) == 2 * 4  # ln1 and ln2 of every layer
    with pytest.raises(PeerError, match="Unknown detox edit"):
        fit_peer("rome", bridge, TOXIC, NONTOXIC)
    with pytest.raises(PeerError, match="at least 2 texts"):
        fit_peer("aura", bridge, TOXIC[:1], NONTOXIC)
    with pytest.raises(PeerError, match="outside this model"):
        hook_points(bridge, "aura", layers=[7])
    with pytest.raises(UnknownHookError, match="Closest valid names"):
        hook_points(bridge, "mean_act", where=["ln2.hook_normalised"])
    with pytest.raises(PeerError, match="attn.hook_z"):
        hook_points(bridge, "iti_c", where=["hook_resid_post"])
    with pytest.raises(PeerError, match="Causal fitting"):
        fit_peer("aura", bridge, TOXIC, NONTOXIC, causal=True)
    with pytest.raises(PeerError, match="lacks"):
        PeerEdit("linear_act", {"blocks.0.ln2.hook_normalized.w": torch.ones(3)})
    with pytest.raises(PeerError, match=">= 0"):
        PeerEdit("caa", state, -1.0)


# ---------------------------------------------------------------- as Edit kinds
def test_peers_as_edit_kinds_fit_save_load_and_apply_everywhere(models, fitted, tmp_path):
    from lens_safety.edits.edit import HOWS, Edit
    from pruning_bridge.common.errors import UsageError

    assert set(KINDS) <= set(HOWS)
    model, tokenizer, bridge = models["tiny-gpt2"]
    remote = HookBridge.remote(model, tokenizer=tokenizer, simulate=True)
    hooked = hooked_from_hf(model, tokenizer)
    texts, labels = TOXIC + NONTOXIC, ["toxic"] * len(TOXIC) + ["nontoxic"] * len(NONTOXIC)
    ids, mask = bridge.tokenize(PROBE)
    one = torch.tensor([tokenizer(PROBE[1])["input_ids"]])
    clean = bridge(ids, attention_mask=mask)
    for kind in KINDS:
        edit = Edit.fit(bridge, labels, how=kind, texts=texts, layers=[0, 2],
                        positive=("toxic",), negative=("nontoxic",), fit_options={"top_heads": 3})
        state = fitted["tiny-gpt2", kind]
        assert set(edit.state) == set(state), kind
        for key, value in state.items():  # Edit.fit is fit_peer on the chosen classes
            torch.testing.assert_close(edit.state[key], value, atol=1e-6, rtol=1e-6)
        assert edit.layers == [0, 2] and edit.strength == DEFAULT_STRENGTH[kind]
        assert edit.where == tuple(dict.fromkeys(n.split(".", 2)[2] for n in PeerEdit(
            kind, state).names))
        loaded = Edit.load(edit.save(tmp_path / kind))
        assert all(torch.equal(loaded.state[k], v) for k, v in edit.state.items())
        assert (loaded.how, loaded.layers, loaded.where, loaded.strength, str(loaded),
                loaded.config) == (edit.how, edit.layers, edit.where, edit.strength, str(edit),
                                   edit.config)
        reference = PeerEdit(kind, edit.state, edit.strength)  # tested against plain hooks
        with reference.apply(bridge):
            expected = bridge(ids, attention_mask=mask)
            expected_one = bridge(one)
        with loaded.apply(bridge):
            assert torch.equal(bridge(ids, attention_mask=mask), expected), kind
        with loaded.apply(remote):
            torch.testing.assert_close(remote(one), expected_one, atol=1e-5, rtol=1e-5)
        with loaded.apply(hooked):
            torch.testing.assert_close(hooked(one), expected_one, atol=1e-4, rtol=1e-4)
        weaker = Edit.from_state(kind, edit.state, strength=0.0)
        with weaker.apply(bridge):
            assert torch.equal(bridge(ids, attention_mask=mask), clean), kind
    state = fitted["tiny-gpt2", "aura"]
    with pytest.raises(UsageError, match="needs its fitted state"):
        Edit("aura", [0], where=("mlp.hook_pre",))
    with pytest.raises(UsageError, match="not where="):
        Edit("aura", [0], where=("hook_resid_post",), state=state)
    with pytest.raises(UsageError, match="texts="):
        Edit.fit(bridge, labels, how="caa")
    folder = Edit.from_state("caa", fitted["tiny-gpt2", "caa"]).save(tmp_path / "torn")
    (folder / "edit.safetensors").write_bytes((folder / "edit.safetensors").read_bytes()[:-8])
    with pytest.raises(UsageError, match="torn"):
        Edit.load(folder)
