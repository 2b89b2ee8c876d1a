"""Saved files (issue 27, item 3): every file is written atomically; a damaged cache is reported
in one warning and recomputed; a damaged file the user passes in is one UsageError naming it."""

import copy
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import plotly.graph_objects as go
import pytest
import torch
from plotly.offline import get_plotlyjs

from lens_safety import ProbeSettings, ProbeStudy
from lens_safety.cli import main as safety_main
from lens_safety.detox import DetoxResult, _saved_result
from lens_safety.edits.edit import Edit
from lens_safety.edits.leace import LeaceEraser
from lens_safety.probing import caching
from lens_safety.probing.caching import cache_residuals, read_tensors, save_tensors
from lens_safety.probing.directions import load_direction, save_direction
from pruning_bridge.bridge import HookBridge
from pruning_bridge.common import JsonDataclass
from pruning_bridge.common.errors import UsageError
from pruning_bridge.common.jsonable import read_json
from pruning_bridge.figures import save_figure

TEXTS = ["The weather today is mild.", "Hi", "You are all the same, every one of you.",
         "Cats sleep a lot.", "A longer sentence so that padding matters here, somewhat."]

DAMAGES = {  # name -> (bytes -> damaged bytes)
    "truncated": lambda data: data[: len(data) // 2],
    "garbage": lambda data: bytes(range(256)) * 4,
    "empty": lambda data: b"",
    "flipped": lambda data: data[:-8] + bytes(255 - b for b in data[-8:]),  # last bytes
}


def damage(path: Path, how) -> None:
    how = DAMAGES.get(how, how)
    path.write_bytes(how(path.read_bytes()))


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file in ``folder`` (temporary files included) with its bytes."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def crash_midway(monkeypatch, owner, name: str, path_arg: int) -> list[Path]:
    """Make ``owner.name`` write part of its file, then fail, as a crash or a full disk would;
    returns the list of paths it was asked to write."""
    asked = []

    def write(*args, **kwargs):
        path = Path(args[path_arg])
        asked.append(path)
        with open(path, "wb") as f:  # not path.write_bytes: that may be the patched writer
            f.write(b"partial")
        raise OSError("simulated crash while writing")

    monkeypatch.setattr(owner, name, write)
    return asked


def one_warning(caught, path: Path, says: str = "Recomputing") -> str:
    """The one warning about ``path``; it names the file and says it is recomputed."""
    about = [str(w.message) for w in caught if str(path) in str(w.message)]
    assert len(about) == 1, about
    assert says.lower() in about[0].lower() and "\n" not in about[0]
    return about[0]


@pytest.fixture(scope="module")
def gpt2(tiny):
    model, tok = tiny("tiny-gpt2")
    return HookBridge(model, tok), tok


def cache(bridge, tok, path=None, **kw):
    return cache_residuals(bridge, tok, TEXTS, layers=[0, 2], progress=False, store=path, **kw)


# ---------------------------------------------------------------- residual caches


@pytest.mark.parametrize("how", [*DAMAGES, "unreadable", "other_shape"])
def test_damaged_residual_cache_is_reported_once_and_recomputed(gpt2, tmp_path, monkeypatch,
                                                                how):
    bridge, tok = gpt2
    path = tmp_path / "acts.safetensors"
    fresh = cache(bridge, tok)
    cache(bridge, tok, path)
    expected_problem = {"truncated": "truncated", "garbage": "not a safetensors file",
                        "empty": "empty", "flipped": "checksum", "unreadable": "unreadable",
                        "other_shape": "shape"}[how]
    with monkeypatch.context() as patch:
        if how == "unreadable":
            def refuse(*args, **kwargs):
                raise PermissionError(13, "Permission denied")
            patch.setattr(caching, "safe_open", refuse)
        elif how == "other_shape":  # the right settings, the wrong tensor
            metadata = read_tensors(path, "")[1]
            save_tensors(path, {"residuals": torch.zeros(2, 3, 4)}, metadata)
        else:
            damage(path, how)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            again = cache(bridge, tok, path)
    assert expected_problem in one_warning(caught, path)
    assert torch.equal(again, fresh)
    tensors, _ = read_tensors(path, "")  # valid again, and reused as is
    assert torch.equal(tensors["residuals"], fresh)
    with monkeypatch.context() as patch:
        patch.setattr(caching, "run_with_cache", lambda *a, **k: pytest.fail("recomputed"))
        assert torch.equal(cache(bridge, tok, path), fresh)


def test_residual_cache_write_is_atomic(gpt2, tmp_path, monkeypatch):
    bridge, tok = gpt2
    path = tmp_path / "acts.safetensors"
    cache(bridge, tok, path)
    before = snapshot(tmp_path)
    crash_midway(monkeypatch, caching, "save_file", 1)
    with pytest.raises(OSError, match="simulated"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "other settings": recomputed, then written
        cache(bridge, tok, path, pool="mean")
    assert snapshot(tmp_path) == before  # the previous cache, no temporary file


@pytest.fixture(scope="module")
def study_folder(gpt2, data_dir, tmp_path_factory):
    bridge, tok = gpt2
    folder = tmp_path_factory.mktemp("study")
    settings = ProbeSettings(n_per_class=12, test_size=0.25, seed=1)
    study = ProbeStudy.build(bridge, tok, settings, data_dir=data_dir, model_name="tiny-gpt2",
                             folder=folder, progress=False)
    return study, folder


def test_rerun_with_a_truncated_study_cache_recomputes_it(gpt2, data_dir, study_folder,
                                                          tmp_path):
    """The issue's reproduction: truncate the training residuals and build again."""
    study, original = study_folder
    folder = shutil.copytree(original, tmp_path / "study")
    acts = folder / "acts_train_resid_post_last.safetensors"
    damage(acts, "truncated")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = ProbeStudy.build(*gpt2, study.settings, data_dir=data_dir,
                                 model_name="tiny-gpt2", folder=folder, progress=False)
    assert "truncated" in one_warning(caught, acts)
    assert torch.equal(again.train_acts, study.train_acts)
    assert again.summary()["best_layer"] == study.best_layer
    torch.testing.assert_close(ProbeStudy.load(folder).train_acts, study.train_acts)


# ---------------------------------------------------------------- files the user passes in


def assert_usage_error(load, path: Path, problem: str, fix: str) -> None:
    with pytest.raises(UsageError) as info:
        load()
    message = str(info.value)
    assert str(path) in message and problem in message and fix in message, message
    assert "\n" not in message


def saved_edit(folder: Path, seed: int = 0) -> Path:
    d = torch.randn(2, 64, generator=torch.Generator().manual_seed(seed))
    return Edit("subtract", [2, 0], directions=d, strengths=[1.0, 2.0]).save(folder)


EDIT_DAMAGES = [  # (file, damage, problem; the message names the file, or else the folder)
    ("edit.safetensors", "truncated", "truncated"),
    ("edit.safetensors", "garbage", "not a safetensors file"),
    ("edit.safetensors", "flipped", "checksum"),
    ("edit.json", "truncated", "not valid JSON"),
    ("edit.json", "garbage", "invalid UTF-8"),
    ("edit.json", lambda data: b"[1, 2]", "not a usable saved edit"),
    ("edit.json", lambda data: json.dumps({k: v for k, v in json.loads(data).items()
                                           if k != "how"}).encode(), "no key 'how'"),
    ("edit.json", lambda data: json.dumps({**json.loads(data), "strengths": [1.0]}).encode(),
     "one strength per layer"),
]


@pytest.mark.parametrize("name,how,problem", EDIT_DAMAGES)
def test_damaged_saved_edit_is_one_usage_error(tmp_path, name, how, problem):
    folder = saved_edit(tmp_path / "edit")
    damage(folder / name, how)
    names_file = isinstance(how, str)  # unreadable bytes: the file; unusable content: the edit
    assert_usage_error(lambda: Edit.load(folder), folder / name if names_file else folder,
                       problem, "Edit.save")


def test_edit_files_from_two_saves_are_refused(tmp_path):
    first, second = saved_edit(tmp_path / "a", seed=0), saved_edit(tmp_path / "b", seed=1)
    shutil.copy(second / "edit.safetensors", first / "edit.safetensors")
    assert_usage_error(lambda: Edit.load(first), first, "not the one saved with edit.json",
                       "Edit.save")


def test_edit_save_is_atomic_and_a_torn_pair_is_detected(tmp_path, monkeypatch):
    folder = saved_edit(tmp_path / "edit", seed=0)
    before = snapshot(folder)
    with monkeypatch.context() as patch:
        crash_midway(patch, caching, "save_file", 1)
        with pytest.raises(OSError, match="simulated"):
            saved_edit(folder, seed=1)
    assert snapshot(folder) == before and Edit.load(folder)
    with monkeypatch.context() as patch:  # the tensors are written, edit.json is not
        crash_midway(patch, Path, "write_bytes", 0)
        with pytest.raises(OSError, match="simulated"):
            saved_edit(folder, seed=1)
    assert snapshot(folder)["edit.json"] == before["edit.json"]
    assert sorted(snapshot(folder)) == sorted(before)  # no temporary file left
    assert_usage_error(lambda: Edit.load(folder), folder, "not the one saved", "Edit.save")


@pytest.mark.parametrize("how,problem", [
    ("truncated", "truncated"), ("garbage", "not a safetensors file"),
    ("flipped", "checksum"), ("other_tensor", "no 'direction' tensor"),
    ("bad_metadata", "damaged metadata")])
def test_damaged_direction_file_is_one_usage_error(tmp_path, how, problem):
    path = tmp_path / "harm.safetensors"
    save_direction(path, torch.randn(64), layer=3)
    if how == "other_tensor":
        save_tensors(path, {"weights": torch.randn(64)})
    elif how == "bad_metadata":
        save_tensors(path, {"direction": torch.randn(64)}, {"layer": "{not json"})
    else:
        damage(path, how)
    assert_usage_error(lambda: load_direction(path), path, problem, "save_direction")


def test_direction_and_eraser_saves_are_atomic(tmp_path, monkeypatch):
    eraser = LeaceEraser().fit(torch.randn(40, 8), torch.arange(40) % 2)
    save_direction(tmp_path / "d.safetensors", torch.randn(8))
    eraser.save(tmp_path / "e.safetensors")
    before = snapshot(tmp_path)
    crash_midway(monkeypatch, caching, "save_file", 1)
    with pytest.raises(OSError, match="simulated"):
        save_direction(tmp_path / "d.safetensors", torch.randn(8))
    with pytest.raises(OSError, match="simulated"):
        eraser.save(tmp_path / "e.safetensors")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("how,problem", [
    ("truncated", "truncated"), ("garbage", "not a safetensors file"),
    ("missing_key", "missing ['proj_left', 'proj_right']")])
def test_damaged_eraser_file_is_one_usage_error(tmp_path, how, problem):
    path = tmp_path / "eraser.safetensors"
    LeaceEraser().fit(torch.randn(40, 8), torch.arange(40) % 2).save(path)
    if how == "missing_key":
        save_tensors(path, {"mean": torch.zeros(8)})
    else:
        damage(path, how)
    assert_usage_error(lambda: LeaceEraser.load(path), path, problem, "LeaceEraser.save")


STUDY_DAMAGES = [
    ("probe_study.json", "truncated", "not valid JSON"),
    ("probe_study.json", lambda data: b"{}", "no key"),
    ("prompts.json", "garbage", "invalid UTF-8"),
    ("prompts.json", lambda data: b'[{"text": "x"}]', "no key 'split'"),
    ("acts_train_resid_post_last.safetensors", "truncated", "truncated"),
    ("acts_test_resid_post_last.safetensors", "garbage", "not a safetensors file"),
    ("direction", "flipped", "checksum"),
]


@pytest.mark.parametrize("name,how,problem", STUDY_DAMAGES)
def test_damaged_probe_study_folder_is_one_usage_error(study_folder, tmp_path, capsys, name,
                                                       how, problem):
    study, original = study_folder
    folder = shutil.copytree(original, tmp_path / "study")
    path = folder / (study.direction_file if name == "direction" else name)
    damage(path, how)
    fix = "direction" if name == "direction" else "Rerun the probe study"
    assert_usage_error(lambda: ProbeStudy.load(folder), path, problem, fix)
    out = tmp_path / "d.safetensors"  # the CLI that reads it: exit 2 and one line
    assert safety_main(["direction", "--from", str(folder), "--layer", "0", "--out",
                        str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and str(path) in err and "\n" not in err
    assert not out.exists()


def test_probe_study_save_is_atomic(study_folder, tmp_path, monkeypatch):
    study, original = study_folder
    study = copy.copy(study)  # save() records its folder: leave the shared one alone
    folder = shutil.copytree(original, tmp_path / "study")
    before = snapshot(folder)
    crash_midway(monkeypatch, Path, "write_bytes", 0)
    with pytest.raises(OSError, match="simulated"):
        study.save(folder)  # the safetensors files are rewritten, then prompts.json fails
    after = snapshot(folder)
    assert sorted(after) == sorted(before)  # no temporary file
    assert all(after[name] == before[name] for name in ("prompts.json", "probe_study.json"))
    loaded = ProbeStudy.load(folder)
    assert loaded.scores == study.scores and torch.equal(loaded.test_acts, study.test_acts)


# ---------------------------------------------------------------- JSON results and figures


@dataclass
class Row(JsonDataclass):
    value: int


def test_json_results_are_atomic_and_a_damaged_one_is_named(tmp_path, monkeypatch):
    path = tmp_path / "row.json"
    Row(1).to_json(path)
    assert Row.from_json(path).value == 1
    before = snapshot(tmp_path)
    with monkeypatch.context() as patch:
        crash_midway(patch, Path, "write_bytes", 0)
        with pytest.raises(OSError, match="simulated"):
            Row(2).to_json(path)
    assert snapshot(tmp_path) == before
    damage(path, "truncated")
    assert_usage_error(lambda: Row.from_json(path), path, "not valid JSON", "to_json")
    path.write_text('{"other": 1}')
    assert_usage_error(lambda: Row.from_json(path), path, "does not hold a Row", "to_json")
    assert_usage_error(lambda: read_json(tmp_path / "none.json"), tmp_path / "none.json",
                       "not found", "")


def test_damaged_detox_result_is_reported_and_recomputed(tmp_path):
    path = tmp_path / "detox_study.json"
    settings = {"seed": 0, "model": "tiny"}
    DetoxResult(settings, {}, [], None).to_json(path)
    assert _saved_result(path, settings) == DetoxResult(settings, {}, [], None)
    assert _saved_result(path, {**settings, "seed": 1}) is None  # other settings: rerun
    for how, problem in (("truncated", "not valid JSON"), (lambda data: b"[]", "not a saved"),
                         (lambda data: b'{"settings": {"seed": 0, "model": "tiny"}}',
                          "not a saved")):
        damage(path, how)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert _saved_result(path, settings) is None
        assert problem in one_warning(caught, path, says="Rerunning the study")
        DetoxResult(settings, {}, [], None).to_json(path)


def test_figures_are_written_atomically(tmp_path, monkeypatch):
    fig = go.Figure(go.Scatter(y=[1, 3, 2]))
    (tmp_path / "fig.html").write_text("old html")
    (tmp_path / "fig.png").write_bytes(b"old png")
    before = snapshot(tmp_path)
    with monkeypatch.context() as patch:
        crash_midway(patch, go.Figure, "write_html", 1)
        with pytest.raises(OSError, match="simulated"):
            save_figure(fig, tmp_path / "fig")
    after = snapshot(tmp_path)  # the folder's shared plotly.js may be there already, whole
    assert {name: data for name, data in after.items() if name != "plotly.min.js"} == before
    with monkeypatch.context() as patch:
        asked = crash_midway(patch, go.Figure, "write_image", 1)
        with pytest.warns(UserWarning, match="PNG export skipped"):
            written = save_figure(fig, tmp_path / "fig")
    assert written == [tmp_path / "fig.html"] and asked[0].suffix == ".png"  # kaleido's format
    assert snapshot(tmp_path)["fig.png"] == b"old png"
    assert set(snapshot(tmp_path)) == {"fig.html", "fig.png", "plotly.min.js"}
    assert (tmp_path / "plotly.min.js").read_text(encoding="utf-8") == get_plotlyjs()
    assert "plotly" in (tmp_path / "fig.html").read_text()


def test_lm_eval_results_are_written_atomically(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval", reason="the lm-eval extra is not installed")
    from pruning_bridge.evals.lm_eval_adapter import write_results

    path = write_results({"results": {"task": {"acc": 0.5}}}, tmp_path / "results.json")
    before = snapshot(tmp_path)
    crash_midway(monkeypatch, Path, "write_bytes", 0)
    with pytest.raises(OSError, match="simulated"):
        write_results({"results": {"task": {"acc": 0.9}}}, path)
    assert snapshot(tmp_path) == before and json.loads(before["results.json"])


def test_write_helpers_leave_no_temporary_file(tmp_path):
    save_tensors(tmp_path / "x.safetensors", {"a": torch.arange(3)})
    Row(1).to_json(tmp_path / "x.json")
    assert sorted(os.listdir(tmp_path)) == ["x.json", "x.safetensors"]
