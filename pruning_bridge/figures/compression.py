"""Plotly figures of the compression studies (the report's Figures 1, 2 and 3), one function each.

Each function takes result rows (``ResultsLog.rows`` or a sweep's return value), an importance
matrix or a training log, and returns a ``plotly.graph_objects.Figure``;
``pruning_bridge.figures.save_figure`` writes it as interactive HTML and, when a Chrome/Chromium
for kaleido is available, as a static PNG.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

TASK_TITLES = {"mmlu": "MMLU accuracy", "gsm8k": "GSM8K accuracy",
               "perplexity": "WikiText-2 perplexity"}


def _tasks(rows: Sequence[dict]) -> list[str]:
    present = {r["task"] for r in rows}
    return [t for t in ("mmlu", "gsm8k", "perplexity") if t in present]


def layer_removal_figure(rows: Sequence[dict], title: str = "Removing one layer") -> go.Figure:
    """Figure 1: each task's metric with layer i removed, the unpruned model as a dashed line.

    Perplexity uses a log axis, since removing some layers makes it explode.
    """
    rows = [r for r in rows if r["method"] == "layer_removal"]
    tasks = _tasks(rows)
    base_of = {r["task"]: r["value"] for r in rows if not r["config"]["removed"]}
    titles = [TASK_TITLES[t] + (f" (unpruned {base_of[t]:.4g}, dashed)" if t in base_of else "")
              for t in tasks]
    fig = make_subplots(rows=len(tasks), cols=1, shared_xaxes=True, subplot_titles=titles,
                        vertical_spacing=0.08)
    for k, task in enumerate(tasks, start=1):
        points = sorted((r["config"]["removed"][0], r["value"]) for r in rows
                        if r["task"] == task and len(r["config"]["removed"]) == 1)
        base = [r["value"] for r in rows if r["task"] == task and not r["config"]["removed"]]
        trace = go.Scatter if task == "perplexity" else go.Bar  # bars mislead on a log axis
        extra = {"mode": "lines+markers"} if task == "perplexity" else {}
        fig.add_trace(trace(x=[p[0] for p in points], y=[p[1] for p in points],
                            name=TASK_TITLES[task], showlegend=False, **extra,
                            hovertemplate="layer %{x} removed<br>%{y:.4g}<extra></extra>"),
                      row=k, col=1)
        if base:
            fig.add_hline(y=base[0], line_dash="dash", line_color="black", row=k, col=1)
        if task == "perplexity":
            fig.update_yaxes(type="log", row=k, col=1)
    fig.update_xaxes(title_text="removed layer", row=len(tasks), col=1, dtick=1)
    fig.update_layout(title=title, template="plotly_white", height=320 * len(tasks) + 80)
    return fig


def _lines_per_task(rows: Sequence[dict], series: dict[str, str], x_of, reference: dict,
                    x_title: str, hover: str, title: str) -> go.Figure:
    """One panel per task: a line per series (method -> colour) of ``x_of(row)`` against the
    metric, and the ``reference`` value per task (the unpruned model) dashed."""
    tasks = _tasks(rows)
    fig = make_subplots(rows=1, cols=len(tasks), subplot_titles=[TASK_TITLES[t] for t in tasks])
    for k, task in enumerate(tasks, start=1):
        for method, color in series.items():
            pts = sorted((x_of(r), r["value"]) for r in rows
                         if r["task"] == task and r["method"] == method)
            fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts],
                                     mode="lines+markers", name=method, line_color=color,
                                     legendgroup=method, showlegend=k == 1,
                                     hovertemplate=f"{method}<br>%{{x:.0f}}% {hover}<br>"
                                                   "%{y:.4g}<extra></extra>"),
                          row=1, col=k)
        if task in reference:
            fig.add_hline(y=reference[task], line_dash="dash", line_color="black", row=1, col=k)
        fig.update_xaxes(title_text=x_title, row=1, col=k)
        if task == "perplexity":
            fig.update_yaxes(type="log", row=1, col=k)
    fig.update_layout(title=title, template="plotly_white", height=450)
    return fig


def weight_pruning_figure(rows: Sequence[dict], title: str = "Weight pruning") -> go.Figure:
    """Figure 2: each task's metric against sparsity, one line per pruning method.

    The dense model (sparsity 0) starts every line and is drawn as a dashed reference.
    """
    rows = [r for r in rows if r["method"] != "layer_removal"]
    dense = [r for r in rows if r["method"] == "dense"]
    methods = sorted({r["method"] for r in rows} - {"dense"})
    colors = dict(zip(methods, ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e")))
    starts = [{**r, "method": m} for r in dense for m in methods]  # every line starts dense
    return _lines_per_task(starts + [r for r in rows if r["method"] != "dense"], colors,
                           lambda r: 100 * r["config"]["sparsity"],
                           {r["task"]: r["value"] for r in dense}, "sparsity (%)", "zero", title)


def head_importance_figure(importance, title: str = "Head importance (mean router gate)",
                           n_shared: int = 0, colorbar: str = "mean gate") -> go.Figure:
    """Figure 3: a layers x heads heatmap of ``importance`` (``[n_layers, n_heads]``).

    ``n_shared`` marks the always-on heads (their gate is 1 by construction) with a dotted line.
    """
    values = np.asarray(importance, dtype=float)
    n_layers, n_heads = values.shape
    fig = go.Figure(go.Heatmap(
        z=values, x=list(range(n_heads)), y=list(range(n_layers)), colorscale="Viridis",
        colorbar_title=colorbar,
        hovertemplate="layer %{y}, head %{x}<br>%{z:.3f}<extra></extra>"))
    if n_shared:
        fig.add_vline(x=n_shared - 0.5, line_dash="dot", line_color="white",
                      annotation_text="shared | routed", annotation_position="top")
    fig.update_xaxes(title_text="head", dtick=1)
    fig.update_yaxes(title_text="layer", dtick=1 if n_layers <= 32 else None, autorange="reversed")
    fig.update_layout(title=title, template="plotly_white",
                      height=max(380, 18 * n_layers + 160))
    return fig


def router_loss_figure(steps: Sequence[dict], title: str = "Router training") -> go.Figure:
    """The language-modelling and load-balancing losses per step of ``train_router``."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=["LM loss", "load-balancing loss"])
    x = [s["step"] for s in steps]
    for k, key in enumerate(("lm_loss", "balance_loss"), start=1):
        fig.add_trace(go.Scatter(x=x, y=[s[key] for s in steps], mode="lines", showlegend=False,
                                 hovertemplate="step %{x}<br>%{y:.4f}<extra></extra>"),
                      row=1, col=k)
        fig.update_xaxes(title_text="step", row=1, col=k)
    fig.update_layout(title=title, template="plotly_white", height=380)
    return fig


def head_pruning_figure(rows: Sequence[dict], title: str = "Routed vs removed heads") -> go.Figure:
    """Each task's metric against the fraction of active heads: routed (per token) vs removed.

    The full model (100 % active) is drawn as a dashed reference.
    """
    return _lines_per_task(rows, {"routed": "#1f77b4", "removed": "#d62728"},
                           lambda r: 100 * r["config"]["active_fraction"],
                           {r["task"]: r["value"] for r in rows if r["method"] == "full"},
                           "active heads (%)", "heads active", title)
