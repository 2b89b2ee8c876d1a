"""Layer probes against scikit-learn run directly, and the harmful probability they give."""


import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from lens_safety.probing.probes import LayerProbes, harmful_probability

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


@pytest.mark.parametrize("task", ["binary", "multiclass"])
def test_harmful_probability_equals_sklearn_fitted_on_all_the_data(task):
    """P(harmful) of a binary probe; 1 - P(neutral) of a three-class one; scikit-learn's
    pipeline fitted on every row of the layer as the reference."""
    acts, labels = _synthetic()
    probes = LayerProbes(task=task).fit(acts, labels)
    y = np.isin(labels, ["biased", "toxic"]).astype(int) if task == "binary" else labels
    reference = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(acts[2], y)
    proba = reference.predict_proba(acts[2])
    expected = (proba[:, list(reference.classes_).index(1)] if task == "binary"
                else 1.0 - proba[:, list(reference.classes_).index("neutral")])
    np.testing.assert_allclose(harmful_probability(probes, acts[2], layer=2), expected,
                               atol=1e-6)
