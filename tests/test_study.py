"""The probe study end to end on a tiny model, and its CLI."""

import json

import torch

from lens_safety.cli import main
from lens_safety.directions import load_direction
from lens_safety.study import run_probe_study
from pruning_bridge.bridge import HookBridge


def test_probe_study_outputs(tiny, data_dir, tmp_path):
    model, tok = tiny("tiny-llama")
    s = run_probe_study(HookBridge(model, tok), tok, data_dir=data_dir, n_per_class=20,
                        out_dir=tmp_path, progress=False)
    n_layers = model.config.num_hidden_layers
    assert len(s["cv_binary"]) == len(s["held_out_binary"]) == n_layers
    assert s["n_train"] + s["n_test"] == 60 and 0 <= s["best_layer"] < n_layers
    direction, meta = load_direction(s["direction_path"])
    torch.testing.assert_close(direction, s["direction"])
    assert meta["layer"] in (s["best_layer"], str(s["best_layer"]))
    assert abs(float(direction.norm()) - 1) < 1e-5
    saved = json.loads((tmp_path / "probe_study.json").read_text())
    assert saved["best_layer"] == s["best_layer"]
    assert all(0 <= r["auroc"] <= 1 for r in saved["held_out_binary"])


def test_probe_cli(data_dir, tmp_path, capsys):
    assert main(["probe", "--model", "tiny-gpt2", "--data-dir", str(data_dir), "--n-per-class",
                 "15", "--out", str(tmp_path)]) == 0
    assert "best layer" in capsys.readouterr().out
    assert (tmp_path / "probes.html").exists() and (tmp_path / "probe_study.json").exists()
    assert main(["probe", "--model", "tiny-gpt2", "--data-dir", str(data_dir), "--n-per-class",
                 "100000"]) == 2
