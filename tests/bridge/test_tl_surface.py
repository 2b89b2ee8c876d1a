"""TransformerLens's call surface on HookBridge (tl_api.py, activation_cache.py), with
TransformerLens's own code as the test: ``transformer_lens.patching`` and TransformerLens's
``ActivationCache`` methods run on a HookBridge and on TransformerLens's own model of the same
weights (tl_reference.independent: HookedTransformer on 3.9, the native model on 4.x) and give
the same tensors."""

import pytest
import torch
import torch.nn.functional as F

from pruning_bridge.bridge import HookBridge, UnknownHookError
from pruning_bridge.common import UsageError
from pruning_bridge.random_models import TINY_MODELS
from tl_reference import TL4, covered, get_act_name, independent, with_flags

CLEAN = "When John and Mary went to the shops, John gave the bag to"
CORRUPT = "When John and Mary went to the shops, Mary gave the bag to"
TEXTS = ["The quick brown fox", "Hello"]


@pytest.fixture(scope="module")
def bridges(tiny):
    made = {}

    def get(name):
        if name not in made:
            made[name] = HookBridge(*tiny(name))
        return made[name]

    return get


# ---------------------------------------------------------------- hooks and runs


def test_hook_functions_get_a_hook_with_a_name(bridges):
    """``fn(act, hook)`` reads ``hook.name`` / ``hook.layer()``; a filter selects names; the
    ``hooks(fwd_hooks=...)`` block and ``run_with_hooks`` agree; ``fn(act, name)`` still works."""
    bridge = bridges("tiny-llama")
    seen = []

    def record(act, hook):
        seen.append((hook.name, hook.layer(), hook == hook.name))

    logits = bridge.run_with_hooks(TEXTS, fwd_hooks=[(lambda n: n.endswith("resid_post"), record),
                                                     ("blocks.2.attn.hook_z", record)])
    assert seen == [(f"blocks.{i}.hook_resid_post", i, True) for i in range(2)] + [
        ("blocks.2.attn.hook_z", 2, True)] + [(f"blocks.{i}.hook_resid_post", i, True)
                                             for i in range(2, 4)]
    torch.testing.assert_close(logits, bridge(TEXTS))

    def zero_head(z, hook):
        z[:, :, 1] = 0  # in place, TransformerLens style

    with bridge.hooks(fwd_hooks=[("blocks.1.attn.hook_z", zero_head)]):
        in_block = bridge(TEXTS)
    by_name = bridge.run_with_hooks(TEXTS, fwd_hooks=[("blocks.1.attn.hook_z",
                                                       lambda z, name: zero_head(z, name))])
    torch.testing.assert_close(in_block, by_name)
    assert not torch.allclose(in_block, logits)
    with pytest.raises(UsageError, match="backward hooks"):
        bridge.run_with_hooks(TEXTS, bwd_hooks=[("blocks.0.hook_resid_post", record)])
    with pytest.raises(UsageError, match="reset_hooks_end"):
        bridge.run_with_hooks(TEXTS, reset_hooks_end=False)
    with pytest.raises(UnknownHookError, match="blocks.0.hook_resid_post"):
        bridge.run_with_hooks(TEXTS, fwd_hooks=[("blocks.0.hook_resid_pots", record)])
    assert bridge._hooks == []


def test_run_with_cache_names_filter_and_return_types(tiny, bridges):
    """``names_filter`` as a name, a list or a predicate; ``return_type`` "loss" / "both" / None
    and ``remove_batch_dim`` as TransformerLens's (the loss equals its own, on its own model)."""
    model, tok = tiny("tiny-gpt2")
    bridge = bridges("tiny-gpt2")
    ids = tok(CLEAN, return_tensors="pt")["input_ids"]
    wanted = ["blocks.1.hook_resid_post", "blocks.3.hook_resid_post"]
    for names_filter in (wanted, lambda n: n in wanted):
        _, cache = bridge.run_with_cache(ids, names_filter=names_filter)
        assert list(cache) == wanted
    _, cache = bridge.run_with_cache(ids, names_filter="blocks.1.hook_resid_post")
    assert list(cache) == wanted[:1]
    with pytest.raises(UsageError, match="not both"):
        bridge.run_with_cache(ids, wanted, names_filter=wanted)
    logits, loss = bridge(ids, return_type="both")
    expected = F.cross_entropy(logits[0, :-1], ids[0, 1:])
    torch.testing.assert_close(loss, expected)
    with torch.no_grad():
        torch.testing.assert_close(loss, independent(model, tok)(ids, return_type="loss"),
                                   atol=1e-5, rtol=0)
    per_token = bridge(ids, return_type="loss", loss_per_token=True)
    torch.testing.assert_close(per_token.mean(), expected)
    output, cache = bridge.run_with_cache(ids, wanted, return_type=None, remove_batch_dim=True)
    assert output is None and cache[wanted[0]].shape == (ids.shape[1], model.config.hidden_size)
    loss, _ = bridge.run_with_cache(ids, wanted, return_type="loss")
    torch.testing.assert_close(loss, expected)
    _, batch = bridge.run_with_cache(TEXTS, wanted)
    with pytest.raises(AssertionError, match="batch size 2"):  # TransformerLens's own check
        batch.remove_batch_dim()
    second = batch.apply_slice_to_batch_dim(1)
    assert torch.equal(second[wanted[0]], batch[wanted[0]][1]) and not second.has_batch_dim
    assert torch.equal(second.attention_mask, batch.attention_mask[1])
    assert batch.cache_dict is batch
    ids, mask = bridge.tokenize(TEXTS)  # left padding: only real next tokens count
    loss = bridge(ids, attention_mask=mask, return_type="loss")
    rows = [F.cross_entropy(bridge(text)[0, :-1], bridge.tokenize(text)[0][0, 1:],
                            reduction="sum") for text in TEXTS]
    n = sum(len(tok(text)["input_ids"]) - 1 for text in TEXTS)
    torch.testing.assert_close(loss, sum(rows) / n, atol=1e-5, rtol=0)


def test_tokens_as_transformer_lens(tiny, bridges):
    """to_tokens / to_string / to_str_tokens / to_single_token equal TransformerLens's."""
    model, tok = tiny("tiny-gpt2")
    bridge, tl = bridges("tiny-gpt2"), independent(model, tok)
    for text in (TEXTS[0], TEXTS):
        for prepend_bos in (True, False):
            for side in ("left", "right"):
                ours = bridge.to_tokens(text, prepend_bos=prepend_bos, padding_side=side)
                theirs = tl.to_tokens(text, prepend_bos=prepend_bos, padding_side=side)
                assert torch.equal(ours, theirs), (text, prepend_bos, side)
        assert bridge.to_str_tokens(text, prepend_bos=True) == tl.to_str_tokens(text,
                                                                               prepend_bos=True)
    tokens = bridge.to_tokens(TEXTS, prepend_bos=True)
    assert bridge.to_string(tokens) == tl.to_string(tokens)
    assert bridge.to_string(tokens[0]) == tl.to_string(tokens[0]) == "<|endoftext|>" + TEXTS[0]
    assert bridge.to_single_token(" Mary") == tl.to_single_token(" Mary")
    with pytest.raises(UsageError, match="not one"):
        bridge.to_single_token(" Mary went")
    # by default, text is tokenized as the bridge's own calls run it (the tokenizer's way)
    assert torch.equal(bridge.to_tokens(TEXTS[0]), bridge.tokenize(TEXTS[0])[0])


# ---------------------------------------------------------------- config and weights

# (not final_rms: TransformerLens 4.3's bridge leaves it False on Mistral, whose final norm is
# an RMSNorm; the bridge's cfg says True there, as HookedTransformer's)
CFG_FIELDS = ("n_layers", "d_model", "n_heads", "d_head", "n_key_value_heads", "d_mlp",
              "d_vocab", "d_vocab_out", "n_ctx", "act_fn", "eps", "normalization_type",
              "positional_embedding_type", "gated_mlp", "parallel_attn_mlp")


@pytest.mark.parametrize("name", TINY_MODELS)
def test_cfg_and_weights_as_transformer_lens(tiny, bridges, name):
    """``cfg``'s fields and the TransformerLens-shaped weights equal TransformerLens's own for
    the same HF model (3.9: HookedTransformer's converted weights; 4.x: TransformerBridge's view
    of the HF weights, which leaves absent biases None where 3.9 and the bridge give zeros)."""
    model, tok = tiny(name)
    bridge, tl = bridges(name), with_flags(model, tok, ())
    for field in CFG_FIELDS:
        assert getattr(bridge.cfg, field) == getattr(tl.cfg, field), field
    assert bridge.cfg.final_rms == (bridge.cfg.normalization_type == "RMS")
    weights = {"attn": ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O"),
               "mlp": ("W_in", "W_gate", "W_out", "b_in", "b_out")}
    for layer in (0, 3):
        for part, names in weights.items():
            for weight in names:
                ours = getattr(getattr(bridge.blocks[layer], part), weight)
                theirs = getattr(getattr(tl.blocks[layer], part), f"_{weight}", None)
                if theirs is None:  # 3.9 keeps grouped-query K/V unrepeated as _W_K
                    theirs = getattr(getattr(tl.blocks[layer], part), weight, None)
                if theirs is None:
                    assert ours is None or not ours.any(), (layer, weight)
                else:
                    assert torch.equal(ours, theirs), (layer, weight)
    for weight in ("W_U", "b_U", "W_E") + (("W_pos",) if name == "tiny-gpt2" else ()):
        theirs = getattr(tl, weight)
        assert torch.equal(getattr(bridge, weight), theirs[:len(getattr(bridge, weight))]), weight


def test_transformer_lens_names_all_exist(bridges):
    """Every name ``get_act_name`` builds for a decoder is one the bridge accepts."""
    short = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "z", "q", "k", "v",
             "pattern", "attn_scores", "result", "q_input", "k_input", "v_input", "attn_in",
             "mlp_in", "pre", "post", "rot_q", "rot_k")
    bridge = bridges("tiny-llama")
    names = [get_act_name(s, layer) for s in short for layer in (0, 3)]
    names += [get_act_name(s, 1, ln) for s in ("scale", "normalized") for ln in ("ln1", "ln2")]
    names += [get_act_name("embed"), get_act_name("scale"), get_act_name("normalized")]
    assert set(bridge.resolve(names)) == set(names)
    if TL4:
        from transformer_lens.model_protocol import (TransformerLensModel,
                                                     TransformerLensModelWithWeights)
        assert isinstance(bridge, TransformerLensModel)
        assert isinstance(bridge, TransformerLensModelWithWeights)


# ---------------------------------------------------------------- TransformerLens's own code


@pytest.fixture(scope="module")
def runs(tiny, bridges):
    """Per model: the bridge, TransformerLens's model, and each one's cache of CLEAN."""
    made = {}

    def get(name):
        if name not in made:
            model, tok = tiny(name)
            bridge, tl = bridges(name), independent(model, tok)
            ids = tok(CLEAN, return_tensors="pt")["input_ids"]
            _, cache = bridge.run_with_cache(ids)
            with torch.no_grad():
                _, tl_cache = tl.run_with_cache(ids)
            made[name] = bridge, tl, cache, tl_cache
        return made[name]

    return get


@pytest.mark.parametrize("name", covered(TINY_MODELS))
def test_activation_cache_methods_equal_transformer_lens(runs, name):
    """TransformerLens's ActivationCache methods give the same tensors on the bridge's cache as
    on TransformerLens's own cache of the same input."""
    bridge, tl, cache, tl_cache = runs(name)
    mary, john = bridge.to_single_token(" Mary"), bridge.to_single_token(" John")
    assert (mary, john) == (tl.to_single_token(" Mary"), tl.to_single_token(" John"))
    mid = not bridge.cfg.parallel_attn_mlp  # (a parallel residual has no resid_mid)
    checks = {
        "indexing": lambda c: torch.stack([c["resid_post", 2], c["resid_pre", -1], c["embed"],
                                           c["scale", 1, "ln2"]
                                           .expand_as(c["resid_post", 2])]),
        "z": lambda c: c["z", 1, "attn"],
        "accumulated_resid": lambda c: c.accumulated_resid(layer=-1, incl_mid=mid,
                                                           apply_ln=True, pos_slice=-1),
        "accumulated_resid_2": lambda c: c.accumulated_resid(layer=2),
        "decompose_resid": lambda c: c.decompose_resid(layer=-1, apply_ln=True, pos_slice=-1),
        "decompose_resid_attn": lambda c: c.decompose_resid(layer=2, mode="attn",
                                                            mlp_input=True),
        "stack_activation": lambda c: c.stack_activation("resid_post"),
        "stack_head_results": lambda c: c.stack_head_results(layer=-1, apply_ln=True,
                                                             pos_slice=-1),
        "logit_attrs": lambda c: c.logit_attrs(
            c.decompose_resid(layer=-1, pos_slice=-1), tokens=torch.tensor([mary]),
            incorrect_tokens=torch.tensor([john]), pos_slice=-1),
        "apply_ln_to_stack": lambda c: c.apply_ln_to_stack(c.decompose_resid(layer=2), layer=2,
                                                           mlp_input=True),
        "get_full_resid_decomposition": lambda c: c.get_full_resid_decomposition(
            layer=2, expand_neurons=True, pos_slice=-1),
    }
    for check, fn in checks.items():
        ours, theirs = fn(cache), fn(tl_cache)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5, msg=check)
    labels = cache.stack_head_results(layer=2, return_labels=True)[1]
    assert labels == tl_cache.stack_head_results(layer=2, return_labels=True)[1]


def _patching():
    from transformer_lens import patching
    return patching


@pytest.mark.parametrize("name", covered(TINY_MODELS))
def test_activation_patching_equals_transformer_lens(runs, tiny, name):
    """``transformer_lens.patching`` on the bridge gives TransformerLens's own result tensors:
    residual stream, attention and MLP outputs per layer and position, every head's output,
    queries, keys, values and pattern, and head outputs per position."""
    bridge, tl, cache, tl_cache = runs(name)
    _, tok = tiny(name)
    corrupt = tok(CORRUPT, return_tensors="pt")["input_ids"]
    mary, john = bridge.to_single_token(" Mary"), bridge.to_single_token(" John")

    def metric(logits):
        return logits[0, -1, mary] - logits[0, -1, john]

    patching = _patching()
    functions = ["get_act_patch_block_every", "get_act_patch_attn_head_all_pos_every"]
    if name == "tiny-llama":  # grouped-query attention: per-position heads
        functions.append("get_act_patch_attn_head_out_by_pos")
    for function in functions:
        ours = getattr(patching, function)(bridge, corrupt, cache, metric)
        with torch.no_grad():
            theirs = getattr(patching, function)(tl, corrupt, tl_cache, metric)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0, msg=function)
        assert ours.abs().max() > 1e-3, function  # patching moved the metric somewhere
