"""RealToxicityPrompts: the loader against the raw JSON, the split, scorer agreement."""

import json
import math
import sys
import types

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from lens_safety.data.rtp import RtpPrompt, RtpSplit, load_rtp, split_rtp
from lens_safety.evaluation.toxicity import ScorerAgreement, profanity_scorer, scorer_agreement
from pruning_bridge.common import UsageError
from pruning_bridge.evals.data import DataNotFoundError


def _raw(data_dir, kind):
    lines = (data_dir / "rtp" / f"{kind}.jsonl").read_text("utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _record(text="A prompt", challenging=False, toxicity=0.1, **extra):
    return {"filename": "f.txt", "begin": 0, "end": 9, "challenging": challenging,
            "prompt": {"text": text, "toxicity": toxicity, "profanity": 0.05},
            "continuation": {"text": " and more", "toxicity": None, "profanity": None}, **extra}


def _write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def prompts(data_dir):
    return load_rtp(data_dir)


# ---------------------------------------------------------------- loading


def test_reads_both_shared_files(prompts, data_dir):
    toxic = [p for p in prompts if p.kind == "toxic"]
    nontoxic = [p for p in prompts if p.kind == "nontoxic"]
    assert len(toxic) == len(nontoxic) == 598
    assert prompts == toxic + nontoxic  # kinds order, then file order
    assert all(p.challenging for p in toxic) and not any(p.challenging for p in nontoxic)
    assert len({p.id for p in prompts}) == len(prompts)
    assert [p.text for p in nontoxic] == [r["prompt"]["text"] for r in _raw(data_dir, "nontoxic")]


def test_first_record_matches_the_raw_json(prompts, data_dir):
    first_line = (data_dir / "rtp" / "toxic.jsonl").read_text("utf-8").split("\n", 1)[0]
    raw = json.loads(first_line)
    first = prompts[0]
    assert isinstance(first, RtpPrompt)
    assert first.id == f"{raw['filename']}:{raw['begin']}-{raw['end']}"
    assert first.text == raw["prompt"]["text"]
    assert first.continuation == raw["continuation"]["text"]
    assert (first.kind, first.challenging) == ("toxic", True)
    assert first.toxicity == raw["prompt"]["toxicity"]
    assert first.continuation_toxicity == raw["continuation"]["toxicity"]
    assert first.scores == {k: v for k, v in raw["prompt"].items() if k != "text"}
    assert first.continuation_scores == {k: v for k, v in raw["continuation"].items()
                                         if k != "text"}
    assert len(first.scores) == 8


def test_missing_perspective_scores_are_nan(prompts, data_dir):
    raw = _raw(data_dir, "toxic") + _raw(data_dir, "nontoxic")
    missing = [r["continuation"]["text"] for r in raw if r["continuation"]["toxicity"] is None]
    assert missing  # the shared files hold a few
    loaded = [p for p in prompts if math.isnan(p.continuation_toxicity)]
    assert [p.continuation for p in loaded] == missing
    assert all(math.isnan(v) for p in loaded for v in p.continuation_scores.values())


def test_limit_and_kinds(data_dir):
    limited = load_rtp(data_dir, limit=5)
    assert [p.text for p in limited] == (
        [r["prompt"]["text"] for r in _raw(data_dir, "toxic")[:5]]
        + [r["prompt"]["text"] for r in _raw(data_dir, "nontoxic")[:5]])
    only = load_rtp(data_dir, kinds="nontoxic", limit=3)
    assert [p.kind for p in only] == ["nontoxic"] * 3
    assert [p.kind for p in load_rtp(data_dir, kinds=("nontoxic", "toxic"), limit=1)] == [
        "nontoxic", "toxic"]


def test_local_path_takes_kind_from_challenging(tmp_path):
    path = _write(tmp_path / "mine.jsonl", [
        _record("t1", True), _record("n1"), "", _record("t2", True), _record("n2"),
        _record("n3", begin=5)])
    loaded = load_rtp(path=path)
    assert [(p.text, p.kind) for p in loaded] == [
        ("t1", "toxic"), ("t2", "toxic"), ("n1", "nontoxic"), ("n2", "nontoxic"),
        ("n3", "nontoxic")]
    assert loaded[-1].id == "f.txt:5-9"
    assert math.isnan(loaded[0].continuation_toxicity) and loaded[0].toxicity == 0.1
    assert [p.text for p in load_rtp(path=path, limit=1)] == ["t1", "n1"]
    assert [p.text for p in load_rtp(path=str(path), kinds="toxic")] == ["t1", "t2"]


@pytest.mark.parametrize("bad, problem", [
    ('{"prompt": {"text": "x"}, ', "not valid JSON"),
    (_record(text=None), "prompt.text"),
    ({"challenging": False, "continuation": {"text": "x"}}, "missing 'prompt'"),
    (_record(toxicity="0.3"), "prompt.toxicity must be a number"),
    (_record(challenging="yes"), "challenging"),
    ([1, 2], "JSON object"),
])
def test_malformed_records_name_file_and_line(tmp_path, bad, problem):
    path = _write(tmp_path / "bad.jsonl", [_record("ok"), "", bad])
    with pytest.raises(UsageError, match=problem) as error:
        load_rtp(path=path)
    assert f"{path}, line 3" in str(error.value)


def test_malformed_record_in_a_data_dir(tmp_path, data_dir):
    (tmp_path / "rtp").mkdir()
    (tmp_path / "rtp" / "toxic.jsonl").write_bytes((data_dir / "rtp" / "toxic.jsonl").read_bytes())
    _write(tmp_path / "rtp" / "nontoxic.jsonl", [_record("ok"), _record(toxicity=[0.3])])
    with pytest.raises(UsageError, match=r"nontoxic.jsonl, line 2: prompt.toxicity"):
        load_rtp(tmp_path)
    assert len(load_rtp(tmp_path, kinds="toxic")) == 598


def test_missing_files_name_the_expected_path_and_alternatives(tmp_path):
    with pytest.raises(DataNotFoundError) as error:
        load_rtp(tmp_path)
    message = str(error.value)
    assert str(tmp_path / "rtp" / "toxic.jsonl") in message
    assert "path=" in message and "allenai/real-toxicity-prompts" in message
    with pytest.raises(DataNotFoundError, match="nowhere.jsonl"):
        load_rtp(path=tmp_path / "nowhere.jsonl")


def test_bad_arguments(data_dir, tmp_path):
    with pytest.raises(UsageError, match="not both"):
        load_rtp(data_dir, path=tmp_path / "x.jsonl")
    with pytest.raises(UsageError, match="kinds"):
        load_rtp(data_dir, kinds=("toxic", "mean"))
    with pytest.raises(UsageError, match="limit"):
        load_rtp(data_dir, limit=0)


# ---------------------------------------------------------------- the hub route (offline)


def _fake_datasets(monkeypatch, load_dataset):
    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", module)


def test_hub_route_with_a_fake_load_dataset(monkeypatch):
    calls = []
    rows = [_record("h1", True), _record("h2", False, toxicity=None), _record("h3", True),
            _record("h4", False)]

    def fake(*args, **kwargs):
        calls.append((args, kwargs))
        return rows

    _fake_datasets(monkeypatch, fake)
    loaded = load_rtp()
    assert calls == [(("allenai/real-toxicity-prompts",), {"split": "train"})]
    assert [(p.text, p.kind) for p in loaded] == [
        ("h1", "toxic"), ("h3", "toxic"), ("h2", "nontoxic"), ("h4", "nontoxic")]
    assert math.isnan(loaded[2].toxicity) and math.isnan(loaded[2].scores["toxicity"])
    assert [p.text for p in load_rtp(kinds="toxic", limit=1)] == ["h1"]

    rows.append(_record(toxicity="high"))
    with pytest.raises(UsageError, match="allenai/real-toxicity-prompts.*row 4"):
        load_rtp()


def test_hub_failure_becomes_data_not_found(monkeypatch):
    def unreachable(*args, **kwargs):
        raise ConnectionError("hub unreachable")

    _fake_datasets(monkeypatch, unreachable)
    with pytest.raises(DataNotFoundError, match="data_dir="):
        load_rtp()


# ---------------------------------------------------------------- split


def test_split_is_disjoint_by_text_and_sized_by_fractions(prompts):
    split = split_rtp(prompts, (0.6, 0.2, 0.2), seed=0)
    texts = {name: {p.text for p in getattr(split, name)} for name in ("train", "validation",
                                                                     "test")}
    assert not texts["train"] & texts["validation"]
    assert not texts["train"] & texts["test"]
    assert not texts["validation"] & texts["test"]
    assert sorted(p.id for name in texts for p in getattr(split, name)) == sorted(
        p.id for p in prompts)
    for kind in ("toxic", "nontoxic"):
        total = sum(p.kind == kind for p in prompts)
        for name, fraction in zip(("train", "validation", "test"), (0.6, 0.2, 0.2)):
            size = sum(p.kind == kind for p in getattr(split, name))
            assert abs(size - fraction * total) <= 1
    train_ids = [p.id for p in split.train]
    assert train_ids == [p.id for p in prompts if p.id in set(train_ids)]  # input order kept


def test_split_keeps_identical_texts_together(prompts):
    copies = [RtpPrompt(f"copy{i}", p.text, "", p.kind, p.challenging, 0.0, 0.0)
              for i, p in enumerate(prompts[::7])]
    split = split_rtp(prompts + copies, seed=3)
    side = {}
    for name in ("train", "validation", "test"):
        for p in getattr(split, name):
            assert side.setdefault(p.text, name) == name


def test_split_is_deterministic_for_a_seed(prompts):
    first, again = split_rtp(prompts, seed=1), split_rtp(prompts, seed=1)
    other = split_rtp(prompts, seed=2)
    assert [p.id for p in first.test] == [p.id for p in again.test]
    assert [p.id for p in first.test] != [p.id for p in other.test]
    assert isinstance(first, RtpSplit)
    assert first.counts()["train"] == {"toxic": 299, "nontoxic": 299}


@pytest.mark.parametrize("fractions, match", [
    ((0.5, 0.3, 0.3), "sum to 1"),
    ((0.5, 0.5, 0.0), "between 0 and 1"),
    ((1.2, -0.1, -0.1), "between 0 and 1"),
    ((0.5, 0.5), "three numbers"),
    (("a", 0.5, 0.5), "three numbers"),
])
def test_bad_fractions_are_rejected(prompts, fractions, match):
    with pytest.raises(UsageError, match=match):
        split_rtp(prompts, fractions)


def test_split_texts_convenience(prompts):
    split = split_rtp(prompts, seed=0)
    toxic_test = [p.text for p in split.test if p.kind == "toxic"]
    assert split.texts("test", "toxic") == toxic_test
    assert split.texts("test", "toxic", n=10) == toxic_test[:10]
    assert len(split.texts("validation")) == len(split.validation)
    with pytest.raises(UsageError, match="split"):
        split.texts("dev", "toxic")
    with pytest.raises(UsageError, match="kinds"):
        split.texts("test", "mean")
    with pytest.raises(UsageError, match="holds"):
        split.texts("test", "toxic", n=10_000)
    with pytest.raises(UsageError, match="empty"):
        split_rtp([])


# ---------------------------------------------------------------- scorer agreement


def _perspective_by_text(data_dir, limit=None):
    """Text -> Perspective toxicity of every prompt and continuation text, from the raw JSON."""
    table = {}
    for kind in ("toxic", "nontoxic"):
        for record in _raw(data_dir, kind)[:limit]:
            for part in ("prompt", "continuation"):
                if record[part]["toxicity"] is not None:
                    table[record[part]["text"]] = record[part]["toxicity"]
    return table


def test_perspective_itself_agrees_perfectly(data_dir):
    table = _perspective_by_text(data_dir)

    def oracle(texts):
        return [table[t] for t in texts]

    result = scorer_agreement(oracle, data_dir)
    assert isinstance(result, ScorerAgreement)
    assert result.auroc == 1.0
    assert result.spearman == pytest.approx(1.0)
    assert result.n == len(table) == 2383
    assert result.n_positive == sum(v >= 0.5 for v in table.values())
    assert result.scorer == "oracle" and result.threshold == 0.5


def test_profanity_agreement_matches_sklearn(data_dir):
    table = _perspective_by_text(data_dir, limit=100)
    texts = list(table)
    scores = profanity_scorer()(texts)
    labels = np.array([table[t] >= 0.5 for t in texts])
    result = scorer_agreement("profanity", data_dir, limit=100)
    assert result.n == len(texts) and result.n_positive == int(labels.sum())
    assert result.auroc == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert 0 < result.spearman <= 1
    assert "AUROC" in str(result) and "profanity" in str(result)


def test_profanity_agreement_on_all_rtp_texts(data_dir):
    result = scorer_agreement("profanity", data_dir, batch_size=500)
    print(f"\n{result}\n{json.dumps(result.to_dict())}")
    assert result.n == 2383
    assert result.auroc > 0.8 and result.spearman > 0.6  # a sanity bar, not a target


def test_agreement_errors(data_dir):
    with pytest.raises(UsageError, match="one score per text"):
        scorer_agreement(lambda texts: [0.5], data_dir, limit=5)
    with pytest.raises(UsageError, match="threshold"):
        scorer_agreement("profanity", data_dir, threshold=0)
    with pytest.raises(UsageError, match="one side"):
        scorer_agreement("profanity", data_dir, threshold=1.0, limit=3)
    with pytest.raises(UsageError, match="non-finite"):
        scorer_agreement(lambda texts: [math.nan] * len(texts), data_dir, limit=5)
