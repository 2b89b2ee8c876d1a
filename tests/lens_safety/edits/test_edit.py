"""The Edit object: each how through hooks against plain PyTorch, LEACE against concept-erasure,
fitting in class-gap units, saving, and TransformerLens against the bridge."""

import math

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from lens_safety.backend.transformer_lens import hooked_from_hf
from lens_safety.edits.edit import Edit
from lens_safety.edits.trace_math import clamp_along
from lens_safety.probing.caching import cache_residuals
from lens_safety.probing.directions import harmful_direction
from pruning_bridge.bridge import HookBridge
from pruning_bridge.common import UsageError

PROMPTS = ["The cat sat on the", "I really hate it when", "Hello there, my good friend",
           "What"]
TEXTS = ["you are a lovely person", "what a wonderful day it is", "thanks for the help",
         "you stupid idiot", "shut up you moron", "go to hell you jerk", "nice weather today",
         "I hate you all, losers"]
KINDS = ["nontoxic"] * 3 + ["toxic"] * 3 + ["nontoxic", "toxic"]


@pytest.fixture
def bridge(tiny):
    model, tok = tiny("tiny-llama")
    return HookBridge(model, tok)


def clean_cache(bridge, names, texts=PROMPTS):
    _, cache = bridge.run_with_cache(texts, names)
    return cache



# ---------------------------------------------------------------- edits


def test_clamp_leaves_rows_below_the_threshold_bit_for_bit():
    x = torch.randn(64, 16)
    d = torch.nn.functional.normalize(torch.randn(16), dim=0)
    t = 0.3
    out = clamp_along(x, d, t)
    below = x @ d <= t
    assert below.any() and (~below).any()
    assert torch.equal(out[below], x[below])
    torch.testing.assert_close(out[~below] @ d, torch.full(((~below).sum(),), t))
    expected = x[~below] - ((x[~below] @ d) - t)[:, None] * d  # plain PyTorch
    torch.testing.assert_close(out[~below], expected)


def test_every_edit_through_hooks_equals_plain_pytorch_and_skips_the_first_token(bridge):
    """On a left-padded batch each edit changes blocks.1.hook_resid_post exactly as plain
    PyTorch does, leaves each row's first real token (and the padding) alone, and restores."""
    d_model = bridge.model.config.hidden_size
    d = torch.nn.functional.normalize(torch.randn(d_model), dim=0)
    name = "blocks.1.hook_resid_post"
    clean = clean_cache(bridge, [name])[name]
    mask = bridge.tokenize(PROMPTS)[1].bool()
    first = mask.cumsum(-1) <= 1
    proj = clean[mask & ~first] @ d
    t = float(proj.median())
    expected = {"project": clean - (clean @ d)[..., None] * d,
                "subtract": clean - 2.5 * d,
                "clamp": clean - (clean @ d - t).clamp(min=0)[..., None] * d}
    for how, strength in (("project", None), ("subtract", 2.5), ("clamp", t)):
        edit = Edit.from_direction(d, how, layers=[1], alpha=strength or 0.0,
                                   threshold=strength or 0.0)
        with edit.apply(bridge):
            got = clean_cache(bridge, [name])[name]
        torch.testing.assert_close(got[mask & ~first], expected[how][mask & ~first],
                                   atol=1e-5, rtol=0)
        assert torch.equal(got[first], clean[first])
        if how == "clamp":  # below the threshold: unchanged bit for bit (t is the median of
            # the projections, so rows within rounding of t are left out)
            below = (clean @ d < t - 1e-4) & mask
            assert torch.equal(got[below], clean[below])
    assert torch.equal(clean_cache(bridge, [name])[name], clean)


def test_leace_through_hooks_equals_concept_erasure_and_blinds_a_probe(bridge):
    concept_erasure = pytest.importorskip("concept_erasure")
    acts = cache_residuals(bridge, bridge.tokenizer, TEXTS * 4, pool="last", progress=False,
                           batch_size=8)
    texts, kinds = TEXTS * 4, KINDS * 4
    layer = 2
    edit = Edit.fit(acts, kinds, "leace", layers=[layer], positive=("toxic",),
                    negative=("nontoxic",))
    x = acts[layer].double()
    z = torch.tensor([k == "toxic" for k in kinds]).double()
    reference = concept_erasure.LeaceFitter.fit(x, z[:, None], shrinkage=False,
                                                constrain_cov_trace=False).eraser
    with edit.apply(bridge):
        erased = cache_residuals(bridge, bridge.tokenizer, texts, pool="last", layers=[layer],
                                 progress=False, batch_size=8)[0]
    torch.testing.assert_close(erased.double(), reference(x), atol=1e-4, rtol=1e-4)
    y = np.array([k == "toxic" for k in kinds])
    raw = LogisticRegression(max_iter=5000).fit(x.numpy(), y).score(x.numpy(), y)
    probe = LogisticRegression(max_iter=5000).fit(erased.numpy(), y)
    assert raw == 1.0
    assert probe.score(erased.numpy(), y) <= max(y.mean(), 1 - y.mean()) + 0.05


@pytest.mark.parametrize("how", ["project", "subtract", "clamp", "leace", "orthogonalize"])
def test_edit_saves_loads_and_applies_the_same(bridge, how, tmp_path):
    acts = cache_residuals(bridge, bridge.tokenizer, TEXTS, pool="last", progress=False)
    edit = Edit.fit(acts, KINDS, how, layers=[1, 2], strength=0.5, positive=("toxic",),
                    negative=("nontoxic",), direction_layer=2 if how == "orthogonalize" else None,
                    model="tiny-llama")
    loaded = Edit.load(edit.save(tmp_path / how))
    assert loaded.config == edit.config and str(loaded) == str(edit)
    clean = bridge(PROMPTS)
    with edit.apply(bridge):
        first = bridge(PROMPTS)
    with loaded.apply(bridge):
        second = bridge(PROMPTS)
    assert not torch.allclose(first, clean)
    torch.testing.assert_close(first, second, atol=0, rtol=0)
    assert torch.equal(bridge(PROMPTS), clean)


def test_fitted_strengths_are_in_class_gap_units(bridge):
    acts = cache_residuals(bridge, bridge.tokenizer, TEXTS, pool="last", progress=False)
    x = acts[1].double().numpy()
    toxic = np.array([k == "toxic" for k in KINDS])
    d = x[toxic].mean(0) - x[~toxic].mean(0)
    d /= np.linalg.norm(d)
    gap = (x[toxic] @ d).mean() - (x[~toxic] @ d).mean()
    sub = Edit.fit(acts, KINDS, "subtract", [1], strength=0.5, positive=("toxic",),
                   negative=("nontoxic",))
    clamp = Edit.fit(acts, KINDS, "clamp", [1], strength=0.25, positive=("toxic",),
                     negative=("nontoxic",))
    np.testing.assert_allclose(sub.directions[0].numpy(), d, atol=1e-6)
    assert math.isclose(sub.strengths[0], 0.5 * gap, rel_tol=1e-5)
    assert math.isclose(clamp.strengths[0], (x[~toxic] @ d).mean() + 0.25 * gap, rel_tol=1e-5)


def test_chosen_classes_direction_equals_numpy_mean_difference():
    rng = np.random.default_rng(0)
    acts = rng.normal(size=(2, 30, 8))
    labels = ["neutral"] * 10 + ["biased"] * 10 + ["toxic"] * 10
    d = harmful_direction(acts, labels, layer=1, positive=("toxic",), negative=("neutral",))
    expected = acts[1, 20:].mean(0) - acts[1, :10].mean(0)
    np.testing.assert_allclose(d.numpy(), expected / np.linalg.norm(expected), atol=1e-6)
    with pytest.raises(UsageError, match="both positive and negative"):
        harmful_direction(acts, labels, layer=1, positive=("toxic",))
    with pytest.raises(UsageError, match="No example has a negative label"):
        harmful_direction(acts, labels, layer=1, positive=("toxic",), negative=("nontoxic",))


def test_edit_on_hooked_transformer_equals_the_bridge(tiny):
    model, tok = tiny("tiny-llama")
    bridge, hooked = HookBridge(model, tok), hooked_from_hf(model, tok)
    d = torch.nn.functional.normalize(torch.randn(model.config.hidden_size), dim=0)
    ids = torch.tensor([tok(TEXTS[0])["input_ids"]])
    for edit in (Edit.from_direction(d, "clamp", layers=[0, 2], threshold=0.1),
                 Edit.from_direction(d, "subtract", layers=[1], alpha=3.0)):
        with edit.apply(bridge):
            expected = bridge(ids)
        with edit.apply(hooked):
            got = hooked(ids)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
