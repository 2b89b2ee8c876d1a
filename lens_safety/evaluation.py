"""Does an edit make generations less toxic, and what does it cost? Before/after in one report.

    report = evaluate_edit(model, tok, direction, toxic_prompts=test_toxic,
                           neutral_prompts=test_neutral, edit="project",
                           probe=probes, probe_layer=probes.best_layer_,
                           perplexity_text=load_wikitext2(data_dir=...), mmlu={"limit": 100})
    print(report)            # metric | before | after | delta
    report.to_json("edit.json"); report.to_pandas()

``model`` is a ``pruning_bridge.HookBridge``, a TransformerLens model (``lens_safety.hooked``)
or a plain Hugging Face causal LM (wrapped in a HookBridge). Every metric is computed on the
unedited model and then inside the edit's context manager (:func:`lens_safety.editing.ablate`
for ``project`` / ``subtract``, :func:`lens_safety.editing.orthogonalize`), so the model is
unchanged afterwards.

Metrics (each only when requested):

- ``toxicity_toxic`` / ``toxicity_neutral``: mean scorer toxicity of greedy, fixed-length
  continuations (``max_new_tokens`` new tokens, end-of-text suppressed) of the toxic / neutral
  prompts; the continuation alone is scored, not the prompt.
- ``probe_harmful_toxic`` / ``probe_harmful_neutral``: mean harmful probability that a fitted
  :class:`~lens_safety.probes.LayerProbes` assigns to prompt + continuation, read from the
  residual stream at ``probe_layer`` (``hook``, ``pool``) of the model being evaluated (under
  the edit for ``after``).
- ``perplexity``: :func:`pruning_bridge.evals.perplexity` over ``max_windows`` windows of
  ``window`` tokens of ``perplexity_text`` (a TransformerLens model runs through a small adapter,
  row by row without padding).
- ``mmlu_accuracy``: :func:`pruning_bridge.evals.mmlu_accuracy` with the ``mmlu`` kwargs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pandas as pd

from pruning_bridge.bridge import HookBridge
from pruning_bridge.common import JsonDataclass, UsageError
from pruning_bridge.evals import mmlu_accuracy, perplexity

from .backend import as_lm, greedy_continuations, is_bridge, is_hooked, residual_hooks
from .caching import cache_residuals
from .editing import ablate, orthogonalize
from .toxicity import get_scorer, scorer_name

EDITS = ("project", "subtract", "orthogonalize")


# ---------------------------------------------------------------- the report


@dataclass
class EditReport(JsonDataclass):
    """Metrics before and after an edit, the continuations, and the settings that produced them."""

    before: dict[str, float]
    after: dict[str, float]
    continuations: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def delta(self) -> dict[str, float]:
        """after - before, per metric."""
        return {k: self.after[k] - self.before[k] for k in self.before if k in self.after}

    def to_pandas(self):
        """One row per metric: ``metric, before, after, delta``."""
        return pd.DataFrame([{"metric": k, "before": v, "after": self.after.get(k),
                              "delta": self.delta.get(k)} for k, v in self.before.items()])

    def __str__(self) -> str:
        width = max([len("metric")] + [len(k) for k in self.before])
        lines = [f"edit={self.settings.get('edit')} alpha={self.settings.get('alpha')}",
                 f"{'metric':<{width}}  {'before':>10}  {'after':>10}  {'delta':>10}"]
        for k, v in self.before.items():
            a = self.after.get(k, float("nan"))
            lines.append(f"{k:<{width}}  {v:>10.4f}  {a:>10.4f}  {a - v:>+10.4f}")
        return "\n".join(lines)


# ---------------------------------------------------------------- helpers


def harmful_probability(probe, acts, layer: int) -> np.ndarray:
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


def _edit_context(model, direction, edit, alpha, layers, hooks):
    if edit == "orthogonalize":
        return orthogonalize(model, direction)
    return ablate(model, direction, layers=layers, hooks=hooks, mode=edit, alpha=alpha)


def _measure(model, tokenizer, *, prompts, scorer, probe, probe_layer, hook, pool,
             perplexity_text, window, max_windows, mmlu, max_new_tokens, batch_size, progress):
    """Metrics and continuations of ``model`` as it is now (hooks / edits active)."""
    metrics: dict[str, float] = {}
    texts: dict[str, list[str]] = {}
    for kind, kind_prompts in prompts.items():
        if not kind_prompts:
            continue
        conts = greedy_continuations(model, tokenizer, kind_prompts, max_new_tokens,
                                       batch_size, progress)
        scores = [float(s) for s in scorer(conts)]
        texts[kind] = conts
        texts[f"{kind}_scores"] = scores
        metrics[f"toxicity_{kind}"] = float(np.mean(scores))
        if probe is not None:
            acts = cache_residuals(model, tokenizer,
                                   [p + c for p, c in zip(kind_prompts, conts)], hook=hook,
                                   pool=pool, layers=[probe_layer], batch_size=batch_size,
                                   progress=False)[0]
            metrics[f"probe_harmful_{kind}"] = float(
                np.mean(harmful_probability(probe, acts, probe_layer)))
    lm = as_lm(model)
    if perplexity_text is not None:
        metrics["perplexity"] = perplexity(lm, tokenizer, perplexity_text, window=window,
                                           max_windows=max_windows, batch_size=batch_size,
                                           progress=progress).value
    if mmlu is not None:
        kwargs = {"batch_size": batch_size, "progress": progress, **mmlu}
        metrics["mmlu_accuracy"] = float(mmlu_accuracy(lm, tokenizer, **kwargs).value)
    return metrics, texts


# ---------------------------------------------------------------- the verb


def evaluate_edit(model, tokenizer, direction, *, toxic_prompts: Sequence[str],
                  neutral_prompts: Sequence[str] = (), edit: str = "project", alpha: float = 1.0,
                  layers: Sequence[int] | None = None, hooks: Sequence[str] | None = None,
                  max_new_tokens: int = 20, scorer="profanity", probe=None,
                  probe_layer: int | None = None, hook: str = "resid_post", pool: str = "last",
                  perplexity_text: str | None = None, window: int = 256,
                  max_windows: int | None = 4, mmlu: dict | None = None, batch_size: int = 8,
                  progress: bool = True) -> EditReport:
    """Metrics of ``model`` before and under ``edit`` of ``direction`` (see the module doc).

    ``edit``: ``"project"`` (``x - (x.d) d``) or ``"subtract"`` (``x - alpha d``) at
    ``blocks.L.hook_{h}`` for L in ``layers`` (default all) and h in ``hooks`` (default: every
    residual hook); or
    ``"orthogonalize"`` (the projection baked into every residual writer; all layers).
    ``scorer``: a name for :func:`lens_safety.toxicity.get_scorer` or a callable.
    ``probe``: a fitted ``LayerProbes``; ``probe_layer`` defaults to its best layer.
    ``mmlu``: kwargs of :func:`pruning_bridge.evals.mmlu_accuracy` (e.g. ``{"limit": 100,
    "data_dir": ...}``), or None to skip.
    """
    if edit not in EDITS:
        raise UsageError(f"Unknown edit {edit!r}; use one of {', '.join(EDITS)}.")
    if edit == "orthogonalize" and layers is not None:
        raise UsageError("edit='orthogonalize' edits every residual writer (all layers); "
                         "leave layers=None or use edit='project' for chosen layers.")
    toxic_prompts = [toxic_prompts] if isinstance(toxic_prompts, str) else list(toxic_prompts)
    neutral_prompts = ([neutral_prompts] if isinstance(neutral_prompts, str)
                       else list(neutral_prompts))
    if not toxic_prompts and not neutral_prompts:
        raise UsageError("Pass some toxic_prompts (and optionally neutral_prompts) to continue.")
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise UsageError("Pass a tokenizer (the model has none).")
    if not is_bridge(model) and not is_hooked(model):
        model = HookBridge(model, tokenizer)
    if is_bridge(model) and model.tokenizer is None:
        raise UsageError("The HookBridge has no tokenizer; build it with HookBridge(model, tok).")
    if probe is not None:
        if not hasattr(probe, "probes_"):
            raise UsageError("The probe is not fitted: call probe.fit(acts, labels) first.")
        probe_layer = probe.best_layer_ if probe_layer is None else int(probe_layer)
    score = get_scorer(scorer)
    common = dict(prompts={"toxic": toxic_prompts, "neutral": neutral_prompts}, scorer=score,
                  probe=probe, probe_layer=probe_layer, hook=hook, pool=pool,
                  perplexity_text=perplexity_text, window=window, max_windows=max_windows,
                  mmlu=mmlu, max_new_tokens=max_new_tokens, batch_size=batch_size,
                  progress=progress)
    before, texts_before = _measure(model, tokenizer, **common)
    with _edit_context(model, direction, edit, alpha, layers, hooks):
        after, texts_after = _measure(model, tokenizer, **common)

    continuations = []
    for kind, kind_prompts in common["prompts"].items():
        for i, prompt in enumerate(kind_prompts):
            continuations.append({
                "kind": kind, "prompt": prompt,
                "before": texts_before[kind][i], "after": texts_after[kind][i],
                "toxicity_before": texts_before[f"{kind}_scores"][i],
                "toxicity_after": texts_after[f"{kind}_scores"][i],
            })
    settings = {
        "edit": edit, "alpha": alpha if edit == "subtract" else None,
        "layers": None if layers is None else [int(x) for x in layers],
        "hooks": list(hooks or residual_hooks(model)) if edit != "orthogonalize" else None,
        "max_new_tokens": max_new_tokens, "scorer": scorer_name(scorer),
        "probe_layer": probe_layer, "probe_hook": hook if probe is not None else None,
        "pool": pool if probe is not None else None,
        "perplexity": ({"window": window, "max_windows": max_windows}
                       if perplexity_text is not None else None),
        "mmlu": {k: str(v) for k, v in mmlu.items()} if mmlu is not None else None,
        "n_toxic": len(toxic_prompts), "n_neutral": len(neutral_prompts),
        "backend": "HookBridge" if is_bridge(model) else type(model).__name__,
    }
    return EditReport(before=before, after=after, continuations=continuations, settings=settings)
