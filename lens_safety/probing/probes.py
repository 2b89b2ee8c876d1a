"""Linear probes per layer: how linearly readable is harm at each depth of the residual stream?

    probes = LayerProbes(task="binary").fit(acts, prompts.labels)  # acts: [n_layers, n, d]
    probes.scores_       # DataFrame: layer, accuracy, macro_f1, auroc (cross-validated)
    probes.best_layer_   # the "most harmful layer": best AUROC, ties broken by accuracy
    probes.figure()      # plotly: the metrics per layer and the majority-class chance level

Each layer gets ``StandardScaler -> LogisticRegression``, scored out of fold with stratified
k-fold cross-validation (the same folds for every layer); a final probe per layer is then fitted
on all the data (``probes_``) to score new activations. ``task="binary"`` is harmful (biased or
toxic) vs neutral; ``task="multiclass"`` keeps neutral / biased / toxic (one-vs-rest macro AUROC).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from tqdm.auto import tqdm

from pruning_bridge.common import UsageError

from ..data.prompts import HARMFUL_LABELS

TASKS = ("binary", "multiclass")


def binary_labels(labels: Sequence) -> np.ndarray:
    """1 for harmful, 0 for neutral: strings in ``HARMFUL_LABELS`` ("biased", "toxic"), or
    numbers other than 0 (``PromptSet.label_ids``: neutral=0, biased=1, toxic=2)."""
    labels = np.asarray(labels)
    if labels.dtype.kind in "USO":
        unknown = sorted(set(labels.tolist()) - {"neutral", *HARMFUL_LABELS})
        if unknown:
            raise UsageError(f"Unknown label(s) {unknown[:5]}; expected neutral, biased, toxic.")
        return np.isin(labels, HARMFUL_LABELS).astype(np.int64)
    return (labels != 0).astype(np.int64)


def as_array(acts) -> np.ndarray:
    """Activations (torch tensor or array) as a float numpy array."""
    if hasattr(acts, "detach"):
        acts = acts.detach().cpu().float().numpy()
    return np.asarray(acts)


def check_data(acts: np.ndarray, labels: np.ndarray, ndim: int = 3) -> None:
    """Clear errors for empty data, a shape mismatch, or a single class."""
    if acts.ndim != ndim:
        expected = "[n_layers, n_examples, d_model]" if ndim == 3 else "[n_examples, d_model]"
        raise UsageError(f"Activations must be {expected}; got shape {tuple(acts.shape)}.")
    n = acts.shape[-2]
    if n == 0 or len(labels) == 0:
        raise UsageError("Empty data set: no examples to fit. Cache residuals for some prompts.")
    if len(labels) != n:
        raise UsageError(f"{len(labels)} labels for {n} examples: they must match one to one.")
    classes = np.unique(labels)
    if len(classes) < 2:
        raise UsageError(f"Only one class ({classes[0]!r}) in the labels: a probe or direction "
                         f"needs both harmful and neutral examples.")


def probe_pipeline(C: float = 1.0, max_iter: int = 2000) -> Pipeline:
    """The per-layer probe: standardise, then (L2-regularised) logistic regression."""
    return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))


def _auroc(y: np.ndarray, proba: np.ndarray, classes: np.ndarray) -> float:
    if len(classes) == 2:
        return float(roc_auc_score(y == classes[1], proba[:, 1]))
    return float(roc_auc_score(y, proba, multi_class="ovr", average="macro", labels=classes))


class LayerProbes:
    """Cross-validated logistic-regression probes, one per layer (scikit-learn style)."""

    def __init__(self, task: str = "binary", n_splits: int = 5, C: float = 1.0, seed: int = 0,
                 max_iter: int = 2000, progress: bool = False):
        if task not in TASKS:
            raise UsageError(f"Unknown task {task!r}; use one of {', '.join(TASKS)}.")
        self.task, self.n_splits, self.C, self.seed = task, n_splits, C, seed
        self.max_iter, self.progress = max_iter, progress

    def targets(self, labels: Sequence) -> np.ndarray:
        """The probe's classes for ``labels``: 0/1 (binary) or the labels as given (multiclass)."""
        return binary_labels(labels) if self.task == "binary" else np.asarray(labels)

    def folds(self) -> StratifiedKFold:
        return StratifiedKFold(n_splits=self.n_splits, shuffle=True, random_state=self.seed)

    def fit(self, acts, labels: Sequence, layers: Sequence[int] | None = None) -> "LayerProbes":
        """Score a probe per layer out of fold, then fit each on all data; ``layers`` names the
        rows of ``acts`` (default 0..n-1, the block indices)."""
        X = as_array(acts)
        y = self.targets(labels)
        check_data(X, y)
        classes, counts = np.unique(y, return_counts=True)
        if counts.min() < self.n_splits:
            raise UsageError(f"n_splits={self.n_splits} needs at least {self.n_splits} examples "
                             f"per class; class {classes[counts.argmin()]!r} has "
                             f"{counts.min()}. Add data or lower n_splits.")
        layers = list(range(len(X))) if layers is None else list(layers)
        if len(layers) != len(X):
            raise UsageError(f"{len(layers)} layer names for {len(X)} rows of activations.")
        self.classes_ = classes
        self.chance_ = float(counts.max() / counts.sum())
        self.layers_ = layers
        rows, self.probes_ = [], []
        for layer, x in zip(tqdm(layers, desc="probes", disable=not self.progress), X):
            proba = cross_val_predict(probe_pipeline(self.C, self.max_iter), x, y,
                                      cv=self.folds(), method="predict_proba")
            predicted = classes[proba.argmax(axis=1)]
            rows.append({"layer": layer, "accuracy": float(accuracy_score(y, predicted)),
                         "macro_f1": float(f1_score(y, predicted, average="macro")),
                         "auroc": _auroc(y, proba, classes)})
            self.probes_.append(probe_pipeline(self.C, self.max_iter).fit(x, y))
        self.scores_ = pd.DataFrame(rows)
        best = self.scores_.sort_values(["auroc", "accuracy", "layer"],
                                        ascending=[False, False, True]).iloc[0]
        self.best_layer_ = int(best["layer"])
        return self

    def predict_proba(self, x, layer: int | None = None) -> np.ndarray:
        """Class probabilities ``[n, n_classes]`` of ``x`` ``[n, d_model]`` by the probe at
        ``layer`` (default: the best layer); for binary, column 1 is the harmful score."""
        if not hasattr(self, "probes_"):
            raise RuntimeError("Call fit(acts, labels) first.")
        layer = self.best_layer_ if layer is None else layer
        if layer not in self.layers_:
            raise UsageError(f"No probe for layer {layer}; fitted layers: {self.layers_}.")
        return self.probes_[self.layers_.index(layer)].predict_proba(as_array(x))

    def figure(self, title: str | None = None):
        """Plotly figure: accuracy, macro-F1 and AUROC per layer, chance as a dashed line."""
        if not hasattr(self, "scores_"):
            raise RuntimeError("Call fit(acts, labels) first.")
        fig = go.Figure()
        for metric, label in (("accuracy", "accuracy"), ("macro_f1", "macro-F1"),
                              ("auroc", "AUROC")):
            fig.add_trace(go.Scatter(x=self.scores_["layer"], y=self.scores_[metric],
                                     mode="lines+markers", name=label))
        fig.add_hline(y=self.chance_, line_dash="dash", line_color="gray",
                      annotation_text=f"chance (majority) {self.chance_:.2f}")
        fig.add_vline(x=self.best_layer_, line_dash="dot", line_color="firebrick",
                      annotation_text=f"best layer {self.best_layer_}")
        fig.update_layout(title=title or f"Linear probe per layer ({self.task})",
                          xaxis_title="layer", yaxis_title="score", yaxis_range=[0, 1.02],
                          template="plotly_white")
        return fig


def harmful_probability(probe: LayerProbes, acts, layer: int) -> np.ndarray:
    """Per-row harmful probability by ``probe`` at ``layer``: P(harmful) for a binary probe,
    1 - P(neutral) for a three-class one."""
    proba = probe.predict_proba(acts, layer=layer)
    classes = list(probe.probes_[probe.layers_.index(layer)].classes_)
    if probe.task == "binary":
        return proba[:, classes.index(1)]
    neutral = [i for i, c in enumerate(classes) if c in ("neutral", 0)]
    if not neutral:
        raise UsageError(f"The multiclass probe has no neutral class (classes: {classes}).")
    return 1.0 - proba[:, neutral[0]]
