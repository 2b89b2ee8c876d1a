"""Residual caching, layer probes, harmful directions and edits, against independent references."""

import copy
import hashlib

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from lens_safety.caching import cache_residuals, pool_batch
from lens_safety.directions import harmful_direction, load_direction, save_direction
from lens_safety.editing import ablate, orthogonalize, orthogonalize_permanently
from lens_safety.hooked import generate, hooked_from_hf
from lens_safety.probes import LayerProbes
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


def _direction(d_model: int, seed: int = 1) -> torch.Tensor:
    d = torch.randn(d_model, generator=torch.Generator().manual_seed(seed))
    return d / d.norm()


def _state_hash(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


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

    import lens_safety.caching as caching
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


# ---------------------------------------------------------------- probes


def _synthetic(n_per_class=30, n_layers=3, d=8, seed=0):
    """Three classes; harm is readable more strongly at deeper layers."""
    rng = np.random.default_rng(seed)
    labels = np.array(["neutral", "biased", "toxic"] * n_per_class)
    acts = rng.normal(size=(n_layers, len(labels), d))
    for layer in range(n_layers):
        acts[layer, labels == "biased", 0] += 0.6 * layer
        acts[layer, labels == "toxic", 1] += 0.6 * layer
    return acts.astype(np.float32), labels


def _reference_scores(x, y, folds):
    """Direct scikit-learn: fit on each training fold, predict the held-out fold."""
    classes = np.unique(y)
    proba = np.zeros((len(y), len(classes)))
    predicted = np.empty(len(y), dtype=y.dtype)
    for train, test in folds.split(x, y):
        pipe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(x[train],
                                                                                     y[train])
        proba[test] = pipe.predict_proba(x[test])
        predicted[test] = pipe.predict(x[test])
    auroc = (roc_auc_score(y == classes[1], proba[:, 1]) if len(classes) == 2 else
             roc_auc_score(y, proba, multi_class="ovr", average="macro"))
    return accuracy_score(y, predicted), f1_score(y, predicted, average="macro"), auroc


@pytest.mark.parametrize("task", ["binary", "multiclass"])
def test_probe_scores_match_sklearn(task):
    acts, labels = _synthetic()
    probes = LayerProbes(task=task, n_splits=5, seed=3).fit(acts, labels)
    y = np.isin(labels, ["biased", "toxic"]).astype(int) if task == "binary" else labels
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=3)
    for layer in range(len(acts)):
        row = probes.scores_.iloc[layer]
        expected = _reference_scores(acts[layer], y, folds)
        assert row["layer"] == layer
        np.testing.assert_allclose([row["accuracy"], row["macro_f1"], row["auroc"]], expected,
                                   atol=1e-12)
    assert probes.best_layer_ == int(probes.scores_["auroc"].idxmax()) == 2
    majority = max(np.mean(y == c) for c in np.unique(y))
    assert probes.chance_ == pytest.approx(majority)
    assert probes.predict_proba(acts[2]).shape == (len(labels), 2 if task == "binary" else 3)
    fig = probes.figure()
    assert len(fig.data) == 3
    assert any(shape.line.dash == "dash" and shape.y0 == pytest.approx(probes.chance_)
               for shape in fig.layout.shapes)


def test_probe_errors():
    acts, labels = _synthetic()
    with pytest.raises(ValueError, match="Only one class"):
        LayerProbes().fit(acts[:, labels == "neutral"], labels[labels == "neutral"])
    with pytest.raises(ValueError, match="Empty"):
        LayerProbes().fit(acts[:, :0], labels[:0])
    with pytest.raises(ValueError, match="must match"):
        LayerProbes().fit(acts, labels[:-1])
    with pytest.raises(ValueError, match="n_splits"):
        LayerProbes(n_splits=5).fit(acts[:, :9], labels[:9])
    with pytest.raises(ValueError, match="task"):
        LayerProbes(task="ternary")


# ---------------------------------------------------------------- directions


def _planted(sign=1.0, n=200, d=16, seed=0):
    rng = np.random.default_rng(seed)
    u = rng.normal(size=d)
    u /= np.linalg.norm(u)
    y = rng.integers(0, 2, size=n)
    acts = rng.normal(size=(2, n, d)) * 0.3
    acts[1] += sign * 2.0 * y[:, None] * u
    labels = np.where(y == 1, "toxic", "neutral")
    return acts.astype(np.float32), labels, torch.tensor(u, dtype=torch.float32), y


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("method", ["mean_diff", "probe", "pca"])
def test_direction_recovers_planted_sign(method, sign):
    acts, labels, u, y = _planted(sign)
    d = harmful_direction(acts, labels, layer=1, method=method)
    assert d.shape == (16,) and d.dtype == torch.float32
    assert d.norm().item() == pytest.approx(1.0, abs=1e-6)
    projection = torch.from_numpy(acts[1]) @ d
    assert projection[y == 1].mean() > projection[y == 0].mean()  # harmful projects higher
    assert (d @ u).item() * sign > (0.99 if method == "mean_diff" else 0.9)


def test_mean_diff_equals_float64_reference():
    acts, labels, _, y = _planted()
    x = acts[1].astype(np.float64)
    ref = x[y == 1].mean(0) - x[y == 0].mean(0)
    d = harmful_direction(torch.from_numpy(acts), labels, layer=1)
    np.testing.assert_allclose(d.numpy(), ref / np.linalg.norm(ref), atol=1e-7)


def test_direction_errors_and_roundtrip(tmp_path):
    acts, labels, _, _ = _planted()
    with pytest.raises(ValueError, match="Only one class"):
        harmful_direction(acts, np.array(["neutral"] * len(labels)), layer=1)
    with pytest.raises(ValueError, match="Empty"):
        harmful_direction(acts[:, :0], labels[:0], layer=1)
    with pytest.raises(ValueError, match="out of range"):
        harmful_direction(acts, labels, layer=2)
    with pytest.raises(ValueError, match="must match"):
        harmful_direction(acts, labels[:-1], layer=1)
    with pytest.raises(ValueError, match="method"):
        harmful_direction(acts, labels, layer=1, method="ica")
    d = harmful_direction(acts, labels, layer=1)
    save_direction(tmp_path / "d.safetensors", d, model="tiny-gpt2", hook="resid_post",
                   layer=1, method="mean_diff")
    loaded, meta = load_direction(tmp_path / "d.safetensors")
    assert torch.equal(loaded, d)
    assert meta == {"model": "tiny-gpt2", "hook": "resid_post", "layer": 1, "method": "mean_diff"}


# ---------------------------------------------------------------- edits


@pytest.mark.parametrize("backend", ["bridge", "hooked"])
def test_ablate_project_leaves_no_component(backends, backend):
    _, tok, bridge, hooked = backends("tiny-llama")
    model = bridge if backend == "bridge" else hooked
    d = _direction(64)
    ids, mask = bridge.tokenize(TEXTS[:3])
    names = [f"blocks.{layer}.hook_{hook}" for layer in range(4) for hook in RESID]

    def cached(**kwargs):
        if backend == "bridge":
            return bridge.run_with_cache(ids, names, attention_mask=mask)[1]
        return hooked.run_with_cache(ids, names_filter=names, attention_mask=mask)[1]

    before = cached()
    with ablate(model, d):
        after = cached()
    real = mask.bool()
    for name in names:
        x = after[name][real]
        assert ((x @ d).abs() / x.norm(dim=-1)).max() <= 1e-5, name
        assert ((before[name][real] @ d).abs() / before[name][real].norm(dim=-1)).max() > 1e-3
    with ablate(model, d, layers=[0], hooks=("resid_pre",), mode="subtract", alpha=0.5):
        shifted = cached()
    name = "blocks.0.hook_resid_pre"
    torch.testing.assert_close(shifted[name][real], before[name][real] - 0.5 * d)
    assert torch.equal(cached()[name], before[name])  # the hooks are gone on exit


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_orthogonalize_matches_hook_ablation_and_restores(backends, name):
    model, tok, bridge, hooked = backends(name)
    d = _direction(64, seed=2)
    ids, mask = bridge.tokenize(TEXTS[:3])
    real = mask.bool()
    digest = _state_hash(model)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    plain = bridge(ids, mask)
    with ablate(bridge, d):
        hooked_logits = bridge(ids, mask)
    with orthogonalize(bridge, d):
        baked = bridge(ids, mask)
    assert (hooked_logits - plain)[real].abs().max() > 1e-2  # the edit does something
    torch.testing.assert_close(baked[real], hooked_logits[real], atol=1e-4, rtol=0)
    assert _state_hash(model) == digest
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    with pytest.raises(RuntimeError, match="boom"):
        with orthogonalize(bridge, d):
            assert _state_hash(model) != digest
            raise RuntimeError("boom")
    assert _state_hash(model) == digest
    torch.testing.assert_close(bridge(ids, mask), plain, atol=0, rtol=0)

    # the same on the HookedTransformer with these weights
    hooked_digest = _state_hash(hooked)
    with ablate(hooked, d):
        ht_hooked = hooked(ids, attention_mask=mask)
    with orthogonalize(hooked, d):
        ht_baked = hooked(ids, attention_mask=mask)
    torch.testing.assert_close(ht_baked[real], ht_hooked[real], atol=1e-4, rtol=0)
    torch.testing.assert_close(ht_hooked[real], hooked_logits[real], atol=1e-4, rtol=0)
    assert _state_hash(hooked) == hooked_digest


def test_orthogonalize_permanently_unties_head(tiny):
    model, tok = tiny("tiny-gpt2")
    model = copy.deepcopy(model)
    bridge = HookBridge(model, tok)
    d = _direction(64, seed=3)
    ids, mask = bridge.tokenize(TEXTS[:2])
    with ablate(bridge, d):
        expected = bridge(ids, mask)
    head_before = model.lm_head.weight.detach().clone()
    orthogonalize_permanently(bridge, d)
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert torch.equal(model.lm_head.weight, head_before)
    assert not model.config.tie_word_embeddings
    assert (model.transformer.wte.weight @ d).abs().max() < 1e-6
    torch.testing.assert_close(bridge(ids, mask)[mask.bool()], expected[mask.bool()], atol=1e-4,
                               rtol=0)


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


@pytest.mark.parametrize("name,mode", [("tiny-llama", "project"), ("tiny-gpt2", "subtract")])
def test_generation_under_ablate_matches_uncached_reference(backends, name, mode):
    model, tok, bridge, hooked = backends(name)
    d, alpha = _direction(64, seed=4), 0.1
    if mode == "project":
        edit = lambda x: x - (x @ d)[..., None] * d  # noqa: E731
    else:
        edit = lambda x: x - alpha * d  # noqa: E731
    ids = torch.tensor([tok("The old house on the hill")["input_ids"]])
    expected = _reference_greedy(model, ids, edit, n_new=6)
    assert not torch.equal(expected, bridge.generate(ids, max_new_tokens=6))  # a visible edit
    with ablate(bridge, d, mode=mode, alpha=alpha):
        got = bridge.generate(ids, max_new_tokens=6)
    assert torch.equal(got, expected)
    with ablate(hooked, d, mode=mode, alpha=alpha):  # the toolkit's generation on TransformerLens
        got_hooked = generate(hooked, ids, max_new_tokens=6)
    assert torch.equal(got_hooked, expected)


def test_edit_errors(backends):
    _, _, bridge, hooked = backends("tiny-gpt2")
    for model in (bridge, hooked):
        with pytest.raises(ValueError, match="d_model=64"):
            with ablate(model, torch.ones(32)):
                pass
        with pytest.raises(ValueError, match="out of range"):
            with ablate(model, torch.ones(64), layers=[7]):
                pass
        with pytest.raises(ValueError, match="d_model=64"):
            with orthogonalize(model, torch.ones(65)):
                pass
    with pytest.raises(ValueError, match="mode"):
        with ablate(bridge, torch.ones(64), mode="clamp"):
            pass
