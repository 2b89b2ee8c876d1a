"""The safety figures: the projection histogram and the Pareto figure of an edit sweep."""

import numpy as np
import pytest
import torch

from lens_safety.figures import pareto_figure, projection_histogram


def _unit(d_model, seed=0):
    d = torch.randn(d_model, generator=torch.Generator().manual_seed(seed))
    return d / d.norm()


def test_projection_histogram_one_trace_per_class_with_counts():
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(9, 16, generator=g)
    labels = ["neutral"] * 4 + ["biased"] * 2 + ["toxic"] * 3
    d = _unit(16)
    fig = projection_histogram(acts, labels, d, title="t")
    assert [t.type for t in fig.data] == ["histogram"] * 3
    assert [len(t.x) for t in fig.data] == [4, 2, 3]
    assert [t.name.split()[0] for t in fig.data] == ["neutral", "biased", "toxic"]
    assert torch.allclose(torch.tensor(fig.data[2].x), (acts[6:].double() @ d.double()))
    with pytest.raises(ValueError, match="width"):
        projection_histogram(acts, labels, _unit(8))


def _row(method, how, value, ppl, fluency, edit):
    rng = np.random.default_rng(int(value * 1000))
    per_prompt = list(np.clip(value + rng.normal(0, 0.05, 12), 0, 1))
    return {"method": method, "config": {"how": how} if how else {}, "edit": edit,
            "value": float(np.mean(per_prompt)), "greedy_toxicity_per_prompt": per_prompt,
            "perplexity": ppl, "greedy_fluency_ppl": fluency}


def test_pareto_figure_one_trace_per_how_with_ratios_budget_and_selection():
    rows = [_row("none", None, 0.40, 20.0, 10.0, "unedited"),
            _row("edit", "clamp", 0.20, 20.5, 10.5, "clamp L1"),
            _row("edit", "clamp", 0.10, 23.0, 12.0, "clamp L1-2"),
            _row("edit", "project", 0.30, 21.0, 10.2, "project L1")]
    fig = pareto_figure(rows, selected=rows[1], max_perplexity_ratio=1.05,
                        max_fluency_ratio=1.10)
    names = [t.name for t in fig.data]
    assert names == ["clamp", "project", "unedited", "selected: clamp L1"]
    clamp = fig.data[0]
    np.testing.assert_allclose(clamp.x, [20.5 / 20.0, 23.0 / 20.0])
    np.testing.assert_allclose(clamp.y, [rows[1]["value"], rows[2]["value"]])
    # the 1.2x-fluency edit is over the 1.10 budget: hollow; the other is filled
    assert list(clamp.marker.color) == ["#2ca02c", "white"]
    assert all(up > 0 and down > 0 for up, down in zip(clamp.error_y.array,
                                                       clamp.error_y.arrayminus))
    assert fig.data[3].x == (20.5 / 20.0,)
    assert [s.x0 for s in fig.layout.shapes] == [1.05]
    assert fig.layout.xaxis.type == "log"
