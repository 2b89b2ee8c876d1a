"""The weight-pruning sweep: rows, restoration between configurations, resumption."""

import copy
import hashlib

import pytest
import torch
from torch.nn.utils import prune

from pruning_bridge.evals import EvalSettings, perplexity
from pruning_bridge.evals.data import load_wikitext2
from pruning_bridge.figures import weight_pruning_figure
from pruning_bridge.pruning.weight_sweep import calibration_texts, weight_sweep


def state_hash(model) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode() + t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def test_weight_sweep_matches_direct_pruning_and_restores(tiny, data_dir, tmp_path):
    model, tok = tiny("tiny-qwen3")
    before = state_hash(model)
    out = tmp_path / "w.jsonl"
    settings = EvalSettings(["perplexity"], data_dir=data_dir, limit=2, window=64,
                            progress=False)
    rows = weight_sweep(model, tok, settings, [0.3, 0.6], ["magnitude"], out=out)
    assert state_hash(model) == before
    assert [(r["method"], r["config"]["sparsity"]) for r in rows] == [
        ("dense", 0.0), ("magnitude", 0.3), ("magnitude", 0.6)]
    # independent reference: zero the smallest 60% of each block Linear with torch.nn.utils.prune
    ref = copy.deepcopy(model)
    for layer in ref.model.layers:
        for module in layer.modules():
            if isinstance(module, torch.nn.Linear):
                prune.l1_unstructured(module, "weight", amount=0.6)
                prune.remove(module, "weight")
    text = load_wikitext2("test", data_dir)
    expected = perplexity(ref, tok, text, window=64, max_windows=2, progress=False).value
    assert rows[2]["value"] == pytest.approx(expected, rel=1e-5)
    assert rows[2]["achieved_sparsity"] == pytest.approx(0.6, abs=1e-3)
    assert rows[0]["value"] != rows[2]["value"]
    again = weight_sweep(model, tok, settings, [0.3, 0.6], ["magnitude"], out=out)
    assert again == rows and len(out.read_text().splitlines()) == 3  # nothing recomputed


def test_weight_sweep_errors_and_calibration(tiny, data_dir):
    model, tok = tiny("tiny-llama")
    with pytest.raises(ValueError, match="Unknown pruning methods"):
        weight_sweep(model, tok, EvalSettings(["perplexity"], data_dir=data_dir), [0.1],
                     ["sparsegpt"])
    with pytest.raises(ValueError, match="Unknown scope"):
        weight_sweep(model, tok, EvalSettings(["perplexity"], data_dir=data_dir), [0.1],
                     scope="per_row")
    texts = calibration_texts(data_dir, n=8)
    assert len(texts) == 8 and all(len(t) >= 200 for t in texts)
    test_text = load_wikitext2("test", data_dir)
    assert not any(t[:80] in test_text for t in texts)  # calibration never uses the test split


def test_weight_figure():
    rows = [{"method": "dense", "config": {"sparsity": 0.0}, "task": "perplexity", "value": 20.0}]
    rows += [{"method": m, "config": {"sparsity": s}, "task": "perplexity", "value": v}
             for m in ("magnitude", "wanda") for s, v in ((0.1, 21.0), (0.5, 40.0))]
    fig = weight_pruning_figure(rows)
    assert [t.name for t in fig.data] == ["magnitude", "wanda"]
    assert list(fig.data[0].x) == [0.0, 10.0, 50.0]
