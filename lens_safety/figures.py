"""Plotly figures of the safety study, one function each, returning ``go.Figure``.

- :func:`projection_histogram`: overlaid histograms of ``x . d`` per class at one layer.
- :func:`pareto_figure`: greedy toxicity vs perplexity ratio, one point per swept ``Edit``
  (``edit_sweep`` rows), the unedited model, the selected edit and the budget marked.

(Probe accuracy per layer is ``LayerProbes.figure()``.) Save with
``pruning_bridge.figures.save_figure(fig, path)``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import plotly.graph_objects as go
import torch

from pruning_bridge.common import UsageError

CLASSES = ("neutral", "biased", "toxic")
COLORS = {"neutral": "#2ca02c", "biased": "#ff7f0e", "toxic": "#d62728"}


def projection_histogram(acts_layer, labels: Sequence[str], direction,
                         title: str | None = None) -> go.Figure:
    """Overlaid histograms of the projection ``x . d`` of each row of ``acts_layer``
    ``[n, d_model]`` on the unit ``direction`` ``[d_model]``, one trace per class present."""
    x = torch.as_tensor(acts_layer).detach().double().cpu()
    d = torch.as_tensor(direction).detach().double().cpu().reshape(-1)
    if x.ndim != 2:
        raise UsageError(f"acts_layer must be [n, d_model]; got shape {tuple(x.shape)}.")
    if x.shape[1] != d.shape[0]:
        raise UsageError(f"The direction has width {d.shape[0]} but the activations have "
                         f"d_model {x.shape[1]}.")
    labels = list(labels)
    if len(labels) != x.shape[0]:
        raise UsageError(f"{len(labels)} labels for {x.shape[0]} activation rows.")
    proj = (x @ (d / d.norm())).numpy()
    labels_arr = np.array(labels, dtype=object)
    present = [c for c in CLASSES if c in labels] + sorted(
        {str(c) for c in labels} - set(CLASSES))
    fig = go.Figure()
    for cls in present:
        values = proj[labels_arr == cls]
        fig.add_trace(go.Histogram(x=values, name=f"{cls} (n={len(values)})", opacity=0.6,
                                   marker_color=COLORS.get(cls), nbinsx=40))
    fig.update_layout(barmode="overlay", title=title or "Projection on the harmful direction",
                      xaxis_title="x · d", yaxis_title="count", template="plotly_white")
    return fig


HOW_COLORS = {"project": "#1f77b4", "subtract": "#ff7f0e", "clamp": "#2ca02c",
              "leace": "#9467bd", "orthogonalize": "#8c564b"}


def pareto_figure(rows: Sequence[dict], selected: dict | None = None,
                  max_perplexity_ratio: float | None = None,
                  max_fluency_ratio: float | None = None,
                  title: str = "Edits: toxicity vs perplexity (validation)") -> go.Figure:
    """One point per swept edit (``edit_sweep`` rows): greedy toxicity of the validation toxic
    prompts' continuations (95% bootstrap interval over prompts as error bars) against the
    perplexity ratio to the unedited model (log axis); the unedited model is a star, the
    selected edit is circled, edits over the fluency budget are hollow, the budget a line."""
    from .evaluation.stats import bootstrap_interval

    base = next(r for r in rows if r["method"] == "none")
    fig = go.Figure()
    groups: dict[str, list[dict]] = {}
    for row in rows:
        if row["method"] != "none":
            groups.setdefault(row["config"]["how"], []).append(row)

    def interval(row):
        values = row.get("greedy_toxicity_per_prompt")
        if not values or len(values) < 2:
            return row["value"], 0.0, 0.0
        i = bootstrap_interval(values)
        return i.estimate, i.high - i.estimate, i.estimate - i.low

    for how, group in groups.items():
        y, up, down = zip(*(interval(r) for r in group))
        fluency = [r.get("greedy_fluency_ppl", np.nan) / base.get("greedy_fluency_ppl", np.nan)
                   for r in group]
        hollow = [max_fluency_ratio is not None and f > max_fluency_ratio for f in fluency]
        fig.add_trace(go.Scatter(
            x=[r["perplexity"] / base["perplexity"] for r in group], y=y, mode="markers",
            name=how, error_y=dict(type="data", array=up, arrayminus=down, thickness=1),
            marker=dict(size=10, color=["white" if h else HOW_COLORS.get(how) for h in hollow],
                        line=dict(width=2, color=HOW_COLORS.get(how))),
            customdata=[[r["edit"], f] for r, f in zip(group, fluency)],
            hovertemplate="%{customdata[0]}<br>toxicity %{y:.3f}<br>perplexity x%{x:.3f}"
                          "<br>fluency x%{customdata[1]:.2f}<extra></extra>"))
    b, bu, bd = interval(base)
    fig.add_trace(go.Scatter(x=[1.0], y=[b], mode="markers", name="unedited",
                             error_y=dict(type="data", array=[bu], arrayminus=[bd]),
                             marker=dict(symbol="star", size=18, color="black")))
    if selected is not None:
        fig.add_trace(go.Scatter(x=[selected["perplexity"] / base["perplexity"]],
                                 y=[selected["value"]], mode="markers",
                                 name=f"selected: {selected['edit']}",
                                 marker=dict(symbol="circle-open", size=26, color="red",
                                             line=dict(width=3))))
    if max_perplexity_ratio is not None:
        fig.add_vline(x=max_perplexity_ratio, line_dash="dash", line_color="grey",
                      annotation_text=f"perplexity budget x{max_perplexity_ratio:g}")
    fig.update_layout(title=title, xaxis_title="WikiText-2 perplexity / unedited (log)",
                      yaxis_title="greedy toxicity of continuations (mean, 95% CI)",
                      xaxis_type="log", template="plotly_white", height=520)
    return fig
