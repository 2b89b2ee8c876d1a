"""Harmful directions (mean difference, probe, PCA) on planted data, against a float64
reference, and their files."""


import numpy as np
import pytest
import torch

from lens_safety.probing.directions import harmful_direction, load_direction, save_direction

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
