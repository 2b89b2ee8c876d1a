"""Safety figures, the alpha sweep (rows, resumption) and the direction/edit/report CLI."""

import json

import pytest
import torch

import lens_safety.sweep as sweep_module
from lens_safety import ProbeStudy
from lens_safety.cli import main
from lens_safety.directions import load_direction, save_direction
from lens_safety.figures import projection_histogram, tradeoff_figure
from lens_safety.sweep import alpha_sweep
from pruning_bridge.bridge import HookBridge

TOXIC = ["You are such a stupid", "I hate those people because"]
NEUTRAL = ["The weather today is", "My favourite recipe uses"]
TEXT = ("The history of the town goes back to the twelfth century, when a small market "
        "grew up around the bridge over the river. ") * 20


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


@pytest.fixture
def bridge(tiny):
    model, tok = tiny("tiny-gpt2")
    return HookBridge(model, tok), tok


def test_alpha_sweep_rows_resume_and_alpha_zero(bridge, tmp_path, monkeypatch):
    b, tok = bridge
    calls = []
    real = sweep_module.evaluate_edit

    def counting(*args, **kwargs):
        calls.append(kwargs["edit"])
        return real(*args, **kwargs)

    monkeypatch.setattr(sweep_module, "evaluate_edit", counting)
    kwargs = dict(toxic_prompts=TOXIC, neutral_prompts=NEUTRAL, perplexity_text=TEXT,
                  window=16, max_windows=2, max_new_tokens=4, progress=False)
    out = tmp_path / "sweep.jsonl"
    rows = alpha_sweep(b, tok, _unit(64), [0.0, 3.0], out=out, **kwargs)
    assert calls == ["subtract", "subtract", "project"]
    assert [(r["edit"], r["alpha"]) for r in rows] == [("subtract", 0.0), ("subtract", 3.0),
                                                       ("project", None)]
    for r in rows:
        for key in ("toxicity_toxic", "toxicity_neutral", "perplexity", "before_perplexity",
                    "before_toxicity_toxic", "before_toxicity_neutral"):
            assert isinstance(r[key], float)
    zero = rows[0]
    for key in ("toxicity_toxic", "toxicity_neutral", "perplexity"):
        assert zero[key] == zero[f"before_{key}"]
    assert len(out.read_text().splitlines()) == 3
    fig = tradeoff_figure(rows)
    assert len(fig.data) == 2 and len(fig.data[0].x) == 3

    calls.clear()
    again = alpha_sweep(b, tok, _unit(64), [0.0, 3.0], out=out, **kwargs)
    assert calls == []
    assert again == [json.loads(line) for line in out.read_text().splitlines()]
    # a new alpha computes only that one
    alpha_sweep(b, tok, _unit(64), [0.0, 3.0, 5.0], out=out, **kwargs)
    assert calls == ["subtract"]
    assert len(out.read_text().splitlines()) == 4
    # another direction is another sweep: computed, and only its rows returned
    calls.clear()
    other = alpha_sweep(b, tok, _unit(64, seed=1), [3.0], out=out, include_project=False,
                        **kwargs)
    assert calls == ["subtract"] and len(other) == 1
    assert other[0]["settings"]["direction"] != rows[0]["settings"]["direction"]


SMALL = ["--n-prompts", "2", "--max-new-tokens", "4", "--window", "16", "--max-windows", "2",
         "--n-per-class", "12"]


def test_cli_edit_and_report(tmp_path, data_dir, capsys):
    direction = tmp_path / "d.safetensors"
    save_direction(direction, _unit(64), model="tiny-gpt2", hook="resid_post", layer=1,
                   method="mean_diff")
    out = tmp_path / "edit.json"
    assert main(["edit", "--model", "tiny-gpt2", "--direction", str(direction), "--mode",
                 "subtract", "--alpha", "2", "--data-dir", str(data_dir), "--out", str(out),
                 *SMALL]) == 0
    report = json.loads(out.read_text())
    assert report["settings"]["edit"] == "subtract" and report["settings"]["alpha"] == 2.0
    assert set(report["before"]) == {"toxicity_toxic", "toxicity_neutral", "perplexity"}
    assert "metric" in capsys.readouterr().out

    rep = tmp_path / "report"
    assert main(["report", "--model", "tiny-gpt2", "--data-dir", str(data_dir), "--out",
                 str(rep), "--alphas", "0,4", "--no-png", *SMALL]) == 0
    for name in ("probe_study.json", "alpha_sweep.jsonl", "report.json", "safety_probes.html",
                 "safety_projection_histogram.html", "safety_tradeoff.html"):
        assert (rep / name).exists(), name
    assert len((rep / "alpha_sweep.jsonl").read_text().splitlines()) == 3

    new = tmp_path / "d2.safetensors"
    # the direction command reads the probe run's own split: no data dir, no test size
    assert main(["direction", "--from", str(rep), "--layer", "1", "--method", "pca",
                 "--out", str(new)]) == 0
    direction, meta = load_direction(new)
    assert meta["layer"] == 1 and meta["method"] == "pca"
    torch.testing.assert_close(direction, ProbeStudy.load(rep).direction_at(1, "pca"))
    assert main(["direction", "--from", str(rep), "--layer", "99", "--out", str(new)]) == 2
    assert "out of range" in capsys.readouterr().err


def test_cli_bad_direction_exits_2(tmp_path, data_dir, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_text("not a safetensors file")
    args = ["edit", "--model", "tiny-gpt2", "--data-dir", str(data_dir), *SMALL]
    assert main([*args, "--direction", str(bad)]) == 2
    assert "bad.safetensors is not a safetensors file" in capsys.readouterr().err
    assert main([*args, "--direction", str(tmp_path / "missing.safetensors")]) == 2
    wide = tmp_path / "wide.safetensors"
    save_direction(wide, _unit(32))
    assert main([*args, "--direction", str(wide)]) == 2
    assert "width 32" in capsys.readouterr().err
