"""Malformed data lines and a torn results file through both command lines: one line naming
``--data-dir`` and the file and line to fix (exit 2), or, for a results file, a warning and a
finished run (its rows are kept)."""

import json
import shutil
import warnings

import pytest
from cli_checks import exit_status, one_error_line

from lens_safety.cli import main as safety_main
from pruning_bridge.cli import main as bridge_main


@pytest.fixture
def bad_data(data_dir, tmp_path):
    """A copy of the data folder's small files with one malformed line or row each."""
    root = tmp_path / "data"
    (root / "gsm8k").mkdir(parents=True)
    lines = (data_dir / "gsm8k" / "test.jsonl").read_text().splitlines()[:3]
    (root / "gsm8k" / "test.jsonl").write_text("\n".join([*lines, '{"question": "cut']) + "\n")
    shutil.copy(data_dir / "gsm8k" / "train.jsonl", root / "gsm8k" / "train.jsonl")
    shutil.copytree(data_dir / "mmlu", root / "mmlu")
    csv = sorted((root / "mmlu" / "data" / "test").glob("*_test.csv"))[0]
    with open(csv, "a") as f:
        f.write('only a question,"A\n')
    (root / "rtp").mkdir()
    toxic = (data_dir / "rtp" / "toxic.jsonl").read_text().splitlines()[:5]
    (root / "rtp" / "toxic.jsonl").write_text("\n".join([*toxic, "not json"]) + "\n")
    shutil.copy(data_dir / "rtp" / "nontoxic.jsonl", root / "rtp" / "nontoxic.jsonl")
    return root, csv


@pytest.mark.parametrize("main, argv, names", [
    (bridge_main, ["eval", "--model", "tiny-gpt2", "--task", "gsm8k", "--limit", "2"],
     "gsm8k/test.jsonl, line 4: not valid JSON"),
    (bridge_main, ["eval", "--model", "tiny-gpt2", "--task", "mmlu", "--limit", "2"],
     "_test.csv, row "),
    (safety_main, ["rtp", "--model", "tiny-gpt2", "--n-toxic", "2"],
     "rtp/toxic.jsonl, line 6: not valid JSON"),
])
def test_a_malformed_data_line_is_one_line_naming_the_file_and_line(main, argv, names, bad_data,
                                                                   capsys):
    root, _ = bad_data
    assert exit_status(main, [*argv, "--data-dir", str(root)]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"error: --data-dir {root}: ") and names in line, line


def test_a_torn_results_file_warns_keeps_the_line_and_finishes(data_dir, tmp_path, capsys):
    out = tmp_path / "w.jsonl"
    argv = ["weights", "--model", "tiny-gpt2", "--tasks", "perplexity", "--limit", "1",
            "--window", "32", "--sparsities", "0.5", "--data-dir", str(data_dir),
            "--out", str(out)]
    assert bridge_main(argv) == 0
    rows = out.read_text().splitlines()
    out.write_text(rows[0] + "\n" + rows[1][: len(rows[1]) // 2])  # killed mid-line
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert bridge_main(argv) == 0
    assert any("w.jsonl, line 2: skipped" in str(w.message) for w in caught)
    lines = out.read_text().splitlines()
    assert lines[:2] == [rows[0], rows[1][: len(rows[1]) // 2]]  # nothing deleted
    again, lost = json.loads(lines[2]), json.loads(rows[1])  # the lost row computed again
    assert {**again, "seconds": 0} == {**lost, "seconds": 0}
    assert len(lines) == 3
