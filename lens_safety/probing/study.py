"""The probe study as one object: prompt split -> residuals -> layer probes -> harmful direction.

    study = ProbeStudy.build(bridge, tok, ProbeSettings(n_per_class=100), data_dir=...,
                             model_name="smollm2-135m", folder="results/safety")
    study.best_layer, study.direction, study.summary()
    toxic = study.test_prompts("toxic", 20)          # held-out prompts to continue
    study = ProbeStudy.load("results/safety")        # later, without the model

``build`` draws the balanced prompts, splits them (``settings.test_size``, ``settings.seed``),
caches the pooled residuals of both splits, fits the probes per layer on the training split
(cross-validated scores, binary and three-class), checks the binary probes on the held-out
split and extracts the harmful direction at the best layer. Everything that depends on the
split comes from this one object, so no caller rebuilds it with its own constants.

A folder holds ``probe_study.json`` (settings and scores), ``prompts.json`` (the split),
``acts_{train,test}_{hook}_{pool}.safetensors`` (residuals, reused by a rerun with the same
model and prompts; a damaged one is recomputed) and
``direction_{hook}_L{layer}_{method}.safetensors``, each written atomically. ``load`` turns a
damaged or foreign file into one ``UsageError`` naming it.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go
import torch
from sklearn.metrics import accuracy_score, roc_auc_score
from torch import Tensor

from pruning_bridge.common.atomic import write_json_atomic
from pruning_bridge.common.errors import UsageError
from pruning_bridge.common.jsonable import read_json
from pruning_bridge.common.layers import check_layers
from pruning_bridge.evals.tasks import data_source

from ..data.prompts import LABELS, Prompt, PromptSet
from ..figures import projection_histogram
from .caching import cache_residuals, read_tensors, save_tensors
from .directions import harmful_direction, load_direction, save_direction
from .probes import LayerProbes, binary_labels

SUMMARY_FILE = "probe_study.json"
PROMPTS_FILE = "prompts.json"
SCORES = ("chance_binary", "chance_three", "cv_binary", "cv_three_class", "held_out_binary",
          "held_out_projection_auroc", "mean_projection")


@dataclass(frozen=True)
class ProbeSettings:
    """What defines a probe study's numbers: the prompts, the split, where and how to read.

    ``n_per_class``: prompts per label (None: the smallest class). ``test_size``: the held-out
    fraction of distinct texts per label; ``seed`` draws the prompts, the split and the probes'
    folds. ``hook`` / ``pool``: which residual and how it is pooled; ``method``: the direction's
    estimator (``mean_diff``, ``probe``, ``pca``).
    """

    n_per_class: int | None = 100
    test_size: float = 0.25
    seed: int = 0
    hook: str = "resid_post"
    pool: str = "last"
    method: str = "mean_diff"

    def split(self, data_dir=None) -> tuple[PromptSet, PromptSet]:
        """The balanced prompts of ``data_dir`` (None: the hub), split into train and test."""
        prompts = PromptSet.load(data_dir, n_per_class=self.n_per_class, seed=self.seed)
        return prompts.split(test_size=self.test_size, seed=self.seed)


def prompts_of(prompts: PromptSet, label: str, n: int | None = None) -> list[str]:
    """The first ``n`` texts of ``prompts`` with ``label`` (all with None)."""
    if label not in LABELS:
        raise UsageError(f"Unknown label {label!r}; valid labels are {list(LABELS)}.")
    texts = [p.text for p in prompts if p.label == label][:n]
    if not texts:
        raise UsageError(f"The prompt set has no {label} prompts.")
    return texts


def _acts_path(folder: Path | None, split: str, settings: ProbeSettings) -> Path | None:
    if folder is None:
        return None
    return folder / f"acts_{split}_{settings.hook}_{settings.pool}.safetensors"


def _not_saved(path: Path, what: str, error: Exception, fix: str) -> UsageError:
    """The error for a readable ``path`` that does not hold ``what`` (it failed with ``error``)."""
    problem = f"no key {error}" if isinstance(error, KeyError) else str(error).rstrip(".")
    return UsageError(f"{path} is not {what} ({problem}). {fix}")


def _holds(path: Path, acts: Tensor) -> bool:
    """Whether ``path`` is a readable residuals file holding exactly ``acts``."""
    try:
        stored = read_tensors(path, "")[0].get("residuals")
    except UsageError:  # missing or damaged
        return False
    return stored is not None and torch.equal(stored, acts)


def _held_out_scores(binary: LayerProbes, test: PromptSet, test_acts: Tensor,
                     direction: Tensor, layer: int) -> dict[str, Any]:
    """Per-layer held-out accuracy / AUROC of the binary probes, and the direction's AUROC."""
    y_test = binary_labels(test.labels)
    held_out = []
    for probe_layer in binary.layers_:
        score = binary.predict_proba(test_acts[probe_layer].numpy(), probe_layer)[:, 1]
        held_out.append({"layer": probe_layer,
                         "accuracy": float(accuracy_score(y_test, score > 0.5)),
                         "auroc": float(roc_auc_score(y_test, score))})
    projection = (test_acts[layer] @ direction).numpy()
    labels = np.array(test.labels)
    return {"held_out_binary": held_out,
            "held_out_projection_auroc": float(roc_auc_score(y_test, projection)),
            "mean_projection": {label: float(np.mean(projection[labels == label]))
                                for label in LABELS}}


@dataclass
class ProbeStudy:
    """A probe study: its settings, the split, the residuals, the probes and the direction.

    ``scores`` holds the per-layer cross-validated scores (``cv_binary``, ``cv_three_class``),
    the held-out scores of the binary probes (``held_out_binary``), chance levels, the
    direction's held-out AUROC and the mean projection per label. ``binary`` and
    ``three_class`` are the fitted ``LayerProbes`` (refitted on first use after ``load``).
    """

    model_name: str
    settings: ProbeSettings
    data: str
    train: PromptSet
    test: PromptSet
    train_acts: Tensor
    test_acts: Tensor
    best_layer: int
    direction: Tensor
    scores: dict[str, Any]
    folder: Path | None = None
    _binary: LayerProbes | None = field(default=None, repr=False)
    _three_class: LayerProbes | None = field(default=None, repr=False)

    # ------------------------------------------------------------ building and loading

    @classmethod
    def build(cls, model, tokenizer, settings: ProbeSettings = ProbeSettings(), *,
              data_dir=None, model_name: str = "model", folder=None, batch_size: int = 8,
              progress: bool = True) -> ProbeStudy:
        """Run the study on ``model`` (a HookBridge or a TransformerLens model).

        With ``folder`` the study is saved there, and residuals already cached there for the
        same model, prompts and hook are reused.
        """
        folder = Path(folder) if folder is not None else None
        train, test = settings.split(data_dir)
        acts = {}
        for split, prompts in (("train", train), ("test", test)):
            acts[split] = cache_residuals(model, tokenizer, prompts.texts, hook=settings.hook,
                                          pool=settings.pool, batch_size=batch_size,
                                          progress=progress,
                                          store=_acts_path(folder, split, settings))
        binary = LayerProbes(task="binary", seed=settings.seed).fit(acts["train"],
                                                                     train.labels)
        three = LayerProbes(task="multiclass", seed=settings.seed).fit(acts["train"],
                                                                        train.labels)
        layer = binary.best_layer_
        direction = harmful_direction(acts["train"], train.labels, layer,
                                      method=settings.method, seed=settings.seed)
        scores = {"chance_binary": binary.chance_, "chance_three": three.chance_,
                  "cv_binary": binary.scores_.to_dict("records"),
                  "cv_three_class": three.scores_.to_dict("records"),
                  **_held_out_scores(binary, test, acts["test"], direction, layer)}
        study = cls(model_name, settings, data_source(data_dir), train, test, acts["train"],
                    acts["test"], layer, direction, scores, None, binary, three)
        if folder is not None:
            study.save(folder)
        return study

    @classmethod
    def load(cls, folder) -> ProbeStudy:
        """A study saved by ``build(..., folder=...)`` or ``save``; no model needed."""
        folder = Path(folder)
        summary_path, prompts_path = folder / SUMMARY_FILE, folder / PROMPTS_FILE
        if not summary_path.is_file():
            raise UsageError(f"{summary_path} not found: run `python -m lens_safety probe --out "
                             f"{folder}` (or ProbeStudy.build(..., folder=...)) first.")
        if not prompts_path.is_file():
            raise UsageError(f"{prompts_path} not found: {folder} was written by an older "
                             f"version; rerun the probe study into it.")
        fix = f"Rerun the probe study into {folder} (lens-safety probe --out {folder})."
        saved = read_json(summary_path, fix)
        records = read_json(prompts_path, fix)
        try:
            settings = ProbeSettings(**{f.name: saved[f.name] for f in fields(ProbeSettings)})
            model_name, data = saved["model"], saved["data"]
            best_layer, direction_file = int(saved["best_layer"]), saved["direction_file"]
            scores = {k: saved[k] for k in SCORES}
        except (KeyError, TypeError, ValueError) as error:
            raise _not_saved(summary_path, "a probe study's summary", error, fix) from None
        try:
            split = {name: PromptSet(Prompt(r["text"], r["label"], r["source"], r["group"])
                                     for r in records if r["split"] == name)
                     for name in ("train", "test")}
        except (KeyError, TypeError, ValueError) as error:
            raise _not_saved(prompts_path, "a probe study's prompt split", error, fix) from None
        acts = {}
        for name, prompts in split.items():
            path = _acts_path(folder, name, settings)
            if not path.is_file():
                raise UsageError(f"{path} not found (the probe study stores its activations "
                                 f"there); rerun the probe study into {folder}.")
            acts[name] = read_tensors(path, fix)[0].get("residuals")
            if acts[name] is None or acts[name].ndim != 3 or acts[name].shape[1] != len(prompts):
                found = "no residuals" if acts[name] is None else \
                    f"residuals of shape {tuple(acts[name].shape)}"
                raise UsageError(f"{path} holds {found}, not [n_layers, {len(prompts)}, "
                                 f"d_model] for the {name} prompts of {prompts_path}. {fix}")
        direction, _ = load_direction(folder / direction_file)
        return cls(model_name, settings, data, split["train"], split["test"], acts["train"],
                   acts["test"], best_layer, direction, scores, folder)

    def save(self, folder) -> Path:
        """Write the study to ``folder`` (see the module doc), each file atomically; returns the
        folder."""
        folder = Path(folder)
        for split, acts in (("train", self.train_acts), ("test", self.test_acts)):
            path = _acts_path(folder, split, self.settings)
            if not _holds(path, acts):  # ``build`` wrote it with its fingerprint: keep that one
                save_tensors(path, {"residuals": acts})
        save_direction(folder / self.direction_file, self.direction, model=self.model_name,
                       hook=self.settings.hook, layer=self.best_layer,
                       method=self.settings.method)
        records = [{"split": split, "text": p.text, "label": p.label, "source": p.source,
                    "group": p.group}
                   for split, prompts in (("train", self.train), ("test", self.test))
                   for p in prompts]
        write_json_atomic(folder / PROMPTS_FILE, records, indent=1)
        self.folder = folder
        write_json_atomic(folder / SUMMARY_FILE, self.summary(), indent=2)
        return folder

    # ------------------------------------------------------------ what callers need

    @property
    def direction_file(self) -> str:
        """The direction's file name in the study's folder."""
        s = self.settings
        return f"direction_{s.hook}_L{self.best_layer}_{s.method}.safetensors"

    @property
    def binary(self) -> LayerProbes:
        """The harmful-vs-neutral probe per layer (fitted on the training split)."""
        if self._binary is None:
            self._binary = LayerProbes(task="binary", seed=self.settings.seed).fit(
                self.train_acts, self.train.labels)
        return self._binary

    @property
    def three_class(self) -> LayerProbes:
        """The neutral / biased / toxic probe per layer (fitted on the training split)."""
        if self._three_class is None:
            self._three_class = LayerProbes(task="multiclass", seed=self.settings.seed).fit(
                self.train_acts, self.train.labels)
        return self._three_class

    def test_prompts(self, label: str, n: int | None = None) -> list[str]:
        """The first ``n`` held-out prompts with ``label`` (e.g. toxic ones to continue)."""
        return prompts_of(self.test, label, n)

    def direction_at(self, layer: int, method: str | None = None) -> Tensor:
        """A harmful direction at another ``layer`` (and ``method``) from the training split."""
        layer = check_layers([layer], len(self.train_acts))[0]
        return harmful_direction(self.train_acts, self.train.labels, layer,
                                 method=method or self.settings.method, seed=self.settings.seed)

    def summary(self) -> dict[str, Any]:
        """Settings, sizes and scores as a JSON-friendly dict (what ``probe_study.json`` holds)."""
        counts = {label: self.train.counts()[label] + self.test.counts()[label]
                  for label in LABELS}
        summary = {"model": self.model_name, **asdict(self.settings), "data": self.data,
                   "n_train": len(self.train), "n_test": len(self.test), "counts": counts,
                   "best_layer": self.best_layer, **self.scores,
                   "direction_file": self.direction_file}
        if self.folder is not None:
            summary["direction_path"] = str(self.folder / self.direction_file)
        return summary

    def figure(self, title: str | None = None) -> go.Figure:
        """The binary probe's accuracy, macro-F1 and AUROC per layer."""
        return self.binary.figure(title)

    def projection_figure(self, title: str | None = None) -> go.Figure:
        """Held-out projections on the direction at the best layer, one histogram per label."""
        return projection_histogram(self.test_acts[self.best_layer], self.test.labels,
                                    self.direction, title=title)


def run_probe_study(model, tokenizer, *, model_name: str = "model", data_dir=None,
                    n_per_class: int | None = 100, test_size: float = 0.25,
                    hook: str = "resid_post", pool: str = "last", method: str = "mean_diff",
                    seed: int = 0, out_dir=None, batch_size: int = 8,
                    progress: bool = True) -> dict:
    """Deprecated: use ``ProbeStudy.build``. The study's summary, plus ``"direction"`` and
    ``"probes"`` (the binary ``LayerProbes``), as this function used to return."""
    warnings.warn("run_probe_study is deprecated: use ProbeStudy.build(model, tokenizer, "
                  "ProbeSettings(...), data_dir=..., folder=...).", DeprecationWarning,
                  stacklevel=2)
    settings = ProbeSettings(n_per_class=n_per_class, test_size=test_size, seed=seed, hook=hook,
                             pool=pool, method=method)
    study = ProbeStudy.build(model, tokenizer, settings, data_dir=data_dir,
                             model_name=model_name, folder=out_dir, batch_size=batch_size,
                             progress=progress)
    return {**study.summary(), "direction": study.direction, "probes": study.binary}
