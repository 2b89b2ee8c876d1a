"""Results that can be trusted: rows keyed by the model, bad lines kept, shared files safe,
routers retrained when what they were trained with changes (issue: results you can trust)."""

import copy
import json
import multiprocessing
import time
import warnings
from contextlib import nullcontext

import pytest
import torch

from pruning_bridge.cli import main as pb_main
from pruning_bridge.common.identity import model_identity, weights_fingerprint
from pruning_bridge.common.results import ResultsFileWarning, ResultsLog
from pruning_bridge.common.sweep import SweepRow, run_sweep
from pruning_bridge.evals.tasks import EvalSettings, evaluate
from pruning_bridge.heads.training import train_router
from pruning_bridge.pruning.weight_sweep import weight_sweep


def perturbed(model, seed=1):
    """A copy of ``model`` with the same name and shapes and other weights."""
    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return other


# ---------------------------------------------------------------- the model in the key


def test_model_identity_tells_weights_dtype_and_device_apart(tiny):
    model, _ = tiny("tiny-llama")
    same = model_identity(copy.deepcopy(model))
    assert same == model_identity(model)
    assert model_identity(perturbed(model))["weights"] != same["weights"]
    assert model_identity(perturbed(model))["name"] == same["name"]
    half = copy.deepcopy(model).to(torch.bfloat16)
    assert model_identity(half)["dtype"] == "bfloat16" != same["dtype"]
    assert same["device"] == "cpu"
    # one weight changed anywhere in a sampled tensor's values changes the fingerprint
    small = copy.deepcopy(model)
    with torch.no_grad():
        small.model.norm.weight[0] += 1.0
    assert weights_fingerprint(small) != weights_fingerprint(model)


def test_two_models_in_one_results_file_each_get_their_own_rows(tiny, data_dir, tmp_path):
    model, tok = tiny("tiny-llama")
    other = perturbed(model)
    settings = EvalSettings(["perplexity"], limit=1, window=32, data_dir=data_dir,
                            progress=False)
    shared = tmp_path / "shared.jsonl"
    first = weight_sweep(model, tok, settings, [0.5], out=shared)
    second = weight_sweep(other, tok, settings, [0.5], out=shared)
    assert len(ResultsLog(shared).rows) == 4  # not 2: the second model computed its own
    # each model's numbers are its own: the dense row equals a direct evaluation
    assert first[0]["value"] == pytest.approx(evaluate(model, tok, "perplexity", settings).value)
    assert second[0]["value"] == pytest.approx(evaluate(other, tok, "perplexity",
                                                        settings).value)
    assert first[0]["value"] != second[0]["value"]
    assert {r["settings"]["model"]["weights"] for r in first + second} == {
        model_identity(model)["weights"], model_identity(other)["weights"]}
    assert weight_sweep(model, tok, settings, [0.5], out=shared) == first  # reused, not mixed


def test_cli_second_model_on_the_same_out_prints_its_own_numbers(data_dir, tmp_path, capsys):
    out = tmp_path / "x.jsonl"

    def run(model, path):
        argv = ["weights", "--model", model, "--tasks", "perplexity", "--limit", "1",
                "--window", "32", "--sparsities", "0.5", "--data-dir", str(data_dir),
                "--out", str(path)]
        assert pb_main(argv) == 0
        return [line for line in capsys.readouterr().out.splitlines() if "perplexity=" in line]

    run("tiny-gpt2", out)
    shared = run("tiny-llama", out)
    alone = run("tiny-llama", tmp_path / "alone.jsonl")
    assert shared == alone and len(shared) == 2
    assert len(out.read_text().splitlines()) == 4


# ---------------------------------------------------------------- bad lines are kept


def _row(i):
    return {"method": "m", "config": {"i": i}, "task": "t", "settings": {}, "value": i}


def test_bad_lines_are_skipped_with_a_warning_and_kept(tmp_path):
    path = tmp_path / "r.jsonl"
    good = [json.dumps(_row(i)) for i in range(3)]
    text = "\n".join([good[0], "garbage", "null", "[1, 2]", '{"a": 1}', good[1], good[2],
                      '{"method": "m", "con']) + ""  # the last line torn by a crash
    path.write_text(text)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        log = ResultsLog(path)
    messages = [str(w.message) for w in caught if issubclass(w.category, ResultsFileWarning)]
    assert [m.split(", line")[0] for m in messages] == [str(path)] * 4
    assert [int(m.split("line ")[1].split(":")[0]) for m in messages] == [2, 3, 4, 5]
    assert "it is left in the file" in messages[0]
    assert [r["value"] for r in log.rows] == [0, 1, 2]  # rows after the bad lines survive
    assert path.read_text() == text  # reading changed nothing

    log.append(_row(3))
    assert path.read_text() == text + "\n" + json.dumps(_row(3)) + "\n"  # torn line closed
    with pytest.warns(ResultsFileWarning, match="line 8"):
        reread = ResultsLog(path)
    assert [r["value"] for r in reread.rows] == [0, 1, 2, 3]


def test_a_row_without_its_key_is_refused(tmp_path):
    with pytest.raises(ValueError, match="missing settings"):
        ResultsLog(tmp_path / "r.jsonl").append({"method": "m", "config": {}, "task": "t"})


# ---------------------------------------------------------------- two runs, one file


class SlowEvaluator:
    tasks = ("t",)
    model_identity = {"name": "slow", "weights": "w", "dtype": "float32", "device": "cpu"}

    def __init__(self, calls_path):
        self.calls_path = calls_path

    def identity(self, task):
        return {"v": 1}

    def __call__(self, subject, task):
        with open(self.calls_path, "a") as f:
            f.write(f"{subject}\n")
        time.sleep(0.15)
        return {"metric": "m", "value": subject * 2}


def _sweep_process(out, calls_path, result_path):
    rows = [SweepRow("m", {"x": x}, lambda x=x: nullcontext(x)) for x in range(8)]
    got = run_sweep(rows, SlowEvaluator(calls_path), out)
    result_path.write_text(json.dumps([r["value"] for r in got]))


def test_two_sweeps_at_once_compute_each_row_once(tmp_path):
    out = tmp_path / "r.jsonl"
    context = multiprocessing.get_context("fork")
    procs = [context.Process(target=_sweep_process,
                             args=(out, tmp_path / f"calls{i}", tmp_path / f"result{i}"))
             for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    calls = [line for i in range(2) if (tmp_path / f"calls{i}").exists()
             for line in (tmp_path / f"calls{i}").read_text().splitlines()]
    assert sorted(map(int, calls)) == list(range(8))  # every row computed exactly once
    assert len(out.read_text().splitlines()) == 8
    for i in range(2):
        assert json.loads((tmp_path / f"result{i}").read_text()) == [2 * x for x in range(8)]
    assert len(ResultsLog(out).to_pandas()) == 8


# ---------------------------------------------------------------- routers know what trained them


def test_router_folder_retrains_when_settings_or_model_change(tiny, tmp_path):
    model, tok = tiny("tiny-qwen3")
    windows = torch.randint(0, 100, (8, 16), generator=torch.Generator().manual_seed(0))
    out = tmp_path / "router"

    def train(m=model, **kw):
        args = dict(n_shared=1, top_k=1, steps=2, batch_size=2, seq_len=16, lr=1e-2,
                    progress=False, out=out)
        return train_router(m, tok, windows, **{**args, **kw})

    first, log = train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same settings: reloaded, no warning
        again, log_again = train()
    assert log_again.steps == log.steps
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(),
                                                 again.state_dict().values()))

    with pytest.warns(UserWarning, match=r"steps: 2 -> 3.*lr: 0.01 -> 0.1|lr: 0.01 -> 0.1.*steps"):
        changed, changed_log = train(steps=3, lr=0.1)
    fresh, fresh_log = train(steps=3, lr=0.1, out=tmp_path / "fresh")
    assert len(changed_log.steps) == 3
    assert [s["loss"] for s in changed_log.steps] == [s["loss"] for s in fresh_log.steps]
    assert all(torch.equal(a, b) for a, b in zip(changed.state_dict().values(),
                                                 fresh.state_dict().values()))

    with pytest.warns(UserWarning, match="model: "):
        train(m=perturbed(model), steps=3, lr=0.1)
    saved = json.loads((out / "training_log.json").read_text())["settings"]
    assert saved["model"]["weights"] == model_identity(perturbed(model))["weights"]


# ---------------------------------------------------------------- cached residuals know the model


def test_cached_residuals_of_a_pruned_copy_are_not_reused(tiny, tmp_path):
    from lens_safety.probing.caching import cache_residuals
    from pruning_bridge.bridge import HookBridge

    model, tok = tiny("tiny-llama")
    texts = ["the cat sat on the mat", "a second text, longer than the first one"]
    store = tmp_path / "acts.safetensors"
    first = cache_residuals(HookBridge(model, tok), tok, texts, store=store, progress=False)
    pruned = copy.deepcopy(model)  # same embedding, last layer changed
    with torch.no_grad():
        pruned.model.layers[-1].mlp.down_proj.weight.zero_()
    with pytest.warns(UserWarning, match="other settings \\(model differ"):
        got = cache_residuals(HookBridge(pruned, tok), tok, texts, store=store, progress=False)
    expected = cache_residuals(HookBridge(pruned, tok), tok, texts, progress=False)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.equal(got[-1], first[-1])


def test_a_damaged_protocol_report_is_one_usage_error(tmp_path):
    from lens_safety.evaluation.protocol import ProtocolReport
    from pruning_bridge.common.errors import UsageError

    path = tmp_path / "protocol.json"
    path.write_text('{"before": {"toxic": ')
    with pytest.raises(UsageError, match="protocol.json is not valid JSON"):
        ProtocolReport.from_json(path)
    path.write_text('{"summary": {}}')
    with pytest.raises(UsageError, match="not a saved protocol report"):
        ProtocolReport.from_json(path)
