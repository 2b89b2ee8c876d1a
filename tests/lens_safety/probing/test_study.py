"""The probe study as one object on a tiny model: build, save, load, and its CLI."""

import json

import pytest
import torch

from lens_safety import ProbeSettings, ProbeStudy, PromptSet
from lens_safety.cli import main
from lens_safety.probing.directions import load_direction
from lens_safety.probing.study import run_probe_study
from pruning_bridge.bridge import HookBridge
from pruning_bridge.common.errors import UsageError


@pytest.fixture(scope="module")
def built(tiny, data_dir, tmp_path_factory):
    model, tok = tiny("tiny-llama")
    folder = tmp_path_factory.mktemp("study")
    settings = ProbeSettings(n_per_class=20, test_size=0.4, seed=3)
    study = ProbeStudy.build(HookBridge(model, tok), tok, settings, data_dir=data_dir,
                             model_name="tiny-llama", folder=folder, progress=False)
    return study, folder, model


def test_probe_study_holds_split_acts_probes_and_direction(built, data_dir):
    study, folder, model = built
    n_layers = model.config.num_hidden_layers
    summary = study.summary()
    assert len(summary["cv_binary"]) == len(summary["held_out_binary"]) == n_layers
    assert len(study.train) + len(study.test) == 60 and 0 <= study.best_layer < n_layers
    # the split is the settings' (test_size 0.4, seed 3), not a default
    train, test = PromptSet.load(data_dir, n_per_class=20, seed=3).split(test_size=0.4, seed=3)
    assert study.train.texts == train.texts and study.test.texts == test.texts
    assert len(study.test) == 24
    assert study.train_acts.shape[:2] == (n_layers, len(study.train))
    assert study.test_acts.shape[:2] == (n_layers, len(study.test))
    assert study.binary.best_layer_ == study.best_layer and study.three_class.task == "multiclass"
    direction, meta = load_direction(summary["direction_path"])
    torch.testing.assert_close(direction, study.direction)
    assert meta["layer"] in (study.best_layer, str(study.best_layer))
    assert abs(float(direction.norm()) - 1) < 1e-5
    saved = json.loads((folder / "probe_study.json").read_text())
    assert saved["best_layer"] == study.best_layer and saved["test_size"] == 0.4
    assert all(0 <= r["auroc"] <= 1 for r in saved["held_out_binary"])
    toxic = study.test_prompts("toxic", 3)
    assert len(toxic) == 3 and all(t in test.texts for t in toxic)
    assert set(toxic).isdisjoint(study.train.texts)
    with pytest.raises(UsageError, match="Unknown label"):
        study.test_prompts("rude")
    assert study.figure().data and study.projection_figure().data


def test_probe_study_loads_without_the_model(built):
    study, folder, _ = built
    loaded = ProbeStudy.load(folder)
    assert loaded.settings == study.settings and loaded.best_layer == study.best_layer
    assert loaded.summary() == study.summary()
    assert loaded.test.texts == study.test.texts and loaded.train.labels == study.train.labels
    torch.testing.assert_close(loaded.train_acts, study.train_acts)
    torch.testing.assert_close(loaded.direction, study.direction)
    torch.testing.assert_close(loaded.direction_at(study.best_layer), study.direction)
    assert loaded.binary.scores_.equals(study.binary.scores_)  # refitted on first use
    with pytest.raises(UsageError, match="out of range"):
        loaded.direction_at(99)


def test_probe_study_load_errors(tmp_path):
    with pytest.raises(UsageError, match="run `python -m lens_safety probe"):
        ProbeStudy.load(tmp_path)
    (tmp_path / "probe_study.json").write_text("{}")
    with pytest.raises(UsageError, match="older version"):
        ProbeStudy.load(tmp_path)


def test_run_probe_study_is_a_deprecated_wrapper(tiny, data_dir):
    model, tok = tiny("tiny-llama")
    with pytest.warns(DeprecationWarning, match="ProbeStudy.build"):
        s = run_probe_study(HookBridge(model, tok), tok, data_dir=data_dir, n_per_class=20,
                            progress=False)
    assert s["n_train"] + s["n_test"] == 60
    assert s["direction"].shape == (model.config.hidden_size,)
    assert s["probes"].best_layer_ == s["best_layer"]


def test_probe_cli(data_dir, tmp_path, capsys):
    assert main(["probe", "--model", "tiny-gpt2", "--data-dir", str(data_dir), "--n-per-class",
                 "15", "--out", str(tmp_path)]) == 0
    assert "best layer" in capsys.readouterr().out
    assert (tmp_path / "probes.html").exists() and (tmp_path / "probe_study.json").exists()
    new = tmp_path / "d2.safetensors"
    # the direction command reads the probe run's own split: no data dir, no test size
    assert main(["direction", "--from", str(tmp_path), "--layer", "1", "--method", "pca",
                 "--out", str(new)]) == 0
    direction, meta = load_direction(new)
    assert meta["layer"] == 1 and meta["method"] == "pca"
    torch.testing.assert_close(direction, ProbeStudy.load(tmp_path).direction_at(1, "pca"))
    assert main(["direction", "--from", str(tmp_path), "--layer", "99", "--out", str(new)]) == 2
    assert "out of range" in capsys.readouterr().err
    assert main(["probe", "--model", "tiny-gpt2", "--data-dir", str(data_dir), "--n-per-class",
                 "100000"]) == 2
