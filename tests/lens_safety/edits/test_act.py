"""Linear-AcT against POT's 1-D optimal transport, Mean-AcT and steering by their definitions,
and the causal (layer after layer) fit against a hand-written two-step fit on GPT-2."""

import numpy as np
import ot
import pytest
import torch

from lens_safety.edits.act import (
    ActError,
    apply_linear_act,
    apply_mean_act,
    apply_steering,
    bridge_applier,
    fit_causal,
    fit_causal_in_one_pass,
    fit_linear_act,
    fit_mean_act,
    fit_steering,
    keep_top_heads,
    ot_coupling,
)
from lens_safety.edits.activation_stats import collect_activations
from pruning_bridge.bridge import HookBridge


@pytest.mark.parametrize("n,m", [(7, 7), (5, 8), (13, 4), (1, 3), (100, 37)])
def test_coupling_equals_pot_emd_1d(n, m):
    rng = np.random.default_rng(n * 100 + m)
    a, b = rng.normal(size=n), rng.normal(2.0, 3.0, size=m)
    plan = ot.emd_1d(a, b)  # uniform weights, squared-Euclidean cost
    i, j, mass = ot_coupling(n, m)
    dense = np.zeros((n, m))
    np.add.at(dense, (np.argsort(a)[i.numpy()], np.argsort(b)[j.numpy()]), mass.numpy())
    np.testing.assert_allclose(dense, plan, atol=1e-12)
    assert len(i) <= n + m - 1


def weighted_fit_on_pot_plan(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Least squares b ~ w a + c over POT's optimal plan (weights = the plan's masses)."""
    plan = ot.emd_1d(a, b)
    rows, cols = np.nonzero(plan > 0)
    w, c = np.polyfit(a[rows], b[cols], 1, w=np.sqrt(plan[rows, cols]))
    return w, c


@pytest.mark.parametrize("n,m", [(200, 200), (150, 260)])
def test_linear_act_map_equals_pot_fit(n, m):
    rng = np.random.default_rng(n + m)
    source = np.stack([rng.normal(0, 1, n), rng.exponential(2.0, n), rng.uniform(-3, 1, n)], 1)
    target = np.stack([rng.normal(1, 0.5, m), rng.normal(-2, 4, m), rng.gamma(2.0, 1.0, m)], 1)
    state = fit_linear_act(torch.from_numpy(source).float(), torch.from_numpy(target).float())
    for d in range(3):
        a, b = source[:, d].astype(np.float32).astype(np.float64), \
            target[:, d].astype(np.float32).astype(np.float64)
        w, c = weighted_fit_on_pot_plan(a, b)
        assert state["w"][d].item() == pytest.approx(w, rel=1e-5, abs=1e-6)
        assert state["b"][d].item() == pytest.approx(c, rel=1e-5, abs=1e-5)
        assert state["low"][d].item() == pytest.approx(a.min())
        assert state["high"][d].item() == pytest.approx(a.max())
    if n == m:  # equal sizes: the sorted pairs, as apple/ml-act
        w, c = np.polyfit(np.sort(source[:, 0]), np.sort(target[:, 0]), 1)
        assert state["w"][0].item() == pytest.approx(w, rel=1e-5)


def test_linear_act_transports_onto_target_quantiles():
    gen = torch.Generator().manual_seed(0)
    # target an affine image of the source: the map is exact and lands on the target sample
    source = torch.randn(500, 4, generator=gen, dtype=torch.float64) * 1.5 + 0.3
    target = source * torch.tensor([2.0, 0.5, 1.0, 3.0], dtype=torch.float64) + torch.tensor(
        [3.0, -1.0, 0.0, 0.25], dtype=torch.float64)
    target = target[torch.randperm(500, generator=gen)]  # pairing is not given
    state = fit_linear_act(source, target, support=None)
    torch.testing.assert_close(state["w"], torch.tensor([2.0, 0.5, 1.0, 3.0]))
    torch.testing.assert_close(state["b"], torch.tensor([3.0, -1.0, 0.0, 0.25]), atol=1e-5,
                               rtol=1e-5)
    moved = apply_linear_act(source.float()[None], **state)[0]
    torch.testing.assert_close(moved.sort(0).values, target.float().sort(0).values,
                               atol=1e-4, rtol=1e-5)
    # independent Gaussian samples of the same shape: the map is N(0,1) -> N(3, 2^2)
    a = torch.randn(20000, 1, generator=gen)
    b = torch.randn(15000, 1, generator=gen) * 2 + 3
    state = fit_linear_act(a, b)
    assert state["w"].item() == pytest.approx(2.0, abs=0.05)
    assert state["b"].item() == pytest.approx(3.0, abs=0.05)
    levels = np.linspace(0.02, 0.98, 25)
    moved = apply_linear_act(a[None], **state)[0].flatten().numpy()
    np.testing.assert_allclose(np.quantile(moved, levels), np.quantile(b.numpy(), levels),
                               atol=0.1)


def test_linear_act_support_strength_and_identity():
    gen = torch.Generator().manual_seed(1)
    source = torch.randn(300, 5, generator=gen)
    target = torch.randn(300, 5, generator=gen) * 3 - 2
    state = fit_linear_act(source, target)
    z = torch.randn(2, 7, 5, generator=gen) * 3  # many values outside the source's range
    z[0, 0, 0] = source[:, 0].min()  # the bounds themselves are outside (strict)
    z[0, 1, 0] = source[:, 0].max()
    out = apply_linear_act(z, **state, lam=1.0)
    outside = (z <= state["low"]) | (z >= state["high"])
    assert outside.any() and (~outside).any()
    assert torch.equal(out[outside], z[outside])
    torch.testing.assert_close(out[~outside], (state["w"] * z + state["b"])[~outside])
    half = apply_linear_act(z, **state, lam=0.5)
    torch.testing.assert_close(half[~outside], (0.5 * (state["w"] * z + state["b"])
                                                + 0.5 * z)[~outside])
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        zd = z.to(dtype)
        for fn, kw in ((apply_linear_act, state), (apply_mean_act, fit_mean_act(source, target)),
                       (apply_steering, {"v": torch.ones(5)})):
            assert torch.equal(fn(zd, **kw, lam=0.0), zd)
    # quantile support: the 5th and 95th percentiles, as torch.quantile
    q = fit_linear_act(source, target, support=(0.05, 0.95))
    torch.testing.assert_close(q["low"], torch.quantile(source, 0.05, dim=0))
    torch.testing.assert_close(q["high"], torch.quantile(source, 0.95, dim=0))


def test_first_real_token_untouched():
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(2, 4, 3, generator=gen)
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])  # left padded
    v = torch.tensor([1.0, -2.0, 0.5])
    out = apply_steering(z, v, lam=2.0, attention_mask=mask)
    assert torch.equal(out[0, :3], z[0, :3]) and torch.equal(out[1, 0], z[1, 0])
    torch.testing.assert_close(out[0, 3], z[0, 3] + 2 * v)
    torch.testing.assert_close(out[1, 1:], z[1, 1:] + 2 * v)
    # a decoding step (one position, mask of the whole sequence): edited
    step = apply_steering(z[:, -1:], v, lam=2.0, attention_mask=torch.ones(2, 9))
    torch.testing.assert_close(step, z[:, -1:] + 2 * v)


def test_mean_act_moves_the_mean_onto_the_target():
    gen = torch.Generator().manual_seed(3)
    source = torch.randn(400, 6, generator=gen) * 2 + 1
    target = torch.randn(300, 6, generator=gen) * 0.5 - 4
    source[:, 5] = 7.0  # a dead dimension: left alone
    state = fit_mean_act(source, target)
    moved = apply_mean_act(source[None], **state, lam=1.0)[0]
    torch.testing.assert_close(moved[:, :5].double().mean(0), target[:, :5].double().mean(0),
                               atol=1e-5, rtol=1e-5)
    assert torch.equal(moved[:, 5], source[:, 5])
    torch.testing.assert_close(apply_mean_act(source[None], **state, lam=0.25)[0] - source,
                               0.25 * state["shift"].expand_as(source))


def test_steering_vectors():
    gen = torch.Generator().manual_seed(4)
    heads, d_head = 3, 8
    direction = torch.nn.functional.normalize(torch.randn(heads, d_head, generator=gen), dim=-1)
    source = torch.randn(300, heads, d_head, generator=gen)
    target = torch.randn(300, heads, d_head, generator=gen) + 2.0 * direction
    caa = fit_steering(source, target, "mean_diff")["v"]
    torch.testing.assert_close(caa, target.mean(0) - source.mean(0))
    target[:, 2] = torch.randn(300, d_head, generator=gen)  # head 2 carries no signal
    fitted = fit_steering(source, target, "probe", per_head=True)
    iti = fitted["v"]
    assert iti.shape == (heads, d_head)
    torch.testing.assert_close(iti.norm(dim=-1), torch.ones(heads))
    cosine = (iti[:2] * direction[:2]).sum(-1)
    assert torch.all(cosine > 0.8), cosine  # the probe finds each head's direction, signed
    accuracy = fitted["accuracy"]  # held-out: separable heads high, the blank one at chance
    assert accuracy.shape == (heads,) and torch.all(accuracy[:2] > 0.75), accuracy
    assert abs(accuracy[2].item() - 0.5) < 0.15, accuracy
    top = keep_top_heads(iti, accuracy, 2)
    assert torch.equal(top[:2], iti[:2]) and torch.equal(top[2], torch.zeros(d_head))
    whole = fit_steering(source[:, :2], target[:, :2], "probe")["v"]
    assert whole.shape == (2, d_head) and whole.norm().item() == pytest.approx(1.0)
    z = torch.randn(2, 5, heads, d_head, generator=gen)
    torch.testing.assert_close(apply_steering(z, iti, lam=3.0), z + 3.0 * iti)


@pytest.fixture(scope="module")
def gpt2(tiny):
    model, tokenizer = tiny("tiny-gpt2")
    return model.eval(), tokenizer, HookBridge(model, tokenizer)


SOURCE = ["You are a stupid idiot and everyone hates you.", "Shut up, you worthless fool!",
          "I hate all of them, they are disgusting.", "What a pathetic loser you are.",
          "Get out of here, nobody wants you around.", "Those people are the worst trash."]
TARGET = ["Thank you for your help with the garden.", "The weather is lovely this morning.",
          "We read a book about the history of ships.", "She baked bread for her neighbours.",
          "The museum opens at nine on weekdays.", "He enjoys long walks along the river."]


def test_causal_fit_equals_two_step_fit(gpt2):
    _, _, bridge = gpt2
    names = ["blocks.0.ln2.hook_normalized", "blocks.2.ln2.hook_normalized"]

    def collect(group):
        source = collect_activations(bridge, SOURCE, group, pool="tokens")
        target = collect_activations(bridge, TARGET, group, pool="tokens")
        return {name: (source[name], target[name]) for name in group}

    causal = fit_causal(names, collect, fit_linear_act,
                        bridge_applier(bridge, apply_linear_act, lam=1.0))
    independent = fit_causal(names, collect, fit_linear_act)
    together = fit_causal([names], collect, fit_linear_act,
                          bridge_applier(bridge, apply_linear_act, lam=1.0))
    for key in ("w", "b", "low", "high"):  # one step: both points on the unedited model
        for name in names:
            assert torch.equal(together[name][key], independent[name][key])
    # the first point sees the same model either way; the second sees the first map
    for key in ("w", "b", "low", "high"):
        assert torch.equal(causal[names[0]][key], independent[names[0]][key])
    assert not torch.allclose(causal[names[1]]["w"], independent[names[1]]["w"], atol=1e-3)

    # by hand: fit layer 0, then collect layer 2 under a plain hook applying layer 0's map
    first = fit_linear_act(*collect([names[0]])[names[0]])

    def layer0(z, hook):
        return apply_linear_act(z, **first, lam=1.0, attention_mask=bridge.input_mask)

    with bridge.hooks([(names[0], layer0)]):
        second = fit_linear_act(*collect([names[1]])[names[1]])
    for key in ("w", "b", "low", "high"):
        torch.testing.assert_close(causal[names[0]][key], first[key], atol=0, rtol=0)
        torch.testing.assert_close(causal[names[1]][key], second[key], atol=0, rtol=0)


def test_one_pass_fit_equals_the_two_step_fit_by_hand(gpt2):
    """Per token, capped at 20 tokens per class: the one-pass fit keeps the same tokens and
    gives the hand-written two-step fit (the second point under the first one's map) in one
    forward pass."""
    _, _, bridge = gpt2
    names = ["blocks.0.ln2.hook_normalized", "blocks.2.ln2.hook_normalized"]
    options = dict(pool="tokens", max_tokens=20, seed=3, batch_size=16)

    def collect(name):
        source = collect_activations(bridge, SOURCE, [name], **options)[name]
        return source, collect_activations(bridge, TARGET, [name], **options)[name]

    first = fit_linear_act(*collect(names[0]))

    def layer0(z, hook):
        return apply_linear_act(z, **first, lam=1.0, attention_mask=bridge.input_mask)

    with bridge.hooks([(names[0], layer0)]):
        second = fit_linear_act(*collect(names[1]))
    forwards = []
    original = bridge.forward
    bridge.forward = lambda *a, **k: forwards.append(1) or original(*a, **k)
    try:
        states = fit_causal_in_one_pass(bridge, SOURCE, TARGET, names, fit_linear_act,
                                        apply_linear_act, lam=1.0, pool="tokens",
                                        max_tokens=20, seed=3)
    finally:
        del bridge.forward
    assert len(forwards) == 1
    for name, expected in zip(names, (first, second)):
        for key, value in expected.items():
            torch.testing.assert_close(states[name][key], value, atol=2e-5, rtol=1e-4)
    with pytest.raises(ActError, match="at least one hook"):
        fit_causal_in_one_pass(bridge, SOURCE, TARGET, [], fit_mean_act, apply_mean_act)


def test_bad_inputs():
    with pytest.raises(ActError, match="same trailing shape"):
        fit_linear_act(torch.randn(5, 3), torch.randn(5, 4))
    with pytest.raises(ActError, match="at least 2 samples"):
        fit_mean_act(torch.randn(1, 3), torch.randn(5, 3))
    with pytest.raises(ActError, match="NaN"):
        fit_linear_act(torch.full((3, 2), float("nan")), torch.randn(3, 2))
    with pytest.raises(ActError, match="support"):
        fit_linear_act(torch.randn(5, 3), torch.randn(5, 3), support=(0.9, 0.1))
    with pytest.raises(ActError, match="Unknown steering"):
        fit_steering(torch.randn(5, 3), torch.randn(5, 3), "pca")
    with pytest.raises(ActError, match="per_head"):
        fit_steering(torch.randn(5, 3), torch.randn(5, 3), "probe", per_head=True)
    with pytest.raises(ActError, match="between 0 and 3"):
        keep_top_heads(torch.randn(3, 4), torch.rand(3), 4)
    with pytest.raises(ActError, match="held_out"):
        fit_steering(torch.randn(9, 3), torch.randn(9, 3), "probe", held_out=1.0)
    with pytest.raises(ActError, match="repeat"):
        fit_causal(["a", ["b", "a"]], lambda n: None, fit_mean_act)
    with pytest.raises(ActError, match="no activations for"):
        fit_causal(["a"], lambda n: {}, fit_mean_act)


def plain_logits(model, tokenizer, texts, handles_fn):
    """Each text alone through the HF model with plain PyTorch hooks installed."""
    handles = handles_fn()
    try:
        with torch.no_grad():
            return [model(input_ids=tokenizer(t, return_tensors="pt").input_ids).logits[0]
                    for t in texts]
    finally:
        for handle in handles:
            handle.remove()


def test_maps_through_bridge_equal_plain_hooks(gpt2):
    """ITI-c per head at attn.hook_z and Linear-AcT at ln2.hook_normalized through the bridge
    (left padding, first real token untouched) equal plain hooks on the HF modules: c_proj's
    input holds the heads side by side; ln_2 is the normalized input times weight plus bias."""
    model, tokenizer, bridge = gpt2
    heads, d_model = model.config.n_head, model.config.n_embd
    gen = torch.Generator().manual_seed(5)
    v = torch.nn.functional.normalize(torch.randn(heads, d_model // heads, generator=gen), dim=-1)
    z_name, ln_name = "blocks.1.attn.hook_z", "blocks.2.ln2.hook_normalized"
    source = torch.randn(200, d_model, generator=gen)
    state = fit_linear_act(source, source * 1.5 + 0.2 + 0.1 * torch.randn(200, d_model,
                                                                           generator=gen))
    texts = SOURCE[:3] + ["Hi"]
    with bridge.hooks([
            (z_name, lambda z, hook: apply_steering(z, v, 4.0, bridge.input_mask)),
            (ln_name, lambda z, hook: apply_linear_act(z, **state, lam=0.7,
                                                       attention_mask=bridge.input_mask))]):
        ids, mask = bridge.tokenize(texts)
        logits = bridge(ids, attention_mask=mask)

    def handles():
        block1, ln2 = model.transformer.h[1], model.transformer.h[2].ln_2

        def steer(module, args):
            x = args[0].clone()
            x[:, 1:] += 4.0 * v.reshape(-1)
            return (x,)

        def transport(module, args, output):
            x = args[0]
            normed = (x - x.mean(-1, keepdim=True)) / torch.sqrt(
                x.var(-1, keepdim=True, unbiased=False) + module.eps)
            inside = (state["low"] < normed) & (normed < state["high"])
            moved = torch.where(inside, 0.7 * (state["w"] * normed + state["b"]) + 0.3 * normed,
                                normed)
            moved[:, 0] = normed[:, 0]
            return moved * module.weight + module.bias

        return [block1.attn.c_proj.register_forward_pre_hook(steer),
                ln2.register_forward_hook(transport)]

    expected = plain_logits(model, tokenizer, texts, handles)
    unedited = plain_logits(model, tokenizer, texts, list)
    for row, ref in enumerate(expected):
        real = mask[row].bool()
        torch.testing.assert_close(logits[row][real], ref, atol=1e-4, rtol=1e-4)
        if len(ref) > 1:
            assert not torch.allclose(ref, unedited[row], atol=1e-3)


def test_maps_run_through_the_simulated_ndif_round_trip(gpt2):
    """The apply functions travel to an NDIF server as source: the simulated round trip
    (serialise, rebuild with the server's whitelist, run) equals the local run."""
    model, tokenizer, bridge = gpt2
    remote = HookBridge.remote(model, tokenizer=tokenizer, simulate=True)
    gen = torch.Generator().manual_seed(6)
    d_model, heads = model.config.n_embd, model.config.n_head
    linear = fit_linear_act(torch.randn(100, d_model, generator=gen),
                            torch.randn(100, d_model, generator=gen) * 2 + 0.5)
    mean = fit_mean_act(torch.randn(100, d_model, generator=gen),
                        torch.randn(100, d_model, generator=gen) + 1)
    v = torch.randn(heads, d_model // heads, generator=gen)

    def hooks():
        return [("blocks.0.ln2.hook_normalized", lambda z, hook: apply_linear_act(z, **linear)),
                ("blocks.1.hook_mlp_out", lambda z, hook: apply_mean_act(z, **mean, lam=0.5)),
                ("blocks.2.attn.hook_z", lambda z, hook: apply_steering(z, v, lam=2.0))]

    texts = TARGET[:2]
    outs = []
    for b in (bridge, remote):
        with b.hooks(hooks()):
            outs.append(b(texts))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(outs[0], bridge(texts), atol=1e-3)
    assert remote.traffic.requests >= 1
