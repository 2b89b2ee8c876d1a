"""Residual caching (cache_residuals, pooling, the on-disk store) against runs without padding,
TransformerLens and the Hugging Face hidden states."""


import pytest
import torch

from lens_safety.backend.transformer_lens import hooked_from_hf
from lens_safety.probing.caching import cache_residuals, pool_batch
from pruning_bridge.bridge import HookBridge

TEXTS = [
    "The weather today is mild and pleasant.",
    "Hi",
    "People from that town are all the same, I tell you, every single one of them.",
    "Cats sleep a lot.",
    "A fairly long sentence that keeps going for a while so that padding matters here.",
]
RESID = ("resid_pre", "resid_mid", "resid_post")


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



# ---------------------------------------------------------------- caching


def _single_run(model, tok, text, name):
    """The activation at ``name`` for one text run alone (no padding), ``[pos, d]``."""
    ids = torch.tensor([tok(text)["input_ids"]])
    if isinstance(model, HookBridge):
        _, cache = model.run_with_cache(ids, [name])
    else:
        _, cache = model.run_with_cache(ids, names_filter=[name])
    return cache[name][0].float()


@pytest.mark.parametrize("backend", ["bridge", "hooked"])
@pytest.mark.parametrize("pool", ["last", "mean", "mean_after_first"])
def test_cache_matches_unpadded_run_with_cache(backends, backend, pool):
    _, tok, bridge, hooked = backends("tiny-llama")
    model = bridge if backend == "bridge" else hooked
    for hook in ("resid_mid", "resid_post"):
        acts = cache_residuals(model, tok, TEXTS, hook=hook, pool=pool, batch_size=3,
                               progress=False)
        assert acts.shape == (4, len(TEXTS), 64) and acts.dtype == torch.float32
        for layer in (0, 3):
            for i, text in enumerate(TEXTS):
                full = _single_run(model, tok, text, f"blocks.{layer}.hook_{hook}")
                expected = {"last": full[-1], "mean": full.mean(0),
                            "mean_after_first": full[1:].mean(0) if len(full) > 1
                            else full[0]}[pool]
                torch.testing.assert_close(acts[layer, i], expected, atol=1e-5, rtol=1e-4)


def test_mean_pool_ignores_padding():
    acts = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0]])
    acts[mask == 0] = float("nan")  # padding may hold anything, even NaN
    mean = pool_batch(acts, mask, "mean")
    torch.testing.assert_close(mean[0], acts[0, 2:].mean(0))
    torch.testing.assert_close(mean[1], acts[1, :3].mean(0))
    last = pool_batch(acts, mask, "last")
    torch.testing.assert_close(last, torch.stack([acts[0, 3], acts[1, 2]]))


def test_cache_cross_backend_gpt2(backends):
    _, tok, bridge, hooked = backends("tiny-gpt2")
    for hook in RESID:
        a = cache_residuals(bridge, tok, TEXTS, hook=hook, pool="mean", batch_size=2,
                            progress=False)
        b = cache_residuals(hooked, tok, TEXTS, hook=hook, pool="mean", batch_size=4,
                            progress=False)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_cache_store_roundtrip(backends, tmp_path, monkeypatch):
    _, tok, bridge, _ = backends("tiny-gpt2")
    path = tmp_path / "acts.safetensors"
    first = cache_residuals(bridge, tok, TEXTS, layers=[1, 3], progress=False, store=path)
    assert first.shape == (2, len(TEXTS), 64) and path.exists()

    def fail(*args, **kwargs):
        raise AssertionError("recomputed although the store matches")

    import lens_safety.probing.caching as caching
    with monkeypatch.context() as patch:
        patch.setattr(caching, "run_with_cache", fail)
        assert torch.equal(cache_residuals(bridge, tok, TEXTS, layers=[1, 3], progress=False,
                                           store=path), first)
    with pytest.warns(UserWarning, match="other settings"):
        other = cache_residuals(bridge, tok, TEXTS, layers=[1, 3], pool="mean", progress=False,
                                store=path)
    assert not torch.equal(other, first)


def test_cache_errors(backends):
    _, tok, bridge, _ = backends("tiny-gpt2")
    with pytest.raises(ValueError, match="No texts"):
        cache_residuals(bridge, tok, [], progress=False)
    with pytest.raises(ValueError, match="out of range"):
        cache_residuals(bridge, tok, TEXTS, layers=[4], progress=False)
    with pytest.raises(ValueError, match="pool"):
        cache_residuals(bridge, tok, TEXTS, pool="max", progress=False)
