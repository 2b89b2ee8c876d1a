"""The main job's run record: the seconds and peak memory of every stage attempt, saved as each
stage ends, so that a report written after a resumed run shows what its results really cost.

    record = RunRecord.begin(out / "run_smoke.json", settings)
    with record.stage("baseline"):
        ...                                   # recorded when it ends, finished or interrupted
    record.end(wall_s, completed=True)
    record.total_seconds, record.runs, record.stage_rows()

The record (JSON, rewritten atomically under a file lock after every stage) holds the run's
settings, one entry per run and one per stage attempt. What it reports:

- a stage's **compute time** is the sum of its attempts until it first finished: an interrupted
  attempt counts (its finished rows are kept and reused), and a later run that finds the stage
  finished reuses its results and adds nothing. A rerun after a completed run therefore leaves
  the totals as they were; it is listed among the runs with its own wall time.
- a stage's **peak memory** is the highest over those attempts.
- **runs** are the runs that added compute time; more than one means the results were resumed.

A record written for other settings, or a damaged one, is replaced by a fresh record (with one
warning). A run killed outright (SIGKILL, power loss) cannot record the stage it was in, and a
stage recomputed after it finished (its result files deleted) is not added: delete the record
with the results to measure afresh.
"""

from __future__ import annotations

import json
import warnings
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from .atomic import file_lock, write_json_atomic
from .errors import UsageError
from .jsonable import read_json
from .memory import PeakMemory

FORMAT = 1


class RunRecordWarning(UserWarning):
    """A run record could not be used (damaged, or for other settings): a fresh one starts."""


def _normalised(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` as they read back from JSON (tuples as lists, other objects as strings)."""
    return json.loads(json.dumps(settings, sort_keys=True, default=str))


def _well_formed(data: Any) -> bool:
    """Whether ``data`` has the record's shape (a JSON file can hold anything)."""
    if not (isinstance(data, dict) and data.get("format") == FORMAT
            and isinstance(data.get("runs"), list) and isinstance(data.get("attempts"), list)):
        return False
    runs_ok = all(isinstance(r, dict) and isinstance(r.get("run"), int) for r in data["runs"])
    return runs_ok and all(
        isinstance(a, dict) and isinstance(a.get("stage"), str) and isinstance(a.get("run"), int)
        and isinstance(a.get("seconds"), (int, float)) and isinstance(a.get("finished"), bool)
        for a in data["attempts"])


def read_record(path: Path, settings: Mapping[str, Any]) -> dict[str, Any] | None:
    """The record in ``path`` if it is usable for ``settings``; None (with one warning if the file
    exists) otherwise."""
    if not path.exists():
        return None
    try:
        data = read_json(path)
    except UsageError as error:
        problem = str(error)
    else:
        if not _well_formed(data):
            problem = f"{path} is not a run record"
        elif data.get("settings") != _normalised(settings):
            problem = f"{path} was written for other settings"
        else:
            return data
    warnings.warn(f"{problem}; a new run record starts.", RunRecordWarning, stacklevel=3)
    return None


def _counted(attempts: list[dict]) -> list[dict]:
    """The attempts (in order) up to and including the first that finished."""
    for k, attempt in enumerate(attempts):
        if attempt["finished"]:
            return attempts[:k + 1]
    return attempts


def _max(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return max(known) if known else None


class RunRecord:
    """The run record of one run of the main job (see the module docstring)."""

    def __init__(self, path: Path, settings: Mapping[str, Any], data: dict[str, Any], run: int):
        self.path, self.settings, self.data, self.run = path, _normalised(settings), data, run

    @classmethod
    def begin(cls, path: str | Path, settings: Mapping[str, Any]) -> RunRecord:
        """Open the record in ``path`` (a fresh one if it is missing, damaged or for other
        settings) and add this run to it."""
        path = Path(path)
        with file_lock(path):
            data = read_record(path, settings) or {"format": FORMAT,
                                                   "settings": _normalised(settings),
                                                   "runs": [], "attempts": []}
            run = max((r["run"] for r in data["runs"]), default=0) + 1
            data["runs"].append({"run": run, "started": datetime.now().astimezone().isoformat(
                timespec="seconds"), "wall_s": None, "outcome": "running"})
            write_json_atomic(path, data, indent=1)
        return cls(path, settings, data, run)

    def _update(self, change: Callable[[dict[str, Any]], None]) -> None:
        """Apply ``change`` to the record on disk (other runs may have added to it) and save."""
        with file_lock(self.path):
            with warnings.catch_warnings():  # a bad file now is reported by the next begin()
                warnings.simplefilter("ignore", RunRecordWarning)
                data = read_record(self.path, self.settings) or self.data
            change(data)
            write_json_atomic(self.path, data, indent=1)
        self.data = data

    @contextmanager
    def stage(self, name: str) -> Iterator[PeakMemory]:
        """Measure the block as an attempt at stage ``name``; it is saved when the block ends,
        also when it raises (then as unfinished, with the partial seconds)."""
        peak, error = PeakMemory(), None
        try:
            with peak:
                yield peak
        except BaseException as exc:
            error = type(exc).__name__
            raise
        finally:
            attempt = {"stage": name, "run": self.run,
                       "seconds": round(peak.seconds, 2),
                       "finished": error is None, "error": error, **peak.to_dict()}
            self._update(lambda data: data["attempts"].append(attempt))

    def end(self, wall_s: float, completed: bool) -> None:
        """Save how this run ended: its wall time, and completed or where it stopped."""
        mine = [a for a in self.data["attempts"] if a["run"] == self.run]
        stopped = next((a for a in reversed(mine) if not a["finished"]), None)
        outcome = ("completed" if completed else
                   f"stopped in {stopped['stage']} ({stopped['error']})" if stopped else "stopped")

        def change(data: dict[str, Any]) -> None:
            for run in data["runs"]:
                if run["run"] == self.run:
                    run.update(wall_s=round(wall_s, 1), outcome=outcome)

        self._update(change)

    # ---------------------------------------------------------------- what the report shows

    def _by_stage(self) -> dict[str, list[dict]]:
        stages: dict[str, list[dict]] = {}
        for attempt in self.data["attempts"]:
            stages.setdefault(attempt["stage"], []).append(attempt)
        return stages

    def _all_counted(self) -> list[dict]:
        return [a for tried in self._by_stage().values() for a in _counted(tried)]

    @property
    def total_seconds(self) -> float:
        """The compute time of the results: every stage's attempts until it first finished."""
        return sum(a["seconds"] for a in self._all_counted())

    @property
    def runs(self) -> list[int]:
        """The runs that added compute time (more than one: the results were resumed)."""
        return sorted({a["run"] for a in self._all_counted()})

    def stage_rows(self) -> list[dict[str, Any]]:
        """One row per stage: compute seconds and runs over its counted attempts, the peak
        memory over them, and this run's own seconds."""
        rows = []
        for stage, tried in self._by_stage().items():
            counted = _counted(tried)
            mine = [a["seconds"] for a in tried if a["run"] == self.run]
            rows.append({
                "stage": stage, "compute (s)": round(sum(a["seconds"] for a in counted), 1),
                "runs": len(counted),
                "peak RSS (GiB)": _max([a.get("peak_rss_gib") for a in counted]),
                "CUDA peak (GiB)": _max([a.get("cuda_peak_gib") for a in counted]),
                "this run (s)": round(sum(mine), 1) if mine else None})
        return rows

    def run_rows(self) -> list[dict[str, Any]]:
        """One row per run: when it started, its wall time, how it ended, what it added."""
        counted = self._all_counted()
        return [{"run": r["run"], "started": r.get("started"), "wall time (s)": r.get("wall_s"),
                 "outcome": r.get("outcome"),
                 "compute added (s)": round(sum(a["seconds"] for a in counted
                                                if a["run"] == r["run"]), 1)}
                for r in self.data["runs"]]

    def notes(self, wall_s: float) -> str:
        """What the run time means, whether the results were resumed, and this run's part."""
        runs = self.runs
        text = ("Run time: the compute time of these results, per stage the seconds of every "
                "attempt until the stage first finished (an interrupted attempt counts, since "
                "its finished rows are kept and reused; a run that finds a stage finished "
                "reuses it and adds nothing). Peak memory: the highest over those attempts.")
        if len(runs) > 1:
            text += (f" Resumed: this report combines {len(runs)} runs (runs "
                     f"{', '.join(map(str, runs))} of the record {self.path.name}).")
        if self.run not in runs:
            text += (f" This run found every stage finished by earlier runs and reused their "
                     f"results: its {wall_s:.0f} s of wall time are not counted.")
        else:
            text += f" This run took {wall_s:.0f} s of wall time."
        return text
