"""An interactive head view: every head's attention pattern on one prompt, through the bridge.

    fig = attention_figure(bridge, "The cat sat on the mat because it was tired", layers=[0, 5])
    save_figure(fig, "figures/heads")              # a layers x heads grid; the menu enlarges one
    save_figure(head_summary_figure(bridge, text), "figures/head_summary")

The patterns are TransformerLens's ``blocks.L.attn.hook_pattern`` read through ``HookBridge``
(query rows, key columns); hovering shows the query and key tokens and the weight.
"""

from __future__ import annotations

from typing import Sequence

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots
from torch import Tensor

from ..bridge import HookBridge
from ..common.layers import check_layers


def attention_patterns(bridge: HookBridge, text: str,
                       layers: Sequence[int] | None = None) -> tuple[list[str], dict[int, Tensor]]:
    """The prompt's tokens and each layer's pattern ``[heads, query, key]`` (fp32, on CPU)."""
    layers = check_layers(layers, bridge.adapter.n_layers)
    ids, mask = bridge.tokenize(text)
    _, cache = bridge.run_with_cache(ids, [f"blocks.{i}.attn.hook_pattern" for i in layers],
                                     attention_mask=mask)
    tokens = [bridge.tokenizer.decode([t]) for t in ids[0].tolist()] if bridge.tokenizer else \
        [str(t) for t in ids[0].tolist()]
    return tokens, {i: cache[f"blocks.{i}.attn.hook_pattern"][0].float().cpu() for i in layers}


def _hover(tokens: list[str]) -> list[list[str]]:
    return [[f"{q!r} -> {k!r}" for k in tokens] for q in tokens]


# clicking a head of the grid shows it enlarged (the last trace) and selects it in the menu
CLICK_TO_ENLARGE = """
var gd = document.getElementById('{plot_id}');
gd.on('plotly_click', function (event) {
  var clicked = event.points[0].curveNumber, big = gd.data.length - 1;
  if (clicked === big) { return; }
  Plotly.restyle(gd, {z: [gd.data[clicked].z]}, [big]);
  Plotly.relayout(gd, {'updatemenus[0].active': clicked});
});
"""


def attention_figure(bridge: HookBridge, text: str, layers: Sequence[int] | None = None,
                     title: str | None = None) -> go.Figure:
    """A layers x heads grid of attention patterns on ``text``, and one enlarged head: click a
    head of the grid (or pick it in the menu) to enlarge it; tokens on hover. The click handler
    travels in ``fig.layout.meta["post_script"]`` (``save_figure`` and the report add it)."""
    tokens, patterns = attention_patterns(bridge, text, layers)
    layers = list(patterns)
    n_heads = max(p.shape[0] for p in patterns.values())
    hover = _hover(tokens)
    fig = make_subplots(rows=len(layers), cols=n_heads + 2,
                        specs=[[{} for _ in range(n_heads)] + [{"rowspan": len(layers),
                                                                "colspan": 2}, None]]
                        + [[{} for _ in range(n_heads)] + [None, None]
                           for _ in range(len(layers) - 1)],
                        horizontal_spacing=0.01, vertical_spacing=0.01)
    for r, layer in enumerate(layers, start=1):
        for head in range(patterns[layer].shape[0]):
            fig.add_trace(go.Heatmap(
                z=patterns[layer][head].numpy(), zmin=0, zmax=1, coloraxis="coloraxis",
                customdata=hover, hovertemplate=f"layer {layer} head {head}<br>%{{customdata}}"
                                                f"<br>%{{z:.3f}}<extra></extra>"),
                row=r, col=head + 1)
    first = layers[0]
    fig.add_trace(go.Heatmap(z=patterns[first][0].numpy(), zmin=0, zmax=1,
                             coloraxis="coloraxis", x=list(range(len(tokens))),
                             customdata=hover, hovertemplate="%{customdata}<br>%{z:.3f}"
                                                             "<extra></extra>"),
                  row=1, col=n_heads + 1)
    big = len(fig.data) - 1
    buttons = [dict(label=f"layer {layer}, head {head}", method="restyle",
                    args=[{"z": [patterns[layer][head].numpy()]}, [big]])
               for layer in layers for head in range(patterns[layer].shape[0])]
    fig.update_xaxes(showticklabels=False)
    fig.update_yaxes(showticklabels=False, autorange="reversed")
    ticks = dict(showticklabels=True, tickvals=list(range(len(tokens))), ticktext=tokens)
    fig.layout["xaxis" + fig.data[big].xaxis[1:]].update(**ticks, tickangle=-60)
    fig.layout["yaxis" + fig.data[big].yaxis[1:]].update(**ticks)
    fig.update_layout(
        title=title or f"Attention patterns: layers {layers} (rows) x heads (columns)",
        coloraxis={"colorscale": "Blues", "cmin": 0, "cmax": 1},
        updatemenus=[dict(buttons=buttons, x=1.0, xanchor="right", y=1.08, yanchor="bottom",
                          direction="down", showactive=True)],
        template="plotly_white", height=max(420, 70 * len(layers) + 160), width=None,
        meta={"post_script": CLICK_TO_ENLARGE})
    return fig


def head_summary(patterns: dict[int, Tensor]) -> dict[str, Tensor]:
    """Per layer and head, the mean attention of each query to the previous token and to the
    first token (queries after the first), ``[layers, heads]`` each."""
    n_heads = max(p.shape[0] for p in patterns.values())
    out = {k: torch.full((len(patterns), n_heads), float("nan")) for k in ("previous", "first")}
    for row, pattern in enumerate(patterns.values()):
        q = pattern.shape[1]
        if q < 2:
            continue
        steps = torch.arange(1, q)
        out["previous"][row, :pattern.shape[0]] = pattern[:, steps, steps - 1].mean(-1)
        out["first"][row, :pattern.shape[0]] = pattern[:, 1:, 0].mean(-1)
    return out


def head_summary_figure(bridge: HookBridge, text: str, layers: Sequence[int] | None = None,
                        title: str | None = None) -> go.Figure:
    """Two layers x heads heatmaps: attention to the previous token and to the first token."""
    _, patterns = attention_patterns(bridge, text, layers)
    summary = head_summary(patterns)
    layers = list(patterns)
    fig = make_subplots(rows=1, cols=2, subplot_titles=["to the previous token",
                                                        "to the first token"])
    for col, key in enumerate(("previous", "first"), start=1):
        fig.add_trace(go.Heatmap(z=summary[key].numpy(), y=[str(i) for i in layers],
                                 coloraxis="coloraxis",
                                 hovertemplate="layer %{y}, head %{x}<br>%{z:.3f}<extra></extra>"),
                      row=1, col=col)
        fig.update_xaxes(title_text="head", dtick=1, row=1, col=col)
    fig.update_yaxes(title_text="layer", autorange="reversed", type="category")
    fig.update_layout(title=title or "Mean attention per head", template="plotly_white",
                      coloraxis={"colorscale": "Viridis", "cmin": 0, "cmax": 1},
                      height=max(380, 18 * len(layers) + 160))
    return fig
