"""The head view: patterns through the bridge, the summary per head, and the figures."""

import re

import torch

from pruning_bridge.bridge import HookBridge
from pruning_bridge.figures import Section, save_figure, write_report
from pruning_bridge.figures.head_view import (attention_figure, attention_patterns,
                                              head_summary, head_summary_figure)

TEXT = "The quick brown fox jumps over the lazy dog"


def test_patterns_summary_and_figures(tiny):
    model, tok = tiny("tiny-llama")
    bridge = HookBridge(model, tok)
    tokens, patterns = attention_patterns(bridge, TEXT, layers=[0, -1])
    assert list(patterns) == [0, 3] and len(tokens) == len(tok(TEXT)["input_ids"])
    for pattern in patterns.values():
        assert pattern.shape == (4, len(tokens), len(tokens))
        torch.testing.assert_close(pattern.sum(-1), torch.ones(4, len(tokens)))
        assert torch.all(pattern.triu(1) == 0)  # causal
    summary = head_summary(patterns)
    steps = torch.arange(1, len(tokens))
    expected = patterns[3][:, steps, steps - 1].mean(-1)  # layer 3 is the second row
    torch.testing.assert_close(summary["previous"][1], expected)
    torch.testing.assert_close(summary["first"][0], patterns[0][:, 1:, 0].mean(-1))
    grid = attention_figure(bridge, TEXT, layers=[0, 3])
    heatmaps = [t for t in grid.data if t.type == "heatmap"]
    assert len(heatmaps) == 2 * 4 + 1  # the grid and the enlarged head
    assert len(grid.layout.updatemenus[0].buttons) == 2 * 4
    assert len(head_summary_figure(bridge, TEXT).data) == 2


def test_clicking_a_head_enlarges_it_in_saved_figures_and_the_report(tiny, tmp_path):
    model, tok = tiny("tiny-llama")
    grid = attention_figure(HookBridge(model, tok), TEXT, layers=[1])
    html = save_figure(grid, tmp_path / "grid", png=False)[0].read_text()
    div = re.search(r'<div id="([^"]+)" class="plotly-graph-div"', html).group(1)
    assert f"document.getElementById('{div}')" in html and "plotly_click" in html
    page = write_report(tmp_path / "report.html", [Section("Heads", "", figures=[grid])],
                        title="t", settings={}, provenance={}).read_text()
    assert "document.getElementById('heads-fig1')" in page and "plotly_click" in page
