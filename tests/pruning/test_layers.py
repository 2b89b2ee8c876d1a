"""Layer removal: skip, drop, block influence and the resumable prefix-reusing sweep."""

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from pruning_bridge.bridge import HookBridge
from pruning_bridge.cli import main
from pruning_bridge.common.results import ResultsFileWarning, ResultsLog
from pruning_bridge.evals import EvalSettings
from pruning_bridge.figures import layer_removal_figure, save_figure
from pruning_bridge.pruning.layer_sweep import layer_sweep, rank_correlation
from pruning_bridge.pruning.layers import block_influence, drop_layers, skip_layers

PROMPTS = ["The quick brown fox jumps over", "Hello"]


def without_layer(model, layer):
    """The hand-built reference: a copy of the model with that block deleted."""
    pruned = copy.deepcopy(model)
    blocks = pruned.transformer.h if pruned.config.model_type == "gpt2" else pruned.model.layers
    del blocks[layer]
    return pruned


def run(model, ids, mask, **kw):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask,
                     position_ids=(mask.cumsum(-1) - 1).clamp(min=0), **kw).logits


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-qwen3", "tiny-gpt2"])
def test_skip_equals_model_without_the_layer(tiny, arch):
    model, tok = tiny(arch)
    bridge = HookBridge(model, tok)
    ids, mask = bridge.tokenize(PROMPTS)
    for layer in (0, 2):
        with skip_layers(bridge, [layer]) as skipped:
            logits = skipped(ids, attention_mask=mask)
        torch.testing.assert_close(logits, run(without_layer(model, layer), ids, mask,
                                               use_cache=False))
    torch.testing.assert_close(bridge(ids, attention_mask=mask), run(model, ids, mask))


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-qwen3", "tiny-gpt2"])
def test_dropped_model_reloads_and_generates_like_skip(tiny, tmp_path, arch):
    model, tok = tiny(arch)
    bridge = HookBridge(model, tok)
    with skip_layers(bridge, [1, 2]):
        skipped = bridge.generate(PROMPTS, max_new_tokens=8, return_text=False)
    dropped = drop_layers(copy.deepcopy(model), [1, 2])
    assert dropped.config.num_hidden_layers == 2
    layer_idx = [m.layer_idx for m in dropped.modules() if hasattr(m, "layer_idx")]
    assert sorted(set(layer_idx)) == [0, 1]
    dropped.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.num_hidden_layers == 2
    ids, mask = bridge.tokenize(PROMPTS)
    with torch.no_grad():
        out = reloaded.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8,
                                do_sample=False, pad_token_id=tok.pad_token_id)
    assert torch.equal(out, skipped)
    n_params = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in reloaded.parameters()) < n_params


def test_layer_errors(tiny):
    model, tok = tiny("tiny-llama")
    with pytest.raises(IndexError, match="out of range.*4 layers"):
        drop_layers(copy.deepcopy(model), [4])
    with pytest.raises(ValueError, match="at least one"):
        drop_layers(copy.deepcopy(model), [0, 1, 2, 3])
    with pytest.raises(IndexError):
        with skip_layers(model, [7], tok):
            pass


def test_block_influence_equals_hidden_state_cosines(tiny):
    model, tok = tiny("tiny-qwen3")
    texts = ["One two three four five", "A short one", "Another sentence of text here"]
    bi = block_influence(model, tok, texts, batch_size=2, progress=False)
    sums, count = torch.zeros(4, dtype=torch.float64), 0
    for text in texts:  # unpadded, one at a time
        ids = tok(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            hs = model(ids, output_hidden_states=True).hidden_states
        outputs = list(hs[1:-1])
        with torch.no_grad():  # the last layer's output, before the final norm
            _, cache = HookBridge(model, tok).run_with_cache(ids, ["blocks.3.hook_resid_post"])
        outputs.append(cache["blocks.3.hook_resid_post"])
        for i in range(4):
            sums[i] += torch.nn.functional.cosine_similarity(hs[i].double(), outputs[i].double(),
                                                             dim=-1).sum()
        count += ids.shape[1]
    torch.testing.assert_close(torch.tensor(bi, dtype=torch.float64), 1 - sums / count)


def test_rank_correlation():
    rows = [{"task": "perplexity", "config": {"removed": [i]}, "value": v}
            for i, v in enumerate([50.0, 20.0, 30.0])]
    assert rank_correlation([0.9, 0.1, 0.5], rows, "perplexity") == pytest.approx(1.0)
    assert rank_correlation([0.1, 0.9, 0.5], rows, "perplexity") == pytest.approx(-1.0)


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gpt2"])
def test_prefix_reusing_sweep_equals_naive_loop(tiny, data_dir, arch):
    model, tok = tiny(arch)
    settings = EvalSettings(("mmlu", "perplexity"), data_dir=data_dir, limit=6, window=64,
                            progress=False)
    fast = layer_sweep(model, tok, settings, chunk=3)
    naive = layer_sweep(model, tok, settings, reuse_prefix=False)
    key = lambda r: (r["task"], tuple(r["config"]["removed"]))  # noqa: E731
    assert sorted(map(key, fast)) == sorted(map(key, naive))
    assert len(fast) == 2 * 5
    naive_by = {key(r): r["value"] for r in naive}
    for row in fast:
        assert row["value"] == pytest.approx(naive_by[key(row)], rel=1e-6), key(row)


def test_gsm8k_layer_sweep_uses_skip(tiny, data_dir):
    model, tok = tiny("tiny-llama")
    settings = EvalSettings(["gsm8k"], data_dir=data_dir, limit=2, shots=0, max_new_tokens=4,
                            progress=False)
    rows = layer_sweep(model, tok, settings, layers=[1])
    assert [r["config"]["removed"] for r in rows] == [[], [1]]
    assert all(0 <= r["value"] <= 1 for r in rows)


def test_killed_sweep_resumes_to_the_same_rows(tiny, data_dir, tmp_path, monkeypatch):
    model, tok = tiny("tiny-llama")
    settings = EvalSettings(("mmlu", "perplexity"), data_dir=data_dir, limit=4, window=64,
                            progress=False)
    full = layer_sweep(model, tok, settings, out=tmp_path / "full.jsonl", chunk=2)
    out = tmp_path / "resumed.jsonl"
    original = ResultsLog.append
    calls = {"n": 0}

    def dying_append(self, row):
        if calls["n"] == 4:
            raise KeyboardInterrupt  # killed after four finished rows
        calls["n"] += 1
        return original(self, row)

    monkeypatch.setattr(ResultsLog, "append", dying_append)
    with pytest.raises(KeyboardInterrupt):
        layer_sweep(model, tok, settings, out=out, chunk=2)
    monkeypatch.setattr(ResultsLog, "append", original)
    assert len(out.read_text().splitlines()) == 4
    with open(out, "a") as f:
        f.write('{"method": "layer_removal", "conf')  # a row cut short by the kill
    computed = []
    monkeypatch.setattr(ResultsLog, "append",
                        lambda self, row: computed.append(row) or original(self, row))
    with pytest.warns(ResultsFileWarning, match=r"resumed.jsonl, line 5: skipped"):
        resumed = layer_sweep(model, tok, settings, out=out, chunk=2)
    assert len(computed) == len(full) - 4  # finished rows were not recomputed
    strip = lambda rows: sorted((r["task"], r["config"]["removed"], r["value"]) for r in rows)  # noqa: E731
    assert strip(resumed) == strip(full)
    lines = out.read_text().splitlines()  # the torn line is kept, on a line of its own
    assert lines[4] == '{"method": "layer_removal", "conf'
    assert all(json.loads(line) for line in lines[:4] + lines[5:])


def test_layer_figure(tmp_path):
    rows = [{"method": "layer_removal", "task": t, "config": {"removed": r}, "value": v}
            for t in ("mmlu", "perplexity") for r, v in (([], 0.5), ([0], 0.3), ([1], 0.45))]
    fig = layer_removal_figure(rows)
    assert len(fig.data) == 2 and list(fig.data[0].x) == [0, 1]
    assert fig.layout.yaxis2.type == "log"
    written = save_figure(fig, tmp_path / "fig1", png=False)
    assert written[0].suffix == ".html" and "plotly" in written[0].read_text()[:5000].lower()


def test_cli_layers_and_weights(data_dir, tmp_path):
    out = tmp_path / "layers.jsonl"
    args = ["--model", "tiny-gpt2", "--tasks", "perplexity", "--limit", "2", "--window", "64",
            "--data-dir", str(data_dir)]
    assert main(["layers", *args, "--layers", "0,3", "--out", str(out),
                 "--figure", str(tmp_path / "f1")]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["config"]["removed"] for r in rows] == [[], [0], [3]]
    assert (tmp_path / "f1.html").exists()
    assert main(["layers", *args, "--layers", "9", "--out", str(out)]) == 2  # out of range
    out = tmp_path / "weights.jsonl"
    assert main(["weights", *args, "--sparsities", "0.25", "--method", "magnitude,wanda",
                 "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["method"], r["config"]["sparsity"]) for r in rows] == [
        ("dense", 0.0), ("magnitude", 0.25), ("wanda", 0.25)]
    with pytest.raises(SystemExit, match="2"):  # refused while parsing
        main(["weights", *args, "--sparsities", "1.5", "--out", str(out)])
