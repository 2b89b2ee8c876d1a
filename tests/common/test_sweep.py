"""The one sweep runner, EvalSettings, and the stale-row bug: a sweep returns exactly its rows."""

import importlib
import json
from contextlib import contextmanager, nullcontext
from pathlib import Path

import pytest

from pruning_bridge.common.errors import UsageError
from pruning_bridge.common.results import ResultsLog
from pruning_bridge.common.sweep import Prepared, SweepRow, run_sweep
from pruning_bridge.evals import EvalSettings
from pruning_bridge.pruning.layer_sweep import layer_sweep
from pruning_bridge.pruning.weight_sweep import weight_sweep

tasks_module = importlib.import_module("pruning_bridge.evals.tasks")
layer_sweep_module = importlib.import_module("pruning_bridge.pruning.layer_sweep")


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------- EvalSettings


def test_eval_settings_parse_validate_and_identity(tiny, data_dir):
    model, _ = tiny("tiny-llama")
    s = EvalSettings("mmlu,perplexity", limit={"mmlu": 57, "perplexity": 4}, window=64,
                     data_dir=data_dir)
    assert s.tasks == ("mmlu", "perplexity")
    assert s.limit_for("mmlu") == 57 and s.limit_for("gsm8k") is None
    data = str(Path(data_dir).resolve())
    assert s.task_settings("mmlu", model) == {"shots": 0, "limit": 57, "seed": 0, "data": data}
    assert s.task_settings("perplexity", model) == {"window": 64, "limit": 4, "data": data}
    assert s.task_settings("gsm8k", model) == {"shots": 8, "limit": 131, "seed": 0,
                                               "max_new_tokens": 256, "data": data}
    # how fast a number comes is not part of its identity; where the data come from is
    fast = s.replace(batch_size=64, progress=False)
    assert fast.task_settings("mmlu", model) == s.task_settings("mmlu", model)
    assert EvalSettings(["mmlu"]).task_settings("mmlu", model)["data"] == "hub"
    # a default and the same value given explicitly are one identity
    default_window = EvalSettings(["perplexity"]).task_settings("perplexity", model)["window"]
    assert default_window == model.config.max_position_embeddings
    for bad in (dict(tasks="mmlu,bleu"), dict(tasks=[]), dict(limit=0),
                dict(limit={"bleu": 3}), dict(limit={"mmlu": -1}), dict(window=1),
                dict(batch_size=0), dict(shots=-1)):
        with pytest.raises(UsageError):
            EvalSettings(**bad)


# ---------------------------------------------------------------- the runner


class CountingEvaluator:
    """Measures ``subject * 10 + task index``; remembers every call."""

    def __init__(self, tasks=("a", "b"), version=1, model="m1"):
        self.tasks, self.version, self.calls = tasks, version, []
        self.model_identity = {"name": f"models/{model}", "weights": model, "dtype": "float32",
                               "device": "cpu"}

    def identity(self, task):
        return {"version": self.version}

    def __call__(self, subject, task):
        self.calls.append((subject, task))
        return {"metric": "m", "value": subject * 10 + self.tasks.index(task)}


def test_run_sweep_skips_finished_enters_once_and_returns_its_own_rows(tmp_path):
    entered = []

    @contextmanager
    def configured(value):
        entered.append(value)
        yield Prepared(value, {"extra": value / 2})

    rows = [SweepRow("m", {"x": x}, lambda x=x: configured(x)) for x in (1, 2)]
    out = tmp_path / "r.jsonl"
    first = CountingEvaluator()
    got = run_sweep(rows, first, out)
    assert [(r["config"]["x"], r["task"], r["value"], r["extra"]) for r in got] == [
        (1, "a", 10, 0.5), (1, "b", 11, 0.5), (2, "a", 20, 1.0), (2, "b", 21, 1.0)]
    assert entered == [1, 2]  # one context per row, for all its tasks
    assert all(isinstance(r["seconds"], float) for r in got)

    again = CountingEvaluator()
    assert run_sweep(rows, again, out) == got and again.calls == [] and entered == [1, 2]

    # other settings (another version): computed, and only those rows returned
    other = CountingEvaluator(version=2)
    got2 = run_sweep(rows, other, out)
    assert len(other.calls) == 4 and len(got2) == 4
    model = {"weights": "m1", "dtype": "float32", "device": "cpu"}
    assert all(r["settings"] == {"version": 2, "model": model} for r in got2)
    assert all(r["model_name"] == "models/m1" for r in got2)
    assert len(jsonl(out)) == 8
    # a subset of the sweep returns a subset, in sweep order; finished tasks are not recomputed
    more = CountingEvaluator(tasks=("b", "c"))
    got3 = run_sweep(rows[::-1], more, out)
    assert more.calls == [(2, "c"), (1, "c")]
    assert [(r["config"]["x"], r["task"]) for r in got3] == [(2, "b"), (2, "c"), (1, "b"),
                                                             (1, "c")]


def test_results_log_selects_by_full_key_and_stores_rows_as_json_reads_them(tmp_path):
    log = ResultsLog(tmp_path / "r.jsonl")
    row = log.append({"method": "m", "config": {"layers": (1, 2)}, "task": "t",
                      "settings": {"w": 1}, "value": 0.5})
    assert row["config"] == {"layers": [1, 2]}  # as a rerun will read it back
    log.append({"method": "m", "config": {"layers": [1, 2]}, "task": "t",
                "settings": {"w": 2}, "value": 0.7})
    reread = ResultsLog(tmp_path / "r.jsonl")
    assert reread.rows == log.rows
    keys = [("m", {"layers": [1, 2]}, "t", {"w": 2}), ("m", {"layers": [1, 2]}, "t", {"w": 3}),
            ("m", {"layers": [1, 2]}, "t", {"w": 1})]
    assert [r["value"] for r in reread.select(keys)] == [0.7, 0.5]
    assert reread.get(*keys[1]) is None and reread.has(*keys[0])


def test_run_sweep_rows_can_yield_any_subject():
    rows = [SweepRow("edit", {"alpha": a}, lambda a=a: nullcontext(a)) for a in (3, 4)]
    log = ResultsLog()
    got = run_sweep(rows, CountingEvaluator(tasks=("a",)), log)
    assert [r["value"] for r in got] == [30, 40] and log.rows == got


# ---------------------------------------------------------------- the stale-row bug


@pytest.fixture
def counted_evaluations(monkeypatch):
    """Every task evaluation and every prefix-reusing pass, by task."""
    calls = []
    real = tasks_module.evaluate

    def counting(model, tokenizer, task, settings):
        calls.append(task)
        return real(model, tokenizer, task, settings)

    monkeypatch.setattr(tasks_module, "evaluate", counting)
    for task, fn in list(layer_sweep_module.REUSABLE.items()):
        def reused(*args, fn=fn, task=task):
            calls.append(f"{task} (prefix reuse)")
            return fn(*args)
        monkeypatch.setitem(layer_sweep_module.REUSABLE, task, reused)
    return calls


@pytest.mark.parametrize("reuse_prefix", [True, False])
def test_layer_sweeps_with_other_settings_return_only_their_rows(tiny, data_dir, tmp_path,
                                                                 counted_evaluations,
                                                                 reuse_prefix):
    model, tok = tiny("tiny-llama")  # 4 layers: the unpruned model + 4 rows per task
    out = tmp_path / "layers.jsonl"

    def sweep(window):
        settings = EvalSettings(["perplexity"], limit=2, window=window, data_dir=data_dir,
                                progress=False)
        return layer_sweep(model, tok, settings, out=out, reuse_prefix=reuse_prefix)

    wide = sweep(32)
    narrow = sweep(16)
    assert len(wide) == len(narrow) == 5  # not 10: the window-32 rows are not the window-16 ones
    assert {r["settings"]["window"] for r in wide} == {32}
    assert {r["settings"]["window"] for r in narrow} == {16}
    assert [r["config"]["removed"] for r in narrow] == [[], [0], [1], [2], [3]]
    assert len(jsonl(out)) == 10
    calls = len(counted_evaluations)
    assert sweep(32) == wide and sweep(16) == narrow  # a rerun recomputes nothing
    assert len(counted_evaluations) == calls and len(jsonl(out)) == 10


def test_layer_sweep_fast_path_and_plain_path_write_the_same_keys(tiny, data_dir, tmp_path,
                                                                  counted_evaluations):
    model, tok = tiny("tiny-llama")
    out = tmp_path / "layers.jsonl"
    settings = EvalSettings(["mmlu", "perplexity"], limit=2, window=32, data_dir=data_dir,
                            progress=False)
    fast = layer_sweep(model, tok, settings, out=out, chunk=3)
    assert counted_evaluations == ["mmlu (prefix reuse)"] * 2 + ["perplexity (prefix reuse)"] * 2
    plain = layer_sweep(model, tok, settings, out=out, reuse_prefix=False)
    assert plain == fast and len(counted_evaluations) == 4  # the naive loop found every row
    assert [(r["task"], r["config"]["removed"]) for r in fast] == [
        (t, removed) for removed in ([], [0], [1], [2], [3]) for t in ("mmlu", "perplexity")]


def test_weight_sweeps_with_other_settings_return_only_their_rows(tiny, data_dir, tmp_path,
                                                                  counted_evaluations):
    model, tok = tiny("tiny-llama")
    out = tmp_path / "weights.jsonl"

    def sweep(window):
        settings = EvalSettings(["perplexity"], limit=2, window=window, data_dir=data_dir,
                                progress=False)
        return weight_sweep(model, tok, settings, [0.2, 0.5], ["magnitude"], out=out)

    wide, narrow = sweep(32), sweep(16)
    assert len(wide) == len(narrow) == 3  # dense + two sparsities, not 6
    assert [(r["method"], r["config"]["sparsity"], r["settings"]["window"]) for r in narrow] == [
        ("dense", 0.0, 16), ("magnitude", 0.2, 16), ("magnitude", 0.5, 16)]
    assert narrow[2]["achieved_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert counted_evaluations == ["perplexity"] * 6 and len(jsonl(out)) == 6
    assert sweep(32) == wide and sweep(16) == narrow
    assert len(counted_evaluations) == 6 and len(jsonl(out)) == 6
