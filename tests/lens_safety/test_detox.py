"""The detoxification study end to end on a tiny model with the real RTP data."""

import json

import numpy as np
import pytest

from lens_safety.data.rtp import load_rtp, split_rtp
from lens_safety.detox import DetoxSettings, layer_sets, run_detox_study, source_data
from lens_safety.edits.edit import Edit
from lens_safety.evaluation.selection import within_budget
from pruning_bridge.bridge import HookBridge
from pruning_bridge.common import UsageError

TINY = DetoxSettings(k=2, n_train=40, n_validation=6, n_test_toxic=4, n_test_nontoxic=3,
                     wheres=("middle",), sweep_k=2,
                     hows=(("subtract", (1.0,)), ("clamp", (0.0,)), ("leace", (None,))),
                     sweep_window=32, sweep_windows=1, test_window=32, test_windows=1,
                     test_mmlu=4, max_new_tokens=5, max_perplexity_ratio=10.0,
                     max_fluency_ratio=10.0, batch_size=8)


def test_layer_sets_and_sources(data_dir):
    assert layer_sets(30, ["middle", "late", "window", "late_window", "all"]) == {
        "middle": [15], "late": [22], "window": list(range(10, 21)),
        "late_window": list(range(20, 30)), "all": list(range(30))}
    assert layer_sets(30, ["last_fifth"]) == {"last_fifth": list(range(24, 30))}
    assert layer_sets(30, ["L3", "L20-24"]) == {"L3": [3], "L20-24": [20, 21, 22, 23, 24]}
    for bad in ("everywhere", "L30", "L5-2"):
        with pytest.raises(UsageError):
            layer_sets(30, [bad])
    split = split_rtp(load_rtp(data_dir), seed=0)
    texts, labels, pool = source_data(split, "rtp_continuations")
    raw = {p.text + p.continuation: p.continuation_toxicity for p in split.train}
    assert pool == "mean_after_first" and len(texts) == len(labels) > 500
    assert all((raw[t] >= 0.5) == (y == "toxic") for t, y in zip(texts, labels))
    texts, labels, pool = source_data(split, "rtp_prompts")
    assert pool == "last" and sorted(set(labels)) == ["nontoxic", "toxic"]


def test_detox_study_selects_within_budget_tests_and_resumes(tiny, data_dir, tmp_path):
    model, tok = tiny("tiny-llama")
    bridge = HookBridge(model, tok)
    result = run_detox_study(bridge, tok, TINY, data_dir=data_dir, folder=tmp_path,
                             model_name="tiny-llama", progress=False)
    assert [r["method"] for r in result.rows] == ["none"] + ["edit"] * 6  # 2 sources x 3
    assert 0.5 < result.agreement["auroc"] <= 1 and result.agreement["n"] > 2000
    assert result.selected is not None
    assert within_budget(result.selected, result.rows[0], 10.0, 10.0)
    assert result.selected["value"] == min(r["value"] for r in result.rows[1:]
                                           if within_budget(r, result.rows[0], 10.0, 10.0))
    edit = Edit.load(tmp_path / "selected_edit")
    assert str(edit) == result.selected_edit
    toxic = result.report["toxic"]
    assert set(toxic) >= {"expected_max_toxicity", "toxicity_probability", "greedy_toxicity",
                          "fluency_ppl", "distinct_1"}
    assert toxic["greedy_toxicity"]["before"]["n"] == 4
    assert result.test["perplexity"]["ratio"] > 0 and "mmlu_accuracy" in result.test
    assert len(result.examples) == 4
    # the fluency budget reads the same edit's fluency on the non-toxic validation prompts
    nontoxic = {json.dumps(r["config"], sort_keys=True): r for r in map(
        json.loads, (tmp_path / "edit_sweep_nontoxic.jsonl").read_text().splitlines())}
    for row in result.rows:
        other = nontoxic[json.dumps(row["config"], sort_keys=True)]
        assert row["fluency_ppl"] == other["fluency_ppl"] != row["toxic_fluency_ppl"]
        assert other["settings"]["n_prompts"] == 6 and other["value"] != row["value"]
    saved = json.loads((tmp_path / "detox_study.json").read_text())
    assert saved["selected"]["config"] == result.selected["config"]
    again = run_detox_study(bridge, tok, TINY, data_dir=data_dir, folder=tmp_path,
                            model_name="tiny-llama", progress=False)
    assert again.report == result.report
    assert np.isfinite(toxic["greedy_toxicity"]["difference"]["estimate"])


def test_budget_fluency_must_be_named():
    with pytest.raises(UsageError, match="budget_fluency='neutral'"):
        DetoxSettings(budget_fluency="neutral")


def test_nothing_within_budget_tests_nothing(tiny, data_dir):
    model, tok = tiny("tiny-llama")
    strict = DetoxSettings(**{**TINY.__dict__, "max_perplexity_ratio": 0.5,
                              "sources": ("rtp_prompts",)})
    result = run_detox_study(HookBridge(model, tok), tok, strict, data_dir=data_dir,
                             progress=False)
    assert result.selected is None and result.report is None and result.test == {}
