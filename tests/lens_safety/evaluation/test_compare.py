"""compare_edits end to end on a tiny Llama with the real RTP data: one table row per method, each
pick the least toxic validation point within the budget (perplexity and non-toxic fluency,
checked here by hand from the sweep rows), our pick combined with each peer's pick in a second
round, the overall selection, neutral openings in the test, a rerun that recomputes nothing,
and the selection rules on hand-made rows."""

import copy
import json

import pytest
import torch

from lens_safety.data.rtp import load_rtp, split_rtp
from lens_safety.detox import DetoxSettings, run_detox_study
from lens_safety.edits.edit import Edit
from lens_safety.edits.peers import KINDS, PeerError
from lens_safety.evaluation import compare as compare_module
from lens_safety.evaluation import selection
from lens_safety.evaluation.compare import (
    OURS,
    CompareError,
    CompareSettings,
    compare_edits,
    comparison_figure,
    format_table,
    picks,
    table_rows,
    with_nontoxic_fluency,
)
from pruning_bridge.bridge import HookBridge

TINY = CompareSettings(strengths=(("caa", (0.05,)),), top_heads=3, n_train=6, n_validation=2,
                       sweep_k=2, sweep_window=16, sweep_windows=1, k=2, n_test_toxic=2,
                       n_test_nontoxic=2, n_neutral=2, test_window=16, test_windows=1,
                       test_mmlu=2, max_new_tokens=3, batch_size=8,
                       search_hows=(("clamp", (0.0,)),), search_wheres=("L1",))


def tiny_setup(tiny, data_dir, seed: int):
    """A tiny Llama, its bridge, the RTP split and our edit: a subtract along a random
    direction (``seed``) at layer 2."""
    model, tokenizer = tiny("tiny-llama")
    split = split_rtp(load_rtp(data_dir), seed=0)
    direction = torch.nn.functional.normalize(
        torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(seed)), dim=0)
    ours = Edit.from_direction(direction, "subtract", layers=[2], alpha=0.5)
    return model, tokenizer, HookBridge(model, tokenizer), split, ours


def key(config):
    return json.dumps(config, sort_keys=True)


def test_compare_edits_one_row_per_method_within_budget_and_resumes(tiny, data_dir, tmp_path,
                                                                    monkeypatch):
    model, tokenizer, bridge, split, ours = tiny_setup(tiny, data_dir, seed=0)
    calls = {"n": 0}
    for module in (selection, compare_module):
        original = module.run_protocol

        def counted(*args, original=original, **kwargs):
            calls["n"] += 1
            return original(*args, **kwargs)
        monkeypatch.setattr(module, "run_protocol", counted)

    result = compare_edits(bridge, tokenizer, split, TINY, ours=ours, data_dir=data_dir,
                           folder=tmp_path, progress=False)
    first_calls = calls["n"]
    # the sweep: the unedited row, each kind at its default (CAA also at 0.05), ours, then
    # ours with each combined peer's pick (when ours and that peer have one within the budget)
    nontoxic = {key(r["config"]): r for r in result.nontoxic_rows}
    base = next(r for r in result.rows if r["method"] == "none")
    base_fluency = nontoxic[key(base["config"])]["fluency_ppl"]

    def fits(row):
        return (row["perplexity"] <= 1.05 * base["perplexity"]
                and nontoxic[key(row["config"])]["fluency_ppl"] <= 1.10 * base_fluency)

    ours_config = json.loads(json.dumps(ours.config, default=str))
    combos = [r for r in result.rows if r["config"].get("how") == "combined"]
    singles = [r for r in result.rows if r["config"] in result.ours and r not in combos]
    # ours as given, then the searched grid: one clamp at layer 1 fitted on RTP's train split
    assert [r["config"]["how"] for r in singles] == ["subtract", "clamp"]
    assert singles[0]["config"] == ours_config and singles[1]["config"]["layers"] == [1]
    first = min((r for r in singles if fits(r)), key=lambda r: r["value"], default=None)
    peers_picked = [k for k in TINY.combine if result.picks[k] is not None]
    assert [c["config"]["parts"] for c in combos] == (
        [] if first is None else [[first["config"], result.picks[k]["config"]]
                                  for k in peers_picked])
    assert len(result.rows) == len(result.nontoxic_rows) == 1 + len(KINDS) + 1 + 2 + len(combos)
    assert result.ours == [r["config"] for r in singles + combos]
    methods = [row["method"] for row in table_rows(result)]
    tested = [m for m, row in result.picks.items() if row is not None]
    assert methods == ["unedited"] + tested and "caa" in tested
    assert set(result.picks) == set(KINDS) | {OURS}
    table = format_table(result)
    assert len([line for line in table.splitlines() if line.startswith("| ")]) == \
        1 + len(methods)

    # each pick by hand: within 1.05x perplexity and 1.10x non-toxic fluency, least toxic
    for method, pick in result.picks.items():
        own = [r for r in result.rows if r["method"] == "edit" and (
            r["config"] in result.ours if method == OURS else r["config"]["how"] == method)]
        assert len(own) == {OURS: 2 + len(combos), "caa": 2}.get(method, 1), method
        ok = [r for r in own if fits(r)]
        if pick is None:
            assert not ok, method
        else:
            assert fits(pick) and pick["value"] == min(r["value"] for r in ok), method
    # the selection: the least toxic pick of every method (a tie goes to ours)
    fitting = {m: p for m, p in result.picks.items() if p is not None}
    best = min(p["value"] for p in fitting.values())
    assert result.selected["validation_toxicity"] == best
    assert fitting[result.selected["method"]]["value"] == best
    assert result.selected["peer_wins"] == (result.selected["method"] != OURS)
    assert f"**{result.selected['method']}**" in format_table(result)
    summary = result.test["caa"]["summary"]
    assert summary["neutral"]["fluency_ppl"]["after"]["n"] == 2
    assert summary["toxic"]["greedy_toxicity"]["after"]["n"] == 2
    assert summary["perplexity"]["ratio"] > 0 and "mmlu_accuracy" in summary
    assert set(result.test["unedited"]["summary"]) == set(summary)
    assert len(comparison_figure(result).data) >= 2 * len(tested)

    again = compare_edits(bridge, tokenizer, split, TINY, ours=ours, data_dir=data_dir,
                          folder=tmp_path, progress=False)
    assert calls["n"] == first_calls  # nothing generated again
    assert again.settings["test_evaluations"] == 0
    assert again.rows == result.rows and json.dumps(again.test, sort_keys=True) == json.dumps(
        result.test, sort_keys=True)
    assert (tmp_path / "comparison.md").read_text().startswith("| method |")


def row(how, strength, value, perplexity, fluency, method="edit"):
    return {"method": method, "config": {"how": how, "strength": strength}, "value": value,
            "perplexity": perplexity, "fluency_ppl": fluency}


def test_budget_reads_non_toxic_fluency():
    base = row(None, None, 0.5, 10.0, 20.0, method="none")
    base["config"] = {}
    toxic_rows = [base, row("aura", 1.0, 0.1, 10.2, 20.0), row("aura", 0.5, 0.3, 10.1, 20.0),
                  row("caa", 4.0, 0.05, 12.0, 20.0), row("caa", 1.0, 0.2, 10.0, 40.0)]
    # on non-toxic prompts aura 1.0 is too disfluent; caa 1.0 is fine
    nontoxic_rows = [dict(r, fluency_ppl=f) for r, f in zip(
        toxic_rows, (30.0, 40.0, 31.0, 30.0, 32.0))]
    merged = with_nontoxic_fluency(toxic_rows, nontoxic_rows)
    assert [r["fluency_ppl"] for r in merged] == [30.0, 40.0, 31.0, 30.0, 32.0]
    assert merged[4]["toxic_fluency_ppl"] == 40.0
    chosen = picks(merged, CompareSettings(kinds=("aura", "caa")))
    assert chosen["aura"]["config"]["strength"] == 0.5   # 1.0 breaks non-toxic fluency
    assert chosen["caa"]["config"]["strength"] == 1.0    # 4.0 breaks perplexity
    strict = picks(merged, CompareSettings(kinds=("aura", "caa"), max_perplexity_ratio=1.0))
    assert strict["aura"] is None and strict["caa"]["config"]["strength"] == 1.0


def test_bad_settings():
    with pytest.raises(PeerError, match="Unknown detox edit"):
        CompareSettings(kinds=("rome",))
    with pytest.raises(CompareError, match="at least one"):
        CompareSettings(kinds=())
    with pytest.raises(CompareError, match=">= 0"):
        CompareSettings(strengths=(("aura", (-1.0,)),))
    assert CompareSettings().grid("iti_c") == [2.0, 4.0, 8.0]
    assert CompareSettings(strengths=()).grid("aura") == [1.0]


def test_text_prefix_keeps_the_perplexity_windows(tiny, data_dir):
    from lens_safety.evaluation.held_out import text_prefix
    from pruning_bridge.evals import perplexity
    from pruning_bridge.evals.data import load_wikitext2

    model, tokenizer = tiny("tiny-llama")
    text = load_wikitext2("test", data_dir)
    prefix = text_prefix(tokenizer, text, 16, 3)
    assert text.startswith(prefix) and len(prefix) < len(text) // 100
    full = perplexity(model, tokenizer, text, window=16, max_windows=3, progress=False)
    short = perplexity(model, tokenizer, prefix, window=16, max_windows=3, progress=False)
    assert short.value == full.value and short.records == full.records
    assert text_prefix(tokenizer, text, 16, None) == text


def test_cli_compare_says_what_is_wrong_in_one_line(tmp_path, capsys):
    from lens_safety.cli import main

    base = ["compare", "--model", "tiny-llama", "--out", str(tmp_path / "out")]
    for extra, message in ((["--peers", "aura,rome"], "unknown peers 'rome'"),
                           (["--strengths", "aura=-1"], "aura strengths >= 0"),
                           (["--strengths", "rome=1"], "unknown peer 'rome'"),
                           (["--combine", "aura,rome"], "unknown peers 'rome'"),
                           (["--n-neutral", "-1"], "--n-neutral"),
                           (["--measured", str(tmp_path / "nowhere")], "is not a folder"),
                           (["--k", "-1"], "--k")):
        with pytest.raises(SystemExit) as stop:
            main(base + extra)
        err = capsys.readouterr().err.strip()
        assert stop.value.code == 2 and message in err and len(err.splitlines()) == 1, err
    assert main(base + ["--ours", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --ours {tmp_path}: No saved edit") and "\n" not in err
    assert main(base + ["--peers", "aura", "--combine", "aura,linear_act"]) == 2
    assert "names ['linear_act'], which are not compared" in capsys.readouterr().err
    assert main(base + ["--n-neutral", "31"]) == 2
    assert "There are 30 neutral openings" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["detox", "--model", "tiny-llama", "--out", str(tmp_path), "--hows", "aura=1"])
    assert "lens-safety compare --peers aura" in capsys.readouterr().err


def test_measured_protocol_stands_in_for_generating_again(tiny, data_dir, tmp_path, monkeypatch):
    """The detox study's test of our edit (same prompts, same protocol settings) replaces
    generating the unedited and our continuations again; the numbers are the same."""
    from lens_safety.evaluation.protocol import ProtocolSettings, rtp_protocol

    model, tokenizer, bridge, split, ours = tiny_setup(tiny, data_dir, seed=1)
    small = CompareSettings(kinds=("caa",), strengths=(), combine=(), n_train=4, n_validation=2,
                            sweep_k=0, sweep_window=16, sweep_windows=1, k=2, n_test_toxic=2,
                            n_test_nontoxic=2, n_neutral=2, test_window=16, test_windows=1,
                            test_mmlu=0, max_new_tokens=3, batch_size=8,
                            max_perplexity_ratio=100.0, max_fluency_ratio=100.0)
    prompts = {kind: split.texts("test", kind, 2) for kind in ("toxic", "nontoxic")}
    protocol = ProtocolSettings(k=2, max_new_tokens=3, batch_size=8)
    report = rtp_protocol(bridge, tokenizer, prompts, protocol, edit=ours, progress=False)
    report.to_json(tmp_path / "protocol.json")

    plain = compare_edits(bridge, tokenizer, split, small, ours=ours, data_dir=data_dir,
                          folder=tmp_path / "plain", progress=False)
    calls = []
    original = compare_module.run_protocol
    monkeypatch.setattr(compare_module, "run_protocol",
                        lambda *a, **k: calls.append((a[2], a[5])) or original(*a, **k))
    reused = compare_edits(bridge, tokenizer, split, small, ours=ours, data_dir=data_dir,
                           folder=tmp_path / "reused", measured=tmp_path / "protocol.json",
                           progress=False)
    assert json.dumps(reused.test, sort_keys=True) == json.dumps(plain.test, sort_keys=True)
    # generated again: the neutral openings (unedited, ours) and every prompt set of the peer
    generated = [(texts, None if edit is None else str(edit)) for texts, edit in calls]
    assert (prompts["toxic"], None) not in generated
    assert (prompts["toxic"], str(ours)) not in generated
    assert len(generated) == 2 + 3 * ("caa" in reused.test)
    # another protocol (k = 1) is not reused
    other = rtp_protocol(bridge, tokenizer, prompts, ProtocolSettings(k=1, max_new_tokens=3,
                                                                     batch_size=8),
                         edit=ours, progress=False)
    assert not compare_module.reusable(other, protocol, "profanity", bridge)
    assert compare_module.reusable(report, protocol, "profanity", bridge)
    # nor another model's runs (other weights)
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.lm_head.weight[0, 0] += 1e-3
    assert not compare_module.reusable(report, protocol, "profanity",
                                       HookBridge(changed, tokenizer))


def test_detox_folder_stands_in_for_the_test_and_its_perplexity_and_mmlu(
        tiny, data_dir, tmp_path, monkeypatch):
    """compare_edits(measured=<detox study folder>): the study's test runs, perplexity and
    MMLU values of the unedited model and its selected edit are reused, not computed again;
    the comparison is the same as computing everything."""
    model, tokenizer, bridge, split, _ = tiny_setup(tiny, data_dir, seed=2)
    common = dict(k=2, n_test_toxic=2, n_test_nontoxic=2, test_window=16, test_windows=1,
                  test_mmlu=3, max_new_tokens=3, batch_size=8, sweep_k=0, sweep_window=16,
                  sweep_windows=1, n_validation=2, max_perplexity_ratio=100.0,
                  max_fluency_ratio=100.0)
    detox = DetoxSettings(sources=("rtp_prompts",), wheres=("L1",), hows=(("clamp", (0.0,)),),
                          n_train=20, **common)
    run_detox_study(bridge, tokenizer, detox, data_dir=data_dir, folder=tmp_path / "detox",
                    progress=False)
    saved = json.loads((tmp_path / "detox" / "test_extras.json").read_text())
    assert len(saved["after"]["mmlu_correct"]) == 3 and saved["after"]["perplexity"] > 0
    small = CompareSettings(kinds=("caa",), strengths=(), combine=(), n_train=4, n_neutral=0,
                            **common)
    ours = tmp_path / "detox" / "selected_edit"
    plain = compare_edits(bridge, tokenizer, split, small, ours=ours, data_dir=data_dir,
                          folder=tmp_path / "plain", progress=False)
    measured = []
    original = compare_module.held_out_values
    monkeypatch.setattr(compare_module, "held_out_values",
                        lambda *a, **k: measured.append(a[2]) or original(*a, **k))
    reused = compare_edits(bridge, tokenizer, split, small, ours=ours, data_dir=data_dir,
                           folder=tmp_path / "reused", measured=tmp_path / "detox",
                           progress=False)
    assert json.dumps(reused.test, sort_keys=True) == json.dumps(plain.test, sort_keys=True)
    assert set(reused.test) >= {"unedited", "ours"}
    assert [str(edit) for edit in measured] == [reused.test[m]["edit"] for m in reused.test
                                                if m not in ("unedited", "ours")]
    with pytest.raises(CompareError, match="no test_protocol.json"):
        compare_edits(bridge, tokenizer, split, small, ours=ours, data_dir=data_dir,
                      measured=tmp_path / "plain", progress=False)
