"""Does an edit make generations less toxic, and what does it cost? Before/after in one report.

    report = evaluate_edit(model, tok, direction, toxic_prompts=test_toxic,
                           neutral_prompts=test_neutral, edit="project",
                           probe=probes, probe_layer=probes.best_layer_,
                           perplexity_text=load_wikitext2(data_dir=...), mmlu={"limit": 100})
    print(report)            # metric | before | after | delta
    report.to_json("edit.json"); report.to_pandas()

``model`` is a ``pruning_bridge.HookBridge``, a TransformerLens ``HookedTransformer`` or a plain
Hugging Face causal LM (wrapped in a HookBridge). Every metric is computed on the unedited model
and then inside the edit's context manager (:func:`lens_safety.editing.ablate` for ``project`` /
``subtract``, :func:`lens_safety.editing.orthogonalize`), so the model is unchanged afterwards.

Metrics (each only when requested):

- ``toxicity_toxic`` / ``toxicity_neutral``: mean scorer toxicity of greedy, fixed-length
  continuations (``max_new_tokens`` new tokens, end-of-text suppressed) of the toxic / neutral
  prompts; the continuation alone is scored, not the prompt.
- ``probe_harmful_toxic`` / ``probe_harmful_neutral``: mean harmful probability that a fitted
  :class:`~lens_safety.probes.LayerProbes` assigns to prompt + continuation, read from the
  residual stream at ``probe_layer`` (``hook``, ``pool``) of the model being evaluated (under
  the edit for ``after``).
- ``perplexity``: :func:`pruning_bridge.evals.perplexity` over ``max_windows`` windows of
  ``window`` tokens of ``perplexity_text`` (a HookedTransformer runs through a small adapter,
  row by row without padding).
- ``mmlu_accuracy``: :func:`pruning_bridge.evals.mmlu_accuracy` with the ``mmlu`` kwargs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from pruning_bridge.common import JsonDataclass
from pruning_bridge.common.errors import UsageError

from .caching import HOOKS, cache_residuals, is_bridge, model_device
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
        import pandas as pd

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


class _HookedLM(torch.nn.Module):
    """A HookedTransformer seen as an HF-style LM for ``pruning_bridge.evals``: takes
    ``input_ids`` / ``attention_mask`` and returns logits; padded rows are run one by one on
    their real tokens only (so positions and attention never see padding)."""

    def __init__(self, hooked):
        super().__init__()
        self.hooked = hooked
        self.config = None

    def parameters(self, recurse: bool = True):
        return self.hooked.parameters(recurse)

    @torch.no_grad()
    def forward(self, input_ids, attention_mask=None, position_ids=None, **_):
        if attention_mask is None or bool(attention_mask.all()):
            return self.hooked(input_ids, return_type="logits")
        out = None
        for row in range(input_ids.shape[0]):
            real = attention_mask[row].bool()
            logits = self.hooked(input_ids[row][real][None], return_type="logits")[0]
            if out is None:
                out = logits.new_zeros(*input_ids.shape, logits.shape[-1])
            out[row, real] = logits
        return out


def _is_hooked_transformer(model) -> bool:
    return hasattr(model, "cfg") and hasattr(model, "blocks") and hasattr(model, "embed")


def _as_lm(model):
    """What ``pruning_bridge.evals`` should call: the bridge / HF model, or the adapter."""
    return _HookedLM(model) if _is_hooked_transformer(model) else model


@torch.no_grad()
def generate_continuations(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 20,
                           batch_size: int = 8, progress: bool = False) -> list[str]:
    """Greedy continuations of exactly ``max_new_tokens`` tokens (end-of-text suppressed), the
    new text only; active hooks / edits apply. HookBridge: batched; HookedTransformer: per
    prompt (no padding)."""
    prompts = list(prompts)
    out: list[str] = []
    if is_bridge(model):
        starts = range(0, len(prompts), batch_size)
        for start in tqdm(starts, desc="generating", disable=not progress):
            out += model.generate(prompts[start:start + batch_size],
                                  max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                  return_text=True)
        return out
    device = model_device(model)
    for prompt in tqdm(prompts, desc="generating", disable=not progress):
        ids = torch.tensor([tokenizer(prompt)["input_ids"]], device=device)
        tokens = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                                stop_at_eos=False, verbose=False, use_past_kv_cache=True)
        out.append(tokenizer.decode(tokens[0, ids.shape[1]:], skip_special_tokens=True))
    return out


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
    from pruning_bridge.evals import mmlu_accuracy, perplexity

    metrics: dict[str, float] = {}
    texts: dict[str, list[str]] = {}
    for kind, kind_prompts in prompts.items():
        if not kind_prompts:
            continue
        conts = generate_continuations(model, tokenizer, kind_prompts, max_new_tokens,
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
    lm = _as_lm(model)
    if perplexity_text is not None:
        metrics["perplexity"] = perplexity(lm, tokenizer, perplexity_text, window=window,
                                           max_windows=max_windows, batch_size=batch_size,
                                           progress=progress)
    if mmlu is not None:
        kwargs = {"batch_size": batch_size, "progress": progress, **mmlu}
        metrics["mmlu_accuracy"] = float(mmlu_accuracy(lm, tokenizer, **kwargs).value)
    return metrics, texts


# ---------------------------------------------------------------- the verb


def evaluate_edit(model, tokenizer, direction, *, toxic_prompts: Sequence[str],
                  neutral_prompts: Sequence[str] = (), edit: str = "project", alpha: float = 1.0,
                  layers: Sequence[int] | None = None, hooks: Sequence[str] = HOOKS,
                  max_new_tokens: int = 20, scorer="profanity", probe=None,
                  probe_layer: int | None = None, hook: str = "resid_post", pool: str = "last",
                  perplexity_text: str | None = None, window: int = 256,
                  max_windows: int | None = 4, mmlu: dict | None = None, batch_size: int = 8,
                  progress: bool = True) -> EditReport:
    """Metrics of ``model`` before and under ``edit`` of ``direction`` (see the module doc).

    ``edit``: ``"project"`` (``x - (x.d) d``) or ``"subtract"`` (``x - alpha d``) at
    ``blocks.L.hook_{h}`` for L in ``layers`` (default all) and h in ``hooks``; or
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
    if not is_bridge(model) and not _is_hooked_transformer(model):
        from pruning_bridge.bridge import HookBridge

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
        "hooks": list(hooks) if edit != "orthogonalize" else None,
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
