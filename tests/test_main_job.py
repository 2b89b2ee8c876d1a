"""The main job's smoke preset end to end: every stage, the HTML report, and resuming."""

import importlib.util
import json
from pathlib import Path

import pytest

from pruning_bridge.figures.report import format_duration
from pruning_bridge.common.results import ResultsLog

# the package re-exports functions with these modules' names, so import the modules themselves
training = importlib.import_module("pruning_bridge.heads.training")
layer_sweep = importlib.import_module("pruning_bridge.pruning.layer_sweep")
tasks = importlib.import_module("pruning_bridge.evals.tasks")

ROOT = Path(__file__).resolve().parents[1]


def load_job():
    spec = importlib.util.spec_from_file_location("reproduce_report",
                                                  ROOT / "examples" / "reproduce_report.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    return job


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def forbid(*_, **__):
    raise AssertionError("finished work was recomputed")


def test_smoke_run_writes_the_report_and_resumes_without_recomputing(tmp_path, data_dir,
                                                                    monkeypatch, capsys):
    job = load_job()
    out, figures = tmp_path / "results", tmp_path / "figures"
    argv = ["--preset", "smoke", "--data-dir", str(data_dir), "--out", str(out),
            "--figures", str(figures)]

    # 1. Killed in the middle of the head sweep (after its 3rd finished row).
    sweep_file = out / "tiny-qwen3" / "heads" / "head_sweep.jsonl"
    append = ResultsLog.append

    def killed(log, row):
        if log.path == sweep_file and len(log.rows) == 3:
            raise KeyboardInterrupt
        return append(log, row)

    monkeypatch.setattr(ResultsLog, "append", killed)
    with pytest.raises(KeyboardInterrupt):
        job.main(argv)
    first_rows = jsonl(sweep_file)
    assert len(first_rows) == 3
    # the run record saved each stage as it ended, and the interrupted one's partial seconds
    record_file = out / "run_smoke.json"
    attempts = json.loads(record_file.read_text())["attempts"]
    assert [(a["stage"], a["run"], a["finished"], a["error"]) for a in attempts] == [
        ("baseline", 1, True, None), ("layers", 1, True, None), ("weights", 1, True, None),
        ("heads", 1, False, "KeyboardInterrupt")]
    assert all(a["seconds"] > 0 and a["peak_rss_gib"] > 0 for a in attempts)
    # a damaged cache of the job's own is recomputed with a one-line warning
    influence_file = out / "tiny-llama" / "block_influence.json"
    influence = json.loads(influence_file.read_text())["block_influence"]
    influence_file.write_text('{"block_influence": [0.1,')
    capsys.readouterr()
    finished = {p: p.read_bytes() for p in out.rglob("*.json*")
                if p not in (record_file, influence_file)}

    # 2. Resumed: nothing finished runs again; only the missing head-sweep rows are computed.
    monkeypatch.undo()
    real, resumed = tasks.evaluate, []
    monkeypatch.setattr(tasks, "evaluate",
                        lambda *a, **k: resumed.append(a[2]) or real(*a, **k))
    for task in list(layer_sweep.REUSABLE):
        monkeypatch.setitem(layer_sweep.REUSABLE, task, forbid)
    monkeypatch.setattr(training, "lm_loss", forbid)  # a router training step
    monkeypatch.setattr(job, "mmlu_accuracy", forbid)
    monkeypatch.setattr(job, "gsm8k_accuracy", forbid)
    report = job.main(argv)
    warned = [line for line in capsys.readouterr().err.splitlines()
              if line.startswith("warning:")]
    assert warned == [f"warning: {influence_file} is not valid JSON, truncated or damaged "
                      f"(Expecting value at line 1); computing it again."]
    assert json.loads(influence_file.read_text())["block_influence"] == pytest.approx(influence)

    rows = jsonl(sweep_file)
    # full + (routed, removed) x 3 fractions, each on MMLU and perplexity
    assert len(rows) == 14 and rows[:3] == first_rows
    assert len(resumed) == 11
    assert len({json.dumps([r["method"], r["config"], r["task"]]) for r in rows}) == 14
    for path, content in finished.items():
        if path != sweep_file:
            assert path.read_bytes() == content, f"{path} was rewritten"

    html = report.read_text()
    # Figures 1 and 2, four for the heads (gates, gradients, training, sweep), two for the head
    # view, two for the probes, the detox Pareto front, the comparison with the published edits
    assert html.count('class="plotly-graph-div"') == 12
    for title in ("Baseline: tiny-llama", "Figure 1: layer removal", "Figure 2: weight pruning",
                  "Figure 3: routed heads (tiny-qwen3)", "Head view: attention patterns",
                  "Safety: probes", "Safety: detoxification on RealToxicityPrompts",
                  "expected_max_toxicity", "scorer agreement with Perspective",
                  "Safety: our edit vs the published detox edits", "every method&#x27;s pick",
                  "Selected over every method"):
        assert title in html
    assert "src=\"http" not in html and "Provenance" in html and "total run time" in html
    # the run time adds up both runs: every attempt of run 1, and the stages run 2 finished
    saved = json.loads(record_file.read_text())
    run1 = sum(a["seconds"] for a in saved["attempts"] if a["run"] == 1)
    run2 = sum(a["seconds"] for a in saved["attempts"]
               if a["run"] == 2 and a["stage"] in ("heads", "attention", "safety"))
    assert [r["outcome"] for r in saved["runs"]] == ["stopped in heads (KeyboardInterrupt)",
                                                     "completed"]
    assert f"total run time {format_duration(run1 + run2)} over 2 runs (resumed)" in html
    assert "Resumed: this report combines 2 runs" in html
    for stem in ("figure1_layer_removal", "figure2_weight_pruning", "figure3_head_importance",
                 "figure3_head_sweep", "attention_heads", "attention_head_summary",
                 "safety_probes", "safety_projection_histogram", "safety_pareto",
                 "safety_comparison"):
        assert (figures / f"{stem}.html").exists()


def test_unknown_preset_is_refused(capsys):
    with pytest.raises(SystemExit):
        load_job().main(["--preset", "huge"])
    assert "invalid choice" in capsys.readouterr().err



def test_baseline_results_are_reused_only_for_the_same_model_and_settings(tmp_path, capsys):
    from pruning_bridge.evals import EvalResult

    job = load_job()
    path, computed = tmp_path / "baseline_mmlu.json", []

    def compute(value):
        def run():
            computed.append(value)
            return EvalResult("mmlu", "accuracy", value, {"limit": 4})
        return run

    model_a = {"model": {"weights": "aaaa", "dtype": "float32", "device": "cpu"}, "limit": 4}
    model_b = {**model_a, "model": {**model_a["model"], "dtype": "bfloat16"}}
    assert job.cached(path, compute(0.25), model_a).value == 0.25
    assert job.cached(path, compute(0.5), model_a).value == 0.25 and computed == [0.25]
    assert job.cached(path, compute(0.5), model_b).value == 0.5  # another dtype: recomputed
    assert "computed for another model or other settings" in capsys.readouterr().err
    assert job.cached(path, compute(0.75), {**model_b, "limit": 8}).value == 0.75
    assert computed == [0.25, 0.5, 0.75]
