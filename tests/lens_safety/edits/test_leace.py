"""LEACE concept erasure, against EleutherAI's concept-erasure and scikit-learn probes."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression

from lens_safety.edits.leace import LeaceEraser, fit_leace
from pruning_bridge.common import UsageError

N = 500
CASES = [(16, 2, False), (24, 3, False), (32, 2, True), (32, 3, True)]  # d, classes, deficient


def make_data(d: int, k: int, seed: int = 0, deficient: bool = False, shift: float = 1.0):
    """Float32 ``x`` ``[N, d]`` with correlated features and class-dependent means, and int
    labels (imbalanced); ``deficient`` makes x rank-deficient with exact column dependencies
    (a duplicate, a doubled and a constant column)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.multinomial(torch.tensor([0.55, 0.3, 0.15][:k]), N, replacement=True,
                               generator=g)
    mix = torch.eye(d, dtype=torch.float64) + torch.randn(d, d, generator=g,
                                                          dtype=torch.float64) / d ** 0.5
    means = shift * torch.randn(k, d, generator=g, dtype=torch.float64)
    x = (torch.randn(N, d, generator=g, dtype=torch.float64) @ mix + means[labels]).float()
    if deficient:
        x[:, 1] = x[:, 0]
        x[:, 3] = 2 * x[:, 2]
        x[:, 5] = 1.5
        assert torch.linalg.matrix_rank(x.double() - x.double().mean(0)) == d - 3
    return x, labels


def class_means(x: torch.Tensor, labels) -> torch.Tensor:
    labels = torch.as_tensor(labels)
    return torch.stack([x.double()[labels == c].mean(0) for c in labels.unique()])


@pytest.mark.parametrize("d,k,deficient", CASES)
def test_matches_concept_erasure(d, k, deficient):
    ce = pytest.importorskip("concept_erasure")
    x, labels = make_data(d, k, seed=d + k, deficient=deficient)
    # The reference with plain LEACE (no shrinkage, no trace constraint), in float64 on the
    # same float32 values: its own float32 path has rounding errors of about 1e-5 by itself.
    z = labels.double() if k == 2 else F.one_hot(labels, k).double()
    ref = ce.LeaceEraser.fit(x.double(), z, shrinkage=False, constrain_cov_trace=False)
    ours = LeaceEraser().fit(x, labels)
    assert ours.rank_ == k - 1 and ours.d_model == d
    torch.testing.assert_close(ours(x).double(), ref(x.double()), atol=1e-5, rtol=0)
    eye = torch.eye(d, dtype=torch.float64)
    torch.testing.assert_close(ours.P, eye - ref.P, atol=1e-9, rtol=0)


@pytest.mark.parametrize("d,k,deficient", CASES)
def test_probe_at_chance_after_erasure(d, k, deficient):
    x, labels = make_data(d, k, seed=d + k, deficient=deficient)
    y = labels.numpy()
    majority = np.bincount(y).max() / len(y)

    def probe_accuracy(data: torch.Tensor) -> float:
        probe = LogisticRegression(max_iter=5000).fit(data.numpy(), y)
        return probe.score(data.numpy(), y)

    erased = LeaceEraser().fit(x, labels)(x)
    assert probe_accuracy(x) > majority + 0.2
    assert abs(probe_accuracy(erased) - majority) < 0.04
    means = class_means(erased, labels)
    torch.testing.assert_close(means, means[:1].expand_as(means), atol=1e-5, rtol=0)
    assert not torch.allclose(class_means(x, labels)[0], class_means(x, labels)[1], atol=0.1)


@pytest.mark.parametrize("d,k,deficient", CASES)
def test_zero_cross_covariance_and_idempotent(d, k, deficient):
    x, labels = make_data(d, k, seed=d + k, deficient=deficient)
    eraser = LeaceEraser().fit(x, labels)
    erased = eraser(x)
    z = F.one_hot(labels, k).double()
    xc, zc = erased.double() - erased.double().mean(0), z - z.mean(0)
    cross = xc.T @ zc / (N - 1)
    torch.testing.assert_close(cross, torch.zeros_like(cross), atol=1e-5, rtol=0)
    raw = x.double() - x.double().mean(0)
    assert (raw.T @ zc / (N - 1)).abs().max() > 0.1
    torch.testing.assert_close(eraser(erased), erased, atol=1e-5, rtol=0)
    # The mean is kept: erasure moves each class onto the overall mean, not elsewhere.
    torch.testing.assert_close(erased.double().mean(0), x.double().mean(0), atol=1e-5, rtol=0)


def test_label_forms_agree():
    x, labels = make_data(20, 3, seed=1)
    by_int = LeaceEraser().fit(x, labels)
    names = np.array(["neutral", "biased", "toxic"])[labels.numpy()]
    by_str = LeaceEraser().fit(x.numpy(), names)
    onehot = LeaceEraser().fit(x, F.one_hot(labels, 3).float())   # all k columns
    for other in (by_str, onehot):
        torch.testing.assert_close(other(x), by_int(x), atol=1e-5, rtol=0)
    assert sorted(by_str.classes_.tolist()) == ["biased", "neutral", "toxic"]
    assert onehot.classes_ is None and onehot.rank_ == 2


def test_no_linear_information_gives_rank_zero(tmp_path):
    """Each row appears once per class: the class means are equal, so there is nothing to
    erase and the eraser must be the identity, not a projection onto rounding noise."""
    x = make_data(12, 2, seed=6)[0][:100]
    twice = torch.cat([x, x])
    labels = torch.cat([torch.zeros(100), torch.ones(100)]).long()
    eraser = LeaceEraser().fit(twice, labels)
    assert eraser.rank_ == 0
    torch.testing.assert_close(eraser(twice), twice, atol=1e-6, rtol=0)
    eraser.save(tmp_path / "rank0.safetensors")
    assert LeaceEraser.load(tmp_path / "rank0.safetensors").rank_ == 0


def test_state_dict_save_load_round_trip(tmp_path):
    x, labels = make_data(16, 3, seed=2)
    names = np.array(["neutral", "biased", "toxic"])[labels.numpy()]
    eraser = LeaceEraser().fit(x, names)
    state = eraser.state_dict()
    assert all(isinstance(t, torch.Tensor) for t in state.values())
    restored = LeaceEraser.from_state_dict(state)
    path = tmp_path / "sub" / "leace.safetensors"
    eraser.save(path, layer=3)
    loaded = LeaceEraser.load(path)
    for other in (restored, loaded):
        assert torch.equal(other(x), eraser(x))
        assert other.rank_ == eraser.rank_ and other.d_model == 16
    assert loaded.classes_.tolist() == eraser.classes_.tolist()
    assert loaded.metadata_ == {"layer": 3}


def test_leading_dims_and_dtype():
    x, labels = make_data(24, 2, seed=3)
    eraser = LeaceEraser().fit(x, labels)
    batch = torch.randn(4, 7, 24)
    out = eraser(batch)
    assert out.shape == batch.shape and out.dtype == torch.float32
    assert torch.equal(out.reshape(-1, 24), eraser(batch.reshape(-1, 24)))
    low = eraser(batch.bfloat16())
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), eraser(batch.bfloat16().float()).bfloat16().float())


def test_fit_leace_on_cached_activations():
    x, labels = make_data(16, 3, seed=4)
    acts = torch.stack([torch.randn(N, 16), x, torch.randn(N, 16)])   # [n_layers, n, d]
    names = np.array(["neutral", "biased", "toxic"])[labels.numpy()]
    direct = LeaceEraser().fit(x, labels)
    for eraser in (fit_leace(acts, names, layer=1), fit_leace(acts.numpy(), labels, layer=1)):
        torch.testing.assert_close(eraser(x), direct(x), atol=1e-5, rtol=0)
    binary = fit_leace(acts, names, layer=1, task="binary")
    assert binary.rank_ == 1
    harmful = torch.as_tensor(names != "neutral")
    means = class_means(binary(x), harmful)
    torch.testing.assert_close(means[0], means[1], atol=1e-5, rtol=0)
    with pytest.raises(UsageError, match="out of range"):
        fit_leace(acts, names, layer=3)
    with pytest.raises(UsageError, match="Unknown label"):
        fit_leace(acts, np.where(names == "toxic", "rude", names), layer=1)
    with pytest.raises(UsageError, match="Unknown task"):
        fit_leace(acts, names, layer=1, task="ternary")


def test_errors():
    x, labels = make_data(16, 2, seed=5)
    with pytest.raises(UsageError, match=r"\[n_examples, d_model\]"):
        LeaceEraser().fit(x[None], labels)
    with pytest.raises(UsageError, match="499 labels for 500"):
        LeaceEraser().fit(x, labels[1:])
    with pytest.raises(UsageError, match="one class"):
        LeaceEraser().fit(x, torch.zeros(N, dtype=torch.long))
    bad = x.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(UsageError, match="NaN"):
        LeaceEraser().fit(bad, labels)
    z = labels.double()
    z[0] = float("inf")
    with pytest.raises(UsageError, match="NaN"):
        LeaceEraser().fit(x, z)
    with pytest.raises(UsageError, match="constant"):
        LeaceEraser().fit(x, torch.ones(N))
    with pytest.raises(UsageError, match="activations are constant"):
        LeaceEraser().fit(torch.ones(N, 16), labels)
    with pytest.raises(UsageError, match="not fitted"):
        LeaceEraser()(x)
    eraser = LeaceEraser().fit(x, labels)
    with pytest.raises(UsageError, match="d_model=16"):
        eraser(torch.randn(2, 3, 32))
    with pytest.raises(UsageError, match="missing"):
        LeaceEraser.from_state_dict({"mean": eraser.mean_})
