"""Where an Edit acts (``where``: block-relative hook names) and the weight edit
(``orthogonalize``), against plain PyTorch hooks on the Hugging Face model and TransformerLens."""

import hashlib
import json

import pytest
import torch

from lens_safety.backend import block_hooks, residual_hooks
from lens_safety.backend.transformer_lens import generate, hooked_from_hf
from lens_safety.edits.edit import RESIDUAL, Edit
from pruning_bridge.bridge import HookBridge
from pruning_bridge.common import UsageError

TEXTS = ["The weather today is mild and pleasant.", "Hi",
         "People from that town are all the same, I tell you, every single one of them."]


@pytest.fixture(scope="module")
def backends(tiny):
    """``name -> (hf_model, tokenizer, bridge, hooked)``, built once per tiny model."""
    built = {}

    def get(name):
        if name not in built:
            model, tok = tiny(name)
            built[name] = (model, tok, HookBridge(model, tok), hooked_from_hf(model, tok))
        return built[name]

    return get


def _direction(d_model: int, seed: int = 1) -> torch.Tensor:
    d = torch.randn(d_model, generator=torch.Generator().manual_seed(seed))
    return d / d.norm()


def _state_hash(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _everywhere(d, how="project", **kw) -> Edit:
    """``how`` at every residual hook of every layer of a 4-layer model, first token included."""
    return Edit.from_direction(d, how, layers=range(4), where=RESIDUAL, skip_first=False, **kw)


# ---------------------------------------------------------------- where


def test_where_names_are_normalised_and_checked():
    d = _direction(64)
    edit = Edit.from_direction(d, "project", layers=[1], where=("resid_pre", "hook_resid_post"))
    assert edit.where == ("hook_resid_pre", "hook_resid_post")
    assert Edit.from_direction(d, "project", layers=[1]).where == ("hook_resid_post",)
    assert Edit.from_direction(d, "project", layers=[1], where="resid_mid").where == (
        "hook_resid_mid",)
    with pytest.raises(UsageError, match="inside a block"):
        Edit.from_direction(d, "project", layers=[1], where=("blocks.1.hook_resid_post",))
    with pytest.raises(UsageError, match="edits nothing"):
        Edit.from_direction(d, "project", layers=[1], where=())


@pytest.mark.parametrize("backend", ["bridge", "hooked"])
def test_an_unknown_hook_names_the_closest_valid_ones(backends, backend):
    _, _, bridge, hooked = backends("tiny-llama")
    model = bridge if backend == "bridge" else hooked
    assert {"hook_resid_post", "ln2.hook_normalized", "hook_mlp_out", "mlp.hook_post",
            "attn.hook_z"} <= set(block_hooks(model))
    edit = Edit.from_direction(_direction(64), "project", layers=[1], where=("hook_mlp_outt",))
    with pytest.raises(UsageError, match="Closest valid names: hook_mlp_out"):
        with edit.apply(model):
            pass


def test_a_parallel_block_has_no_resid_mid(tiny):
    model, tok = tiny("tiny-pythia")
    bridge = HookBridge(model, tok)
    assert residual_hooks(bridge) == ("hook_resid_pre", "hook_resid_post")
    edit = Edit.from_direction(_direction(model.config.hidden_size), "project", layers=[0],
                               where=RESIDUAL)
    with pytest.raises(UsageError, match="no hook_resid_mid"):
        with edit.apply(bridge):
            pass


def test_files_saved_with_hooks_still_load(tmp_path):
    edit = Edit.from_direction(_direction(64), "subtract", layers=[2], alpha=0.5,
                               where=("hook_resid_pre",))
    edit.save(tmp_path)
    assert Edit.load(tmp_path).where == ("hook_resid_pre",)
    config = json.loads((tmp_path / "edit.json").read_text())
    config["hooks"] = ["resid_mid"]  # as Edit.save wrote it before ``where``
    del config["where"]
    (tmp_path / "edit.json").write_text(json.dumps(config))
    loaded = Edit.load(tmp_path)
    assert loaded.where == ("hook_resid_mid",) and loaded.strengths == [0.5]


@pytest.mark.parametrize("backend", ["bridge", "hooked"])
def test_project_at_every_residual_hook_leaves_no_component(backends, backend):
    _, tok, bridge, hooked = backends("tiny-llama")
    model = bridge if backend == "bridge" else hooked
    d = _direction(64)
    ids, mask = bridge.tokenize(TEXTS)
    names = [f"blocks.{layer}.{hook}" for layer in range(4) for hook in RESIDUAL]

    def cached():
        if backend == "bridge":
            return bridge.run_with_cache(ids, names, attention_mask=mask)[1]
        return hooked.run_with_cache(ids, names_filter=names, attention_mask=mask)[1]

    before = cached()
    with _everywhere(d).apply(model):
        after = cached()
    real = mask.bool()
    for name in names:
        x = after[name][real]
        assert ((x @ d).abs() / x.norm(dim=-1)).max() <= 1e-5, name
        assert ((before[name][real] @ d).abs() / before[name][real].norm(dim=-1)).max() > 1e-3
    edit = Edit.from_direction(d, "subtract", layers=[0], alpha=0.5, where=("resid_pre",),
                               skip_first=False)
    with edit.apply(model):
        shifted = cached()
    name = "blocks.0.hook_resid_pre"
    torch.testing.assert_close(shifted[name][real], before[name][real] - 0.5 * d)
    assert torch.equal(cached()[name], before[name])  # the hooks are gone on exit


def test_mlp_hooks_equal_plain_pytorch_hooks(backends):
    """``hook_mlp_out`` (d_model) and ``mlp.hook_post`` (d_mlp, the down projection's input)
    edited through the bridge equal the same edit as forward hooks on the HF modules."""
    model, tok, bridge, _ = backends("tiny-llama")
    ids, mask = bridge.tokenize(TEXTS)
    real = mask.bool()
    mlp = model.model.layers[1].mlp
    d_mlp = mlp.down_proj.in_features
    for where, d in (("hook_mlp_out", _direction(64, 5)), ("mlp.hook_post", _direction(d_mlp, 6))):
        def edit(x, d=d):
            return x - (x @ d)[..., None] * d

        if where == "hook_mlp_out":
            handle = mlp.register_forward_hook(lambda m, args, out: edit(out))
        else:
            handle = mlp.down_proj.register_forward_pre_hook(lambda m, args: (edit(args[0]),))
        try:
            with torch.no_grad():
                expected = model(input_ids=ids, attention_mask=mask).logits
        finally:
            handle.remove()
        with Edit.from_direction(d, "project", layers=[1], where=(where,),
                                 skip_first=False).apply(bridge):
            got = bridge(ids, mask)
        assert (got - bridge(ids, mask))[real].abs().max() > 1e-3, where  # a visible edit
        torch.testing.assert_close(got[real], expected[real], atol=1e-4, rtol=0)



@pytest.mark.parametrize("backend", ["bridge", "hooked"])
def test_per_head_hook_z_equals_plain_pytorch_and_skips_the_first_token(backends, backend):
    """A direction of width d_head projected out of every head at ``attn.hook_z`` (each row's
    first real token left alone) equals the same edit on the output projection's input."""
    model, tok, bridge, hooked = backends("tiny-llama")
    attn = model.model.layers[2].self_attn
    n_heads, d_head = model.config.num_attention_heads, attn.head_dim
    d = _direction(d_head, 7)
    ids = torch.tensor([tok(TEXTS[0])["input_ids"]])  # one unpadded row: position 0 is first

    def on_o_proj(module, args):
        z = args[0].unflatten(-1, (n_heads, d_head))
        edited = z - (z @ d)[..., None] * d
        edited[:, 0] = z[:, 0]
        return (edited.flatten(-2),)

    handle = attn.o_proj.register_forward_pre_hook(on_o_proj)
    try:
        with torch.no_grad():
            expected = model(input_ids=ids).logits
    finally:
        handle.remove()
    edit = Edit.from_direction(d, "project", layers=[2], where=("attn.hook_z",))
    runner = bridge if backend == "bridge" else hooked
    with torch.no_grad(), edit.apply(runner):
        got = runner(ids) if backend == "bridge" else runner(ids, return_type="logits")
    assert (expected - model(input_ids=ids).logits).abs().max() > 1e-3  # a visible edit
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


# ---------------------------------------------------------------- orthogonalize


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_orthogonalize_matches_projection_everywhere_and_restores(backends, name):
    model, tok, bridge, hooked = backends(name)
    d = _direction(64, seed=2)
    baked_edit = Edit.from_direction(d, "orthogonalize")
    ids, mask = bridge.tokenize(TEXTS)
    real = mask.bool()
    digest = _state_hash(model)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    plain = bridge(ids, mask)
    with _everywhere(d).apply(bridge):
        hooked_logits = bridge(ids, mask)
    with baked_edit.apply(bridge):
        baked = bridge(ids, mask)
    assert (hooked_logits - plain)[real].abs().max() > 1e-2  # the edit does something
    torch.testing.assert_close(baked[real], hooked_logits[real], atol=1e-4, rtol=0)
    assert _state_hash(model) == digest
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    with pytest.raises(RuntimeError, match="boom"):
        with baked_edit.apply(bridge):
            assert _state_hash(model) != digest
            raise RuntimeError("boom")
    assert _state_hash(model) == digest
    torch.testing.assert_close(bridge(ids, mask), plain, atol=0, rtol=0)

    # the same on the TransformerLens model with these weights
    hooked_digest = _state_hash(hooked)
    with _everywhere(d).apply(hooked):
        ht_hooked = hooked(ids, attention_mask=mask)
    with baked_edit.apply(hooked):
        ht_baked = hooked(ids, attention_mask=mask)
    torch.testing.assert_close(ht_baked[real], ht_hooked[real], atol=1e-4, rtol=0)
    torch.testing.assert_close(ht_hooked[real], hooked_logits[real], atol=1e-4, rtol=0)
    assert _state_hash(hooked) == hooked_digest


# ---------------------------------------------------------------- generation


def _reference_greedy(model, ids, edit, n_new):
    """Greedy decoding without a KV cache, with the edit as plain PyTorch hooks on each block's
    input (resid_pre), output (resid_post) and attention output: resid_mid = resid_pre +
    attn_out, and with resid_pre already edited, editing attn_out edits resid_mid (for a
    projection because resid_pre has no component left; for a subtraction trivially)."""
    blocks = model.transformer.h if model.config.model_type == "gpt2" else model.model.layers

    def post(module, args, out):
        return (edit(out[0]), *out[1:]) if isinstance(out, tuple) else edit(out)

    def pre(module, args, kwargs):
        if args:
            return (edit(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": edit(kwargs["hidden_states"])}

    handles = []
    for block in blocks:
        attn = block.attn if hasattr(block, "attn") else block.self_attn
        handles += [block.register_forward_pre_hook(pre, with_kwargs=True),
                    attn.register_forward_hook(post), block.register_forward_hook(post)]
    try:
        with torch.no_grad():
            for _ in range(n_new):
                logits = model(input_ids=ids, use_cache=False).logits
                ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    finally:
        for handle in handles:
            handle.remove()
    return ids


@pytest.mark.parametrize("name,how", [("tiny-llama", "project"), ("tiny-gpt2", "subtract")])
def test_generation_under_every_residual_hook_matches_uncached_reference(backends, name, how):
    """Project: at resid_mid the reference edits attn_out, equal only because resid_pre has
    no component left; subtract at all three hooks: resid_mid = edited resid_pre + edited
    attn_out - alpha d."""
    model, tok, bridge, hooked = backends(name)
    d, alpha = _direction(64, seed=4), 0.1
    if how == "project":
        edit = lambda x: x - (x @ d)[..., None] * d  # noqa: E731
    else:
        edit = lambda x: x - alpha * d  # noqa: E731
    ids = torch.tensor([tok("The old house on the hill")["input_ids"]])
    expected = _reference_greedy(model, ids, edit, n_new=6)
    assert not torch.equal(expected, bridge.generate(ids, max_new_tokens=6))  # a visible edit
    with _everywhere(d, how, alpha=alpha).apply(bridge):
        got = bridge.generate(ids, max_new_tokens=6)
    assert torch.equal(got, expected)
    with _everywhere(d, how, alpha=alpha).apply(hooked):  # generation on TransformerLens
        got_hooked = generate(hooked, ids, max_new_tokens=6)
    assert torch.equal(got_hooked, expected)


# ---------------------------------------------------------------- errors


def test_edit_errors(backends):
    _, _, bridge, hooked = backends("tiny-gpt2")
    for model in (bridge, hooked):
        with pytest.raises(UsageError, match="d_model=64"):
            with Edit.from_direction(torch.ones(32), "project", layers=[0]).apply(model):
                pass
        with pytest.raises(UsageError, match="out of range"):
            with Edit.from_direction(torch.ones(64), "project", layers=[7]).apply(model):
                pass
        with pytest.raises(UsageError, match="d_model=64"):
            with Edit.from_direction(torch.ones(65), "orthogonalize").apply(model):
                pass
    with pytest.raises(UsageError, match="Unknown edit 'erase'"):
        Edit.from_direction(torch.ones(64), "erase", layers=[0])

