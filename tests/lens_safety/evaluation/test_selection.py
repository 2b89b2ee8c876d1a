"""The edit selection: the budget, and the resumable sweep of candidate edits."""

import copy

import numpy as np
import pytest

from lens_safety.evaluation.protocol import (
    ProtocolSettings,
)
from lens_safety.evaluation.selection import edit_for, edit_grid, edit_sweep, select_edit
from lens_safety.probing.caching import cache_residuals
from pruning_bridge.bridge import HookBridge
from pruning_bridge.common import UsageError

PROMPTS = ["The cat sat on the", "I really hate it when", "Hello there, my good friend",
           "What"]
TEXTS = ["you are a lovely person", "what a wonderful day it is", "thanks for the help",
         "you stupid idiot", "shut up you moron", "go to hell you jerk", "nice weather today",
         "I hate you all, losers"]
KINDS = ["nontoxic"] * 3 + ["toxic"] * 3 + ["nontoxic", "toxic"]


@pytest.fixture
def bridge(tiny):
    model, tok = tiny("tiny-llama")
    return HookBridge(model, tok)


def clean_cache(bridge, names, texts=PROMPTS):
    _, cache = bridge.run_with_cache(texts, names)
    return cache



# ---------------------------------------------------------------- selection


def test_select_edit_never_picks_outside_its_budget():
    rng = np.random.default_rng(0)
    for trial in range(200):
        base = {"method": "none", "value": 0.5, "perplexity": 10.0, "greedy_fluency_ppl": 20.0,
                "mmlu_accuracy": 0.3}
        rows = [base] + [{"method": "edit", "config": {"i": i}, "value": rng.uniform(0, 1),
                          "perplexity": 10 * rng.uniform(0.95, 1.2),
                          "greedy_fluency_ppl": 20 * rng.uniform(0.9, 1.3),
                          "mmlu_accuracy": 0.3 + rng.uniform(-0.05, 0.01)}
                         for i in range(8)]
        chosen = select_edit(rows, 1.05, 1.10, max_mmlu_drop=0.02)
        ok = [r for r in rows[1:] if r["perplexity"] <= 10.5 and r["greedy_fluency_ppl"] <= 22
              and r["mmlu_accuracy"] >= 0.28]
        if not ok:
            assert chosen is None
        else:
            assert chosen is min(ok, key=lambda r: r["value"])
    with pytest.raises(UsageError, match="unedited"):
        select_edit(rows[1:])


def test_edit_sweep_measures_each_candidate_once_and_resumes(bridge, tmp_path):
    acts = cache_residuals(bridge, bridge.tokenizer, TEXTS, pool="last", progress=False)
    candidates = edit_grid(acts, KINDS, layer_sets={"L1": [1], "L0-2": range(3)},
                           hows={"subtract": [1.0], "clamp": [0.0]}, positive=("toxic",),
                           negative=("nontoxic",))
    assert len(candidates) == 4
    kwargs = dict(settings=ProtocolSettings(k=0, max_new_tokens=4), perplexity_text=" ".join(
        TEXTS * 20), window=32, max_windows=2, out=tmp_path / "sweep.jsonl")
    rows = edit_sweep(bridge, bridge.tokenizer, candidates, PROMPTS, **kwargs)
    assert [r["method"] for r in rows] == ["none"] + ["edit"] * 4
    assert all(len(r["greedy_toxicity_per_prompt"]) == len(PROMPTS) for r in rows)
    with edit_for(rows[2], candidates).apply(bridge):
        assert bridge(PROMPTS).shape[0] == len(PROMPTS)
    again = edit_sweep(bridge, bridge.tokenizer, candidates, PROMPTS, **kwargs)
    assert again == rows
    assert len((tmp_path / "sweep.jsonl").read_text().splitlines()) == 5
    unchanged = copy.deepcopy(rows[0])
    assert select_edit(rows, None, None) in rows[1:] and unchanged == rows[0]
