"""Routed heads: the balance loss by hand, routing against plain PyTorch hooks, training, I/O."""

import copy
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig

from pruning_bridge.bridge import HookBridge
from pruning_bridge.common import UsageError
from pruning_bridge.heads.importance import gradient_head_importance, mean_gate_importance
from pruning_bridge.heads.routing import HeadRouter, RoutedHeads, load_balancing_loss, top_k_for
from pruning_bridge.heads.training import RouterTrainingError, lm_loss, train_router, training_windows
from pruning_bridge.pruning.weight_sweep import calibration_texts

ARCHS = ["tiny-llama", "tiny-qwen3", "tiny-gpt2"]


def ids(n=2, length=12, seed=0):
    return torch.randint(0, 50000, (n, length), generator=torch.Generator().manual_seed(seed))


def attn_of(model, layer):
    if model.config.model_type == "gpt2":
        return model.transformer.h[layer].attn.c_proj, model.transformer.h[layer]
    return model.model.layers[layer].self_attn.o_proj, model.model.layers[layer]


def reference_routed_logits(model, router: RoutedHeads, input_ids):
    """Routing with plain PyTorch hooks: gates from each layer's input, applied at o_proj."""
    handles, gates = [], {}
    for layer in router.layers:
        o_proj, block = attn_of(model, layer)

        def read(module, args, kwargs, layer=layer):
            x = args[0] if args else kwargs["hidden_states"]
            gates[layer] = router.routers[str(layer)](x, router.top_k).gates

        def gate(module, args, layer=layer):
            z = args[0]
            heads = z.view(*z.shape[:-1], router.n_heads, -1) * gates[layer].unsqueeze(-1)
            return (heads.reshape(z.shape).to(z.dtype),)

        handles += [block.register_forward_pre_hook(read, with_kwargs=True),
                    o_proj.register_forward_pre_hook(gate)]
    try:
        with torch.no_grad():
            return model(input_ids).logits
    finally:
        for h in handles:
            h.remove()


# ------------------------------------------------------------------------- balance loss
def test_balance_loss_matches_hand_computation():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]])
    mask = torch.tensor([[True, False, False], [False, True, False]])
    # f = [0.5, 0.5, 0], P = [0.4, 0.4, 0.2]: 3 * (0.5*0.4 + 0.5*0.4 + 0) = 1.2
    assert load_balancing_loss(probs, mask).item() == pytest.approx(1.2)
    mask2 = torch.tensor([[True, True, False], [False, True, True]])
    # f = [0.5, 1, 0.5]: 3 * (0.2 + 0.4 + 0.1) = 2.1
    assert load_balancing_loss(probs, mask2).item() == pytest.approx(2.1)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_balance_loss_is_minimal_for_uniform_routing(k):
    e = 6
    uniform = torch.full((50, e), 1 / e)
    mask = torch.zeros(50, e, dtype=torch.bool)
    for t in range(50):  # a balanced top-k assignment of the ties
        mask[t, [(t + j) % e for j in range(k)]] = True
    assert load_balancing_loss(uniform, mask).item() == pytest.approx(k)
    gen = torch.Generator().manual_seed(0)
    for trial in range(100):  # every token routed alike by a non-uniform p: E * top-k mass of p
        p = torch.softmax(torch.randn(e, generator=gen) * (1 + trial % 4), -1)
        probs = p.expand(40, e)
        topk = torch.zeros_like(probs, dtype=torch.bool).scatter_(
            -1, probs.topk(k, -1).indices, True)
        loss = load_balancing_loss(probs, topk).item()
        assert loss == pytest.approx(e * p.topk(k).values.sum().item(), rel=1e-5)
        assert loss > k


def test_balance_loss_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\[tokens, routed_heads\]"):
        load_balancing_loss(torch.ones(4, 3), torch.ones(4, 2, dtype=torch.bool))


# ------------------------------------------------------------------------- routing
def test_topk_masks_and_gates():
    router = HeadRouter(d_model=16, n_heads=8, n_shared=2,
                        generator=torch.Generator().manual_seed(0))
    x = torch.randn(3, 7, 16)
    for k in (1, 3, 6):
        r = router(x, k)
        assert r.gates.shape == (3, 7, 8) and r.probs.shape == (3, 7, 6)
        assert (r.topk_mask.sum(-1) == k).all()
        assert (r.gates[..., :2] == 1).all()  # shared heads always on
        assert ((r.gates[..., 2:] > 0) == r.topk_mask).all()  # exactly the top-k routed heads
        assert torch.allclose(r.gates.sum(-1), torch.full((3, 7), 2.0 + k))  # MoH scale: k
        chosen = r.probs.topk(k, -1).indices
        assert r.topk_mask.gather(-1, chosen).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_all_heads_with_unit_gates_equal_the_original(tiny, arch):
    model, tok = tiny(arch)
    bridge = HookBridge(model, tok)
    router = RoutedHeads(bridge, n_shared=1, top_k=model.config.num_attention_heads - 1)
    with torch.no_grad():
        for p in router.parameters():
            p.zero_()  # uniform router: every routed gate is exactly 1
        with router.routing(bridge):
            routed = bridge(ids())
        assert torch.allclose(routed, model(ids()).logits, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_routing_matches_plain_pytorch_hooks(tiny, arch):
    model, tok = tiny(arch)
    bridge = HookBridge(model, tok)
    router = RoutedHeads(bridge, n_shared=1, top_k=2, layers=[0, 2], seed=3)
    with torch.no_grad():
        for p in router.parameters():
            p.normal_(0, 1.0, generator=torch.Generator().manual_seed(1))
    with router.routing(bridge):
        routed = bridge(ids())
    reference = reference_routed_logits(model, router, ids())
    assert torch.allclose(routed, reference, atol=1e-5)
    assert not torch.allclose(routed, model(ids()).logits, atol=1e-3)  # routing did something


def test_routed_generation_uses_the_kv_cache_consistently(tiny):
    """Greedy generation with the router equals a cache-free loop of routed forwards."""
    model, tok = tiny("tiny-llama")
    bridge = HookBridge(model, tok)
    router = RoutedHeads(bridge, n_shared=1, top_k=1, seed=2)
    prompt = ids(1, 6)
    with router.routing(bridge):
        generated = bridge.generate(prompt, max_new_tokens=5)
        seq = prompt
        for _ in range(5):
            nxt = bridge(seq)[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert torch.equal(generated, seq)


def test_router_settings_are_checked(tiny):
    model, _ = tiny("tiny-llama")
    with pytest.raises(ValueError, match="top_k must be in"):
        RoutedHeads(model, n_shared=1, top_k=4)
    with pytest.raises(ValueError, match="n_shared"):
        RoutedHeads(model, n_shared=4)
    with pytest.raises(IndexError, match=r"\[7\] are out of range.*4 layers"):
        RoutedHeads(model, layers=[7])
    assert RoutedHeads(model, layers=[-1]).layers == [3]  # negative: from the end, as everywhere
    router = RoutedHeads(model, n_shared=1, top_k=1, layers=[0, 1])
    # 2 of 4 layers routed at 2/4 heads, 2 layers full: (2 * 0.5 + 2) / 4
    assert router.active_fraction == pytest.approx(0.75)
    assert top_k_for(0.75, 4, 1) == 2 and top_k_for(0.1, 4, 1) == 1


def test_save_and_load(tiny, tmp_path):
    model, tok = tiny("tiny-qwen3")
    bridge = HookBridge(model, tok)
    router = RoutedHeads(bridge, n_shared=2, top_k=1, layers=[1, 3], seed=5)
    router.save(tmp_path)
    loaded = RoutedHeads.load(tmp_path, bridge)
    assert loaded.settings() == router.settings()
    for a, b in zip(router.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="trained for"):
        RoutedHeads.load(tmp_path, SimpleNamespace(config=LlamaConfig(
            hidden_size=64, num_attention_heads=4, num_hidden_layers=2)))
    with pytest.raises(UsageError, match="No saved router"):
        RoutedHeads.load(tmp_path / "missing", bridge)


def routed_lm_loss(router, bridge, windows, batch_size=4):
    """Mean LM loss of the routed model over ``windows`` (no gradients)."""
    total, count = 0.0, 0
    with router.routing(bridge):
        for start in range(0, len(windows), batch_size):
            batch = windows[start:start + batch_size]
            total += lm_loss(bridge(batch), batch).item() * len(batch)
            count += len(batch)
    return total / count


# ------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def windows(tiny, data_dir):
    _, tok = tiny("tiny-qwen3")
    return training_windows(tok, calibration_texts(data_dir, n=40), 32)


def test_training_in_bf16_stays_finite_and_beats_an_untrained_router(tiny, windows):
    model, tok = tiny("tiny-qwen3")
    model = copy.deepcopy(model).to(torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bridge = HookBridge(model, tok)
    train = windows[:64]
    untrained = routed_lm_loss(RoutedHeads(bridge, n_shared=1, top_k=2), bridge, train)
    router, log = train_router(bridge, tok, train, n_shared=1, top_k=2, steps=50,
                               batch_size=8, lr=1e-2, progress=False)
    assert len(log.steps) == 50
    for row in log.steps:
        assert all(torch.isfinite(torch.tensor(row[k])) for k in ("lm_loss", "balance_loss"))
    assert all(p.dtype == torch.float32 for p in router.parameters())
    trained = routed_lm_loss(router, bridge, train)
    assert trained < untrained - 5e-3, (trained, untrained)
    for k, v in model.state_dict().items():  # the frozen model is untouched
        assert torch.equal(v, before[k])
    assert all(p.requires_grad for p in model.parameters())  # flags restored


def test_non_finite_router_stops_with_step_and_layer(tiny, windows):
    model, tok = tiny("tiny-llama")
    bridge = HookBridge(model, tok)
    router = RoutedHeads(bridge, n_shared=1, top_k=2)
    with torch.no_grad():
        router.routers["2"].weight[0, 0] = float("inf")
    with pytest.raises(RouterTrainingError, match=r"Step 0: the router of layer 2"):
        train_router(bridge, tok, windows, router=router, steps=3, progress=False)


def test_training_resumes_from_its_checkpoint(tiny, windows, tmp_path):
    model, tok = tiny("tiny-llama")
    kw = dict(n_shared=1, top_k=2, batch_size=4, progress=False, checkpoint_every=5)
    full, full_log = train_router(model, tok, windows, steps=12, **kw)
    train_router(model, tok, windows, steps=7, out=tmp_path, **kw)  # "interrupted" after 7
    assert (tmp_path / "checkpoint.pt").exists()
    resumed, log = train_router(model, tok, windows, steps=12, out=tmp_path, **kw)
    assert [r["step"] for r in log.steps] == list(range(12))
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6)
    assert log.steps[-1]["lm_loss"] == pytest.approx(full_log.steps[-1]["lm_loss"], abs=1e-5)
    assert RoutedHeads.load(tmp_path, model).settings()["top_k"] == 2


# ------------------------------------------------------------------------- importance
def test_mean_gates(tiny, windows):
    model, tok = tiny("tiny-llama")
    bridge = HookBridge(model, tok)
    router = RoutedHeads(bridge, n_shared=1, top_k=2, layers=[0, 1, 3])
    gates = mean_gate_importance(router, bridge, windows[:8], progress=False)
    assert gates.shape == (4, 4)
    assert torch.allclose(gates[:, 0], torch.ones(4))  # shared heads
    assert torch.allclose(gates[2], torch.ones(4))  # layer 2 is not routed
    assert torch.allclose(gates[[0, 1, 3]].sum(1), torch.full((3,), 3.0), atol=1e-5)


def test_gradient_importance_matches_a_plain_pytorch_head_mask(tiny, windows):
    model, tok = tiny("tiny-qwen3")
    batch = windows[:4]
    scores = gradient_head_importance(model, tok, batch, batch_size=4, normalize=False,
                                      progress=False)
    mask = torch.ones(4, 4, requires_grad=True)
    handles = []
    for layer in range(4):
        def gate(module, args, layer=layer):
            z = args[0]
            return ((z.view(*z.shape[:-1], 4, -1) * mask[layer][:, None]).reshape(z.shape),)
        handles.append(model.model.layers[layer].self_attn.o_proj.register_forward_pre_hook(gate))
    try:
        loss = lm_loss(model(batch).logits, batch)
        grad, = torch.autograd.grad(loss, mask)
    finally:
        for h in handles:
            h.remove()
    assert torch.allclose(scores, grad.abs(), rtol=1e-4, atol=1e-7)
    normalized = gradient_head_importance(model, tok, batch, progress=False)
    assert torch.allclose(normalized.norm(dim=1), torch.ones(4), atol=1e-5)
    assert all(p.grad is None for p in model.parameters())


def test_head_figures():
    from pruning_bridge.figures import (head_importance_figure, head_pruning_figure,
                                        router_loss_figure)

    gates = torch.rand(5, 4)
    fig = head_importance_figure(gates, n_shared=1)
    assert torch.allclose(torch.tensor(fig.data[0].z, dtype=torch.float32), gates)
    rows = [{"method": "full", "config": {"active_fraction": 1.0}, "task": "perplexity",
             "value": 20.0}]
    rows += [{"method": m, "config": {"active_fraction": f}, "task": "perplexity", "value": v}
             for m in ("routed", "removed") for f, v in ((0.75, 22.0), (0.5, 30.0))]
    fig = head_pruning_figure(rows)
    assert [t.name for t in fig.data] == ["routed", "removed"]
    assert list(fig.data[0].x) == [50.0, 75.0]
    steps = [{"step": i, "lm_loss": 3 - i / 10, "balance_loss": 2.0} for i in range(5)]
    assert list(router_loss_figure(steps).data[0].y) == [s["lm_loss"] for s in steps]


def test_heads_cli_end_to_end(data_dir, tmp_path, capsys):
    from pruning_bridge.cli import main

    out = tmp_path / "heads"
    argv = ["heads", "--model", "tiny-qwen3", "--steps", "2", "--seq-len", "32",
            "--tasks", "perplexity", "--limit", "1", "--window", "64",
            "--fractions", "0.75,0.5", "--data-dir", str(data_dir), "--out", str(out)]
    assert main(argv) == 0
    assert sorted(p.name for p in out.glob("router_k*")) == ["router_k1", "router_k2"]
    rows = [line for line in (out / "head_sweep.jsonl").read_text().splitlines() if line]
    assert len(rows) == 5  # full, then routed and removed at each fraction
    assert (out / "figure3_head_importance.html").exists()
    assert "most selective" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="2"):  # refused while parsing
        main([*argv[:-6], "--fractions", "0.9,1.5", "--data-dir", str(data_dir),
              "--out", str(out)])
    assert "--fractions: must be at most 1.0" in capsys.readouterr().err
