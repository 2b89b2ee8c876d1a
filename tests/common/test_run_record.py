"""The main job's run record: stages saved as they end, resumed runs added up (no models)."""

import json
import time
import warnings

import pytest

from pruning_bridge.common import run_record
from pruning_bridge.figures.report import write_report
from pruning_bridge.common.run_record import RunRecord, RunRecordWarning

SETTINGS = {"preset": "smoke", "dtype": "float32", "sparsities": (0.1, 0.5), "detox": object}


class FakePeak:
    """Stands in for PeakMemory: a block that 'took' ``seconds`` and peaked at ``rss`` GiB."""

    def __init__(self, seconds: float, rss: float, cuda: float | None = None):
        self.seconds, self.rss, self.cuda = seconds, rss, cuda

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return None

    def to_dict(self):
        return {"peak_rss_gib": self.rss, "extra_rss_gib": 0.0, "cuda_peak_gib": self.cuda}


@pytest.fixture
def peaks(monkeypatch):
    """Queue the (seconds, rss[, cuda]) of the next stage attempts."""
    queue = []
    monkeypatch.setattr(run_record, "PeakMemory", lambda: FakePeak(*queue.pop(0)))
    return queue


def saved(path):
    return json.loads(path.read_text())


def run(path, stages, fail_in=None, error=KeyboardInterrupt):
    """One run of ``stages``; raises ``error`` inside stage ``fail_in`` (then ends unfinished)."""
    record = RunRecord.begin(path, SETTINGS)
    try:
        for name in stages:
            with record.stage(name):
                if name == fail_in:
                    raise error
        record.end(12.0, completed=True)
    except BaseException:
        record.end(5.0, completed=False)
    return record


def test_each_stage_is_saved_as_it_ends(tmp_path):
    path = tmp_path / "run_smoke.json"
    record = RunRecord.begin(path, SETTINGS)
    with record.stage("baseline"):
        time.sleep(0.02)
    with record.stage("layers"):
        on_disk = saved(path)  # while the second stage runs, the first is already saved
        assert [(a["stage"], a["run"], a["finished"]) for a in on_disk["attempts"]] == [
            ("baseline", 1, True)]
        assert on_disk["attempts"][0]["seconds"] >= 0.02
        assert on_disk["attempts"][0]["peak_rss_gib"] > 0
        assert on_disk["runs"] == [{"run": 1, "started": on_disk["runs"][0]["started"],
                                    "wall_s": None, "outcome": "running"}]
    record.end(3.0, completed=True)
    on_disk = saved(path)
    assert [a["stage"] for a in on_disk["attempts"]] == ["baseline", "layers"]
    assert on_disk["runs"][0]["wall_s"] == 3.0 and on_disk["runs"][0]["outcome"] == "completed"
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically: no temporary file left


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_an_interrupted_stage_keeps_the_earlier_ones_and_its_partial_seconds(tmp_path, error):
    path = tmp_path / "run_smoke.json"
    record = RunRecord.begin(path, SETTINGS)
    with record.stage("baseline"):
        pass
    with pytest.raises(error), record.stage("layers"):
        time.sleep(0.05)
        raise error
    record.end(0.1, completed=False)
    on_disk = saved(path)
    first, second = on_disk["attempts"]
    assert first["stage"] == "baseline" and first["finished"] and first["error"] is None
    assert second["stage"] == "layers" and not second["finished"]
    assert second["seconds"] >= 0.05
    name = error.__name__
    assert second["error"] == name
    assert on_disk["runs"][0]["outcome"] == f"stopped in layers ({name})"


def test_a_resumed_run_adds_up_seconds_and_takes_the_highest_peak(tmp_path, peaks):
    path = tmp_path / "run_smoke.json"
    # run 1: baseline finishes, layers is interrupted after 7 s
    peaks += [(10.0, 1.0), (7.0, 3.0, 0.5)]
    run(path, ["baseline", "layers", "heads"], fail_in="layers")
    # run 2: baseline is reused (1 s, not added), layers finishes in 5 s, heads takes 20 s
    peaks += [(1.0, 9.0), (5.0, 2.0, 0.25), (20.0, 4.0)]
    record = run(path, ["baseline", "layers", "heads"])

    assert record.run == 2 and record.runs == [1, 2]
    assert record.total_seconds == pytest.approx(10 + 7 + 5 + 20)
    rows = {r["stage"]: r for r in record.stage_rows()}
    assert rows["baseline"] == {"stage": "baseline", "compute (s)": 10.0, "runs": 1,
                                "peak RSS (GiB)": 1.0, "CUDA peak (GiB)": None,
                                "this run (s)": 1.0}
    assert rows["layers"] == {"stage": "layers", "compute (s)": 12.0, "runs": 2,
                              "peak RSS (GiB)": 3.0, "CUDA peak (GiB)": 0.5,
                              "this run (s)": 5.0}
    assert rows["heads"]["compute (s)"] == 20.0 and rows["heads"]["runs"] == 1
    assert [(r["run"], r["outcome"], r["compute added (s)"]) for r in record.run_rows()] == [
        (1, "stopped in layers (KeyboardInterrupt)", 17.0), (2, "completed", 25.0)]
    assert "Resumed: this report combines 2 runs" in record.notes(26.0)

    # run 3, after the completed one: it reuses everything, so the totals stay as they were
    peaks += [(1.0, 1.0), (1.0, 1.0), (2.0, 1.0)]
    again = run(path, ["baseline", "layers", "heads"])
    assert again.run == 3 and again.runs == [1, 2]
    assert again.total_seconds == pytest.approx(42.0)
    assert again.run_rows()[-1]["compute added (s)"] == 0
    assert "its 4 s of wall time are not counted" in again.notes(4.0)


def test_the_report_says_it_was_resumed(tmp_path, peaks):
    path = tmp_path / "run_smoke.json"
    peaks += [(30.0, 1.0), (8.8, 1.0), (40.0, 1.0)]
    run(path, ["baseline", "layers"], fail_in="layers")
    record = run(path, ["layers"])
    page = write_report(tmp_path / "report.html", [], title="t", settings={}, provenance={},
                        run_time_s=record.total_seconds, runs=len(record.runs),
                        notes=record.notes(41.0)).read_text()
    assert "total run time 1 min 19 s over 2 runs (resumed)" in page
    assert "Resumed: this report combines 2 runs" in page

    peaks.append((79.0, 1.0))
    clean = RunRecord.begin(tmp_path / "other.json", SETTINGS)
    with clean.stage("baseline"):
        pass
    assert clean.runs == [1] and "Resumed" not in clean.notes(1.0)


@pytest.mark.parametrize("content", [b'{"format": 1, "runs": [', b"\xff\xfe garbage", b"null",
                                     b'{"format": 1, "runs": [], "attempts": [{"stage": 3}]}'])
def test_a_damaged_record_gives_one_warning_and_a_fresh_record(tmp_path, content):
    path = tmp_path / "run_smoke.json"
    path.write_bytes(content)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        record = RunRecord.begin(path, SETTINGS)
    assert [w.category for w in caught] == [RunRecordWarning]
    message = str(caught[0].message)
    assert str(path) in message and "a new run record starts" in message and "\n" not in message
    assert record.run == 1 and saved(path)["attempts"] == []
    with record.stage("baseline"):
        pass
    assert [a["stage"] for a in saved(path)["attempts"]] == ["baseline"]


def test_other_settings_start_a_new_record(tmp_path):
    path = tmp_path / "run_smoke.json"
    run(path, ["baseline"])
    with pytest.warns(RunRecordWarning, match="other settings"):
        record = RunRecord.begin(path, {**SETTINGS, "dtype": "bfloat16"})
    assert record.run == 1 and record.total_seconds == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert RunRecord.begin(path, {**SETTINGS, "dtype": "bfloat16"}).run == 2


def test_two_runs_sharing_a_record_keep_each_others_attempts(tmp_path):
    path = tmp_path / "run_smoke.json"
    first, second = RunRecord.begin(path, SETTINGS), RunRecord.begin(path, SETTINGS)
    with first.stage("baseline"):
        pass
    with second.stage("layers"):
        pass
    assert (first.run, second.run) == (1, 2)
    assert [(a["stage"], a["run"]) for a in saved(path)["attempts"]] == [("baseline", 1),
                                                                          ("layers", 2)]
