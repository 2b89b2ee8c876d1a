"""The remote bridge's client side, with no server: every study's trace goes through the server's
round trip in this process (``HookBridge.remote(model, simulate=True)``: nnsight's serialisation,
an unpickler with NDIF's module whitelist, the restored code run on the model) and must equal the
local bridge to the bit. The same checks against a real NDIF server are in ``test_ndif.py``.
"""

import json

import pytest
import torch

from lens_safety.backend import residual_hooks
from lens_safety.edits.edit import Edit
from lens_safety.probing.caching import cache_residuals
from pruning_bridge.bridge import HookBridge
from pruning_bridge.bridge.remote import (UnsendableError, allowed, check_sendable,
                                          refused_references)
from pruning_bridge.common.errors import NeedsLocalWeightsError
from pruning_bridge.heads.routing import RoutedHeads
from pruning_bridge.pruning.layers import drop_layers, skip_layers
from pruning_bridge.pruning.weights import magnitude_prune

PROMPTS = ["The capital of France is", "Hello"]  # a padded batch


@pytest.fixture(params=["tiny-llama", "tiny-gpt2", "tiny-qwen3"])
def pair(request, tiny):
    model, tok = tiny(request.param)
    return HookBridge(model, tok), HookBridge.remote(model, tokenizer=tok, simulate=True)


def test_cache_hooks_and_generate_equal_the_local_bridge(pair):
    local, remote = pair
    names = ["hook_embed", "blocks.0.hook_resid_post", "blocks.1.attn.hook_z",
             "blocks.1.ln2.hook_normalized", "ln_final.hook_scale"]
    logits, cache = local.run_with_cache(PROMPTS, names=names)
    remote_logits, remote_cache = remote.run_with_cache(PROMPTS, names=names)
    assert torch.equal(logits, remote_logits)
    assert set(remote_cache) == set(names)
    for name in names:
        assert torch.equal(cache[name], remote_cache[name])
    assert remote.traffic.requests == 1
    # the result is the tensors asked for, and little else
    asked = logits.nbytes + sum(t.nbytes for t in cache.values())
    assert 0 < remote.traffic.bytes_returned <= 1.1 * asked

    def zero_head(z, name):
        z[..., 1, :] = 0

    def scale(x, name):
        return x * 0.5

    hooks = [("blocks.0.attn.hook_z", zero_head), ("blocks.1.hook_resid_mid", scale)]
    with local.hooks(hooks), remote.hooks(hooks):
        assert torch.equal(local(PROMPTS), remote(PROMPTS))
        assert torch.equal(local.generate(PROMPTS, max_new_tokens=4, return_text=False),
                           remote.generate(PROMPTS, max_new_tokens=4, return_text=False))
    assert local.generate(PROMPTS, max_new_tokens=4) == remote.generate(PROMPTS,
                                                                        max_new_tokens=4)
    assert remote.traffic.requests == 4  # one per call, generation included


def test_skipped_layers_equal_the_local_bridge(pair):
    local, remote = pair
    with skip_layers(local, [1]):
        expected = local(PROMPTS)
    with skip_layers(remote, [1]):
        assert torch.equal(remote(PROMPTS), expected)


@pytest.mark.parametrize("how", ["project", "subtract", "clamp", "leace"])
def test_safety_edits_equal_the_local_bridge(pair, how):
    local, remote = pair
    layers = list(range(local.adapter.n_layers))
    names = [f"blocks.{layer}.hook_resid_post" for layer in layers]
    prompts = PROMPTS * 6
    _, cache = local.run_with_cache(prompts, names=names)
    acts = torch.stack([cache[name][:, -1] for name in names]).numpy()
    labels = ["toxic", "neutral"] * 6
    edit = Edit.fit(acts, labels, how, layers=[0, 1], skip_first=True)
    with edit.apply(local):
        expected = local(PROMPTS)
    with edit.apply(remote):
        assert torch.equal(remote(PROMPTS), expected)
    direction = torch.randn(local.config.hidden_size, generator=torch.Generator().manual_seed(0))
    everywhere = Edit.from_direction(direction, "subtract", layers=range(local.adapter.n_layers),
                                     alpha=2.0, where=residual_hooks(local), skip_first=False)
    with everywhere.apply(local):
        expected = local.generate(PROMPTS, max_new_tokens=3, return_text=False)
    with everywhere.apply(remote):
        assert torch.equal(remote.generate(PROMPTS, max_new_tokens=3, return_text=False),
                           expected)


def test_routed_heads_and_cached_residuals_equal_the_local_bridge(pair):
    local, remote = pair
    router = RoutedHeads(local, n_shared=1, top_k=1, seed=0)
    with router.routing(local):
        expected = local(PROMPTS)
    with router.routing(remote):
        assert torch.equal(remote(PROMPTS), expected)
    kwargs = dict(pool="mean", batch_size=2, progress=False)
    texts = PROMPTS * 2 + ["one more"]
    torch.testing.assert_close(cache_residuals(remote, None, texts, **kwargs),
                               cache_residuals(local, None, texts, **kwargs), rtol=0, atol=0)
    assert remote.traffic.requests == 1 + 3  # a request per batch, not per text


def test_a_hook_the_server_cannot_run_is_refused_before_any_request(pair):
    _, remote = pair

    def uses_json(x, name):
        return x * len(json.dumps([1]))

    with pytest.raises(UnsendableError, match=r"uses_json \(from .*\).*the module json"):
        with remote.hooks([("blocks.0.hook_resid_post", uses_json)]):
            pass
    with pytest.raises(UnsendableError, match="json.dumps"):
        check_sendable(json.dumps)
    assert remote.traffic.requests == 0
    with pytest.raises(ValueError, match="attention function"):
        remote.run_with_cache(PROMPTS, names=["blocks.0.attn.hook_pattern"])


def test_an_import_anywhere_in_a_hook_is_refused_with_advice_that_fits():
    # (defined here, as in a script or notebook: sent as source; a test module's top-level
    # functions would be sent by name)
    def imports_json(x, name):
        import json
        return x * len(json.dumps([1]))

    def helper():
        import os
        return os.cpu_count() or 1

    def uses_a_helper(x, name):
        return x * helper()

    def nested(x, name):
        def inner():
            from csv import reader
            return reader
        return x

    def torch_and_math_inside(x, name):
        import math

        import torch.nn.functional as F
        return F.relu(x) * math.pi

    local = "test_an_import_anywhere_in_a_hook_is_refused_with_advice_that_fits.<locals>"
    for fn, where in [(imports_json, f"imports json (in {local}.imports_json)"),
                      (uses_a_helper, f"imports os (in {local}.helper)"),
                      (nested, f"imports csv (in {local}.nested.<locals>.inner)")]:
        with pytest.raises(UnsendableError) as caught:
            check_sendable(fn)
        message = str(caught.value)
        assert where in message and "NDIF's hosted service lets a trace use only" in message
        assert "travels as source: use only those modules inside it" in message
        assert "Define the function in your script" not in message
    check_sendable(torch_and_math_inside)  # the allowed modules may be imported inside
    with pytest.raises(UnsendableError, match="json.dumps.*sent by name.*Define the function "
                                              "in your script"):
        check_sendable(json.dumps)


def test_weight_edits_on_a_remote_bridge_say_they_need_local_weights(pair):
    _, remote = pair
    with pytest.raises(NeedsLocalWeightsError, match="Weight pruning.*NDIF"):
        with magnitude_prune(remote, 0.5):
            pass
    with pytest.raises(NeedsLocalWeightsError, match="Dropping layers"):
        drop_layers(remote, [0])


def test_the_whitelist_is_ndifs():
    assert allowed("torch.nn.functional") and allowed("math") and allowed("numpy.linalg")
    assert not allowed("os") and not allowed("json") and not allowed("pruning_bridge")
    import pickle
    assert refused_references(pickle.dumps(json.loads)) == ["json.loads"]


def test_a_remote_bridge_on_a_checkpoint_holds_no_weights(tiny, tmp_path):
    model, tok = tiny("tiny-llama")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    remote = HookBridge.remote(str(tmp_path), host="http://127.0.0.1:9")
    assert all(p.is_meta for p in remote.parameters())
    assert remote.hook_names == HookBridge(model, tok).hook_names
    assert remote.device == torch.device("cpu")  # inputs are made here
    with pytest.raises(ValueError, match="not a loaded model"):
        HookBridge.remote(model)


def test_the_layer_sweep_runs_remotely_one_request_per_batch(tiny, data_dir):
    from pruning_bridge.evals import EvalSettings
    from pruning_bridge.pruning.layer_sweep import layer_sweep

    model, tok = tiny("tiny-llama")
    settings = EvalSettings(("mmlu", "perplexity"), data_dir=data_dir, window=64, batch_size=4,
                            limit={"mmlu": 4, "perplexity": 2}, progress=False)
    remote = HookBridge.remote(model, tokenizer=tok, simulate=True)
    rows = layer_sweep(remote, None, settings, layers=[0, 1])
    local = layer_sweep(model, tok, settings, layers=[0, 1], reuse_prefix=False)
    key = lambda r: (r["task"], tuple(r["config"]["removed"]))  # noqa: E731
    assert {key(r): r["value"] for r in rows} == {key(r): r["value"] for r in local}
    # 3 models (unpruned, without layer 0, without layer 1) x (1 MMLU batch + 2 windows, which
    # the perplexity evaluation runs one at a time)
    assert remote.traffic.requests == 3 * 3
    assert max(entry["sent"] for entry in remote.traffic.log) < 100_000  # no text's full tokens


def test_the_cli_model_options_make_a_remote_bridge(tiny, tmp_path):
    import argparse

    from pruning_bridge.cli_options import add_model_options, load_model_from_args

    model, tok = tiny("tiny-gpt2")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    parser = argparse.ArgumentParser()
    add_model_options(parser)
    args = parser.parse_args(["--model", str(tmp_path), "--ndif-host", "http://127.0.0.1:9"])
    bridge, tokenizer = load_model_from_args(args)
    assert isinstance(bridge, HookBridge) and bridge.remote == "http://127.0.0.1:9"
    assert all(p.is_meta for p in bridge.parameters()) and tokenizer is bridge.tokenizer
    args = parser.parse_args(["--model", str(tmp_path), "--remote", "--dtype", "bfloat16"])
    with pytest.raises(ValueError, match="server's deployment decides"):
        load_model_from_args(args)
