"""AurA's AUROC against scikit-learn per unit (random data with ties, real activations), its
factors by the paper's formula, and its dampening through the bridge against a plain HF hook."""

import time

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from lens_safety.edits.activation_stats import collect_activations
from lens_safety.edits.aura import (
    AuraError,
    apply_dampening,
    auroc_per_unit,
    dampening_factors,
    fit_aura,
)
from pruning_bridge.bridge import HookBridge


def sklearn_auroc(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    flat = scores.reshape(len(scores), -1)
    return np.array([roc_auc_score(labels, flat[:, j]) for j in range(flat.shape[1])]
                    ).reshape(scores.shape[1:])


def test_auroc_equals_sklearn_with_ties():
    rng = np.random.default_rng(0)
    labels = rng.random(301) < 0.3
    for scores in (rng.integers(0, 5, size=(301, 64)).astype(np.float32),  # many ties
                   rng.normal(size=(301, 8, 5)).astype(np.float32),        # per head
                   np.round(rng.normal(size=(301, 33)) + labels[:, None], 1)):
        got = auroc_per_unit(torch.from_numpy(scores), torch.from_numpy(labels))
        assert got.shape == scores.shape[1:]
        np.testing.assert_allclose(got.numpy(), sklearn_auroc(scores, labels), atol=1e-12)
    # chunking over units changes nothing
    scores = rng.integers(0, 3, size=(50, 40)).astype(np.float32)
    labels = np.arange(50) % 2 == 0
    np.testing.assert_allclose(
        auroc_per_unit(torch.from_numpy(scores), torch.from_numpy(labels), chunk_elements=7),
        sklearn_auroc(scores, labels), atol=1e-12)
    # constant units are chance; a perfect detector is 1, a perfectly reversed one 0
    special = np.stack([np.ones(50), labels * 1.0, labels * -1.0], axis=1)
    assert auroc_per_unit(torch.from_numpy(special), torch.from_numpy(labels)).tolist() == \
        [0.5, 1.0, 0.0]


def test_auroc_is_fast_for_thousands_of_units():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(1000, 4096, generator=gen)
    labels = torch.rand(1000, generator=gen) < 0.5
    start = time.perf_counter()
    auroc_per_unit(scores, labels)
    assert time.perf_counter() - start < 20  # about 2 s on one busy core


def statements(path, n):
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        for part in line.split("\\n"):
            part = part.strip().lstrip("-").strip()
            if len(part) > 20 and part not in out:
                out.append(part)
        if len(out) >= n:
            return out[:n]
    return out


@pytest.fixture(scope="module")
def gpt2(tiny):
    model, tokenizer = tiny("tiny-gpt2")
    return model.eval(), tokenizer, HookBridge(model, tokenizer)


def test_auroc_on_real_activations(gpt2, data_dir):
    _, _, bridge = gpt2
    toxic = statements(data_dir / "toxigen/prompts/hate_asian_1k.txt", 40)
    benign = statements(data_dir / "toxigen/prompts/neutral_asian_1k.txt", 40)
    names = ["blocks.2.mlp.hook_pre", "blocks.2.hook_mlp_out", "blocks.2.attn.hook_z"]
    pos = collect_activations(bridge, toxic, names, pool="max", skip_first=False)
    neg = collect_activations(bridge, benign, names, pool="max", skip_first=False)
    labels = np.r_[np.ones(len(toxic)), np.zeros(len(benign))].astype(bool)
    for name in names:
        fitted = fit_aura(pos[name], neg[name])
        expected = sklearn_auroc(torch.cat([pos[name], neg[name]]).numpy(), labels)
        np.testing.assert_allclose(fitted["auroc"].numpy(), expected, atol=1e-12)
        np.testing.assert_allclose(fitted["factors"].numpy(),
                                   np.where(expected > 0.5, 2 - 2 * expected, 1.0), atol=1e-6)


def test_factors_and_strength():
    auroc = torch.tensor([0.0, 0.3, 0.5, 0.5001, 0.75, 1.0], dtype=torch.float64)
    assert dampening_factors(auroc).tolist() == pytest.approx([1, 1, 1, 0.9998, 0.5, 0.0])
    assert dampening_factors(auroc, strength=0.5).tolist() == \
        pytest.approx([1, 1, 1, 0.9999, 0.75, 0.5])
    assert torch.equal(dampening_factors(auroc, strength=0.0), torch.ones(6))
    x = torch.randn(2, 5, 6, dtype=torch.bfloat16)
    assert torch.equal(apply_dampening(x, dampening_factors(auroc, strength=0.0)), x)


def test_dampening_through_bridge_equals_plain_hook(gpt2):
    """AurA on mlp.hook_pre of every layer: the bridge's hooks (left padding, first real token
    untouched) give the logits of a plain HF forward hook on c_fc run on each text alone."""
    model, tokenizer, bridge = gpt2
    gen = torch.Generator().manual_seed(1)
    factors = {layer: dampening_factors(torch.rand(model.config.n_embd * 4, generator=gen,
                                                   dtype=torch.float64))
               for layer in range(model.config.n_layer)}
    texts = ["Hello there, how are you doing today?", "Fine", "A third text of some length"]

    def bridge_hook(layer):
        return lambda x, hook: apply_dampening(x, factors[layer], bridge.input_mask)

    with bridge.hooks([(f"blocks.{layer}.mlp.hook_pre", bridge_hook(layer))
                       for layer in factors]):
        ids, mask = bridge.tokenize(texts)
        logits = bridge(ids, attention_mask=mask)

    def plain_hook(layer):
        def hook(module, args, output):
            out = output * factors[layer]
            out[:, 0] = output[:, 0]  # the first token untouched
            return out
        return hook

    handles = [model.transformer.h[layer].mlp.c_fc.register_forward_hook(plain_hook(layer))
               for layer in factors]
    try:
        for row, text in enumerate(texts):
            one = tokenizer(text, return_tensors="pt").input_ids
            with torch.no_grad():
                expected = model(input_ids=one).logits[0]
            real = mask[row].bool()
            torch.testing.assert_close(logits[row][real], expected, atol=1e-4, rtol=1e-4)
    finally:
        for handle in handles:
            handle.remove()
    assert any(f.min() < 0.9 for f in factors.values())  # the edit is not a no-op


def test_bad_inputs():
    with pytest.raises(AuraError, match="both classes"):
        auroc_per_unit(torch.randn(5, 3), torch.ones(5))
    with pytest.raises(AuraError, match="labels"):
        auroc_per_unit(torch.randn(5, 3), torch.ones(4))
    with pytest.raises(AuraError, match="NaN"):
        auroc_per_unit(torch.tensor([[float("nan")], [1.0]]), torch.tensor([1, 0]))
    with pytest.raises(AuraError, match="differ in shape"):
        fit_aura(torch.randn(5, 3), torch.randn(5, 4))


def test_dampening_runs_through_the_simulated_ndif_round_trip(gpt2):
    model, tokenizer, bridge = gpt2
    remote = HookBridge.remote(model, tokenizer=tokenizer, simulate=True)
    factors = dampening_factors(torch.linspace(0.0, 1.0, 4 * model.config.n_embd,
                                               dtype=torch.float64))
    texts = ["The weather is lovely today.", "Go away"]
    outs = []
    for b in (bridge, remote):
        with b.hooks([("blocks.1.mlp.hook_pre", lambda x, hook: apply_dampening(x, factors))]):
            outs.append(b(texts))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(outs[0], bridge(texts), atol=1e-3)
