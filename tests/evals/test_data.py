"""Tests of the offline data loaders against the real files in ../shared/data (no network)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from pruning_bridge.evals.data import (
    DataNotFoundError,
    GSM8KProblem,
    MMLUQuestion,
    gsm8k_target,
    load_gsm8k,
    load_mmlu,
    load_wikitext2,
    mmlu_subset,
    sample,
)

DATA_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data"

pytestmark = pytest.mark.skipif(not DATA_DIR.is_dir(), reason=f"{DATA_DIR} not present")


@pytest.fixture(scope="module")
def mmlu_test() -> list[MMLUQuestion]:
    return load_mmlu("test", DATA_DIR)


@pytest.fixture(scope="module")
def wikitext() -> str:
    return load_wikitext2("test", DATA_DIR)


# ---------------------------------------------------------------- MMLU


def test_mmlu_test_counts(mmlu_test):
    assert len(mmlu_test) == 14_042
    assert len({q.subject for q in mmlu_test}) == 57
    assert all(q.answer in range(4) and len(q.choices) == 4 for q in mmlu_test)
    assert len({q.id for q in mmlu_test}) == len(mmlu_test)


def test_mmlu_dev_has_five_per_subject():
    dev = load_mmlu("dev", DATA_DIR)
    assert len(dev) == 285
    assert set(Counter(q.subject for q in dev).values()) == {5}


def test_mmlu_first_question(mmlu_test):
    q = mmlu_test[0]
    assert q.id == "abstract_algebra/0"
    assert q.subject == "abstract_algebra"
    assert q.question == (
        "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q."
    )
    assert q.choices == ("0", "4", "2", "6")
    assert q.answer == 1  # B


def test_mmlu_sorted_by_subject_then_row(mmlu_test):
    keys = [(q.subject, int(q.id.split("/")[1])) for q in mmlu_test]
    assert keys == sorted(keys)


def test_mmlu_embedded_newline_matches_pandas(mmlu_test):
    q = next(q for q in mmlu_test if "\n" in q.question)
    subject, row = q.id.split("/")
    path = DATA_DIR / "mmlu" / "data" / "test" / f"{subject}_test.csv"
    df = pd.read_csv(path, header=None, dtype=str, keep_default_na=False)
    assert len(df) == sum(1 for x in mmlu_test if x.subject == subject)
    expected = df.iloc[int(row)].tolist()
    assert [q.question, *q.choices] == expected[:5]
    assert "ABCD"[q.answer] == expected[5]


def test_mmlu_subjects_filter_and_dir_leniency():
    subset = load_mmlu("dev", DATA_DIR, subjects=["virology", "anatomy"])
    assert [q.subject for q in subset] == ["anatomy"] * 5 + ["virology"] * 5
    for root in (DATA_DIR / "mmlu", DATA_DIR / "mmlu" / "data"):
        assert load_mmlu("dev", root, subjects=["anatomy"]) == subset[:5]


def test_mmlu_unknown_subject_suggests():
    with pytest.raises(ValueError, match="abstract_algebra"):
        load_mmlu("dev", DATA_DIR, subjects=["abstract_algbra"])


def test_mmlu_bad_split():
    with pytest.raises(ValueError, match="split"):
        load_mmlu("training", DATA_DIR)


# ---------------------------------------------------------------- GSM8K


def test_gsm8k_counts_and_targets():
    test = load_gsm8k("test", DATA_DIR)
    assert len(test) == 1_319
    assert len(load_gsm8k("train", DATA_DIR)) == 7_473
    assert isinstance(test[0], GSM8KProblem) and test[0].id == "0"
    assert test[0].solution.rstrip().endswith(f"#### {test[0].target:g}")
    raw = [json.loads(line) for line in (DATA_DIR / "gsm8k" / "test.jsonl").open()]
    assert [p.solution for p in test] == [r["answer"] for r in raw]
    assert all(isinstance(p.target, float) for p in test)


@pytest.mark.parametrize(
    "text, value",
    [("so 1,000\n#### 1,000", 1000.0), ("#### -3", -3.0), ("#### 0.5", 0.5), ("#### 7 ", 7.0)],
)
def test_gsm8k_target(text, value):
    assert gsm8k_target(text) == value


def test_gsm8k_target_missing():
    with pytest.raises(ValueError, match="####"):
        gsm8k_target("The answer is 42.")


# ---------------------------------------------------------------- WikiText-2


def test_wikitext_text(wikitext):
    assert wikitext.startswith(" = Robert Boulter = \n\n Robert Boulter is")
    with (DATA_DIR / "wikitext2" / "wiki.test.raw").open(newline="", encoding="utf-8") as f:
        raw_lines = [line.rstrip("\r\n") for line in f]
    non_empty = [line for line in raw_lines if line]
    assert len(non_empty) == 2_891
    assert wikitext.split("\n\n") == non_empty
    assert len(wikitext.split()) == 241_211  # README: "2,891 non-empty lines, 241,211 words"
    assert "\r" not in wikitext


def test_wikitext_missing_split():
    with pytest.raises(DataNotFoundError, match="wiki.valid.raw"):
        load_wikitext2("validation", DATA_DIR)


# ---------------------------------------------------------------- subsets


def test_mmlu_subset_size_coverage_and_determinism(mmlu_test):
    sub = mmlu_subset(mmlu_test, n=451, seed=0)
    assert len(sub) == 451
    assert len({q.subject for q in sub}) == 57
    assert sub == mmlu_subset(mmlu_test, n=451, seed=0)
    assert sub != mmlu_subset(mmlu_test, n=451, seed=1)
    assert sub == mmlu_subset(list(reversed(mmlu_test)), n=451, seed=0)
    keys = [(q.subject, int(q.id.split("/")[1])) for q in sub]
    assert keys == sorted(keys) and len(set(keys)) == 451


def test_mmlu_subset_is_proportional(mmlu_test):
    sizes = Counter(q.subject for q in mmlu_test)
    got = Counter(q.subject for q in mmlu_subset(mmlu_test, n=451))
    for subject, size in sizes.items():
        assert abs(got[subject] - 451 * size / len(mmlu_test)) < 1


def test_mmlu_subset_small_n_covers_every_subject(mmlu_test):
    sub = mmlu_subset(mmlu_test, n=60)
    assert len(sub) == 60 and len({q.subject for q in sub}) == 57
    assert len(mmlu_subset(mmlu_test, n=10)) == 10


def test_mmlu_subset_all_and_invalid(mmlu_test):
    assert mmlu_subset(mmlu_test, n=None) == mmlu_test
    assert mmlu_subset(mmlu_test, n=10**6) == mmlu_test
    with pytest.raises(ValueError):
        mmlu_subset(mmlu_test, n=0)


def test_sample_deterministic_and_order_preserving():
    items = list(range(100))
    a = sample(items, 10, seed=3)
    assert a == sample(items, 10, seed=3) and a == sorted(a) and len(set(a)) == 10
    assert a != sample(items, 10, seed=4)
    assert sample(items, None) == items and sample(items, 500) == items


# ---------------------------------------------------------------- errors


def test_missing_data_dir_names_expected_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataNotFoundError) as err:
        load_mmlu("test", missing)
    assert str(missing / "mmlu" / "data" / "test") in str(err.value)
    assert "data_dir" in str(err.value)
    with pytest.raises(DataNotFoundError, match="test.jsonl"):
        load_gsm8k("test", missing)
    with pytest.raises(DataNotFoundError, match="wiki.test.raw"):
        load_wikitext2("test", missing)


def test_hub_unreachable_raises_data_not_found(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    for load in (load_mmlu, load_gsm8k, load_wikitext2):
        with pytest.raises(DataNotFoundError, match="data_dir"):
            load("test")
