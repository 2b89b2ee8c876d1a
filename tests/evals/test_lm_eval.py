"""lm-evaluation-harness adapter: every request type against plain Hugging Face computed by hand,
under hooks against the same model edited by hand, saved pruned models through the command line,
and the MMLU / GSM8K tasks against the toolkit's own harness, question by question."""

import copy
import importlib
import json
import sys

import pytest
import torch

from pruning_bridge.cli import main as bridge_main
from pruning_bridge.common.errors import UsageError
from pruning_bridge.evals import gsm8k_accuracy, mmlu_accuracy
from pruning_bridge.evals.mmlu import mmlu_prompts
from pruning_bridge.models import load_model
from pruning_bridge.pruning import drop_layers, magnitude_masks, prune_permanently

lm_eval = pytest.importorskip("lm_eval", reason="the lm-eval extra is not installed")

from lm_eval.api.instance import Instance  # noqa: E402

from pruning_bridge.evals.lm_eval_adapter import (PruningBridgeLM,  # noqa: E402
                                                  evaluate_with_lm_eval)

ADAPTER = "pruning_bridge.evals.lm_eval_adapter"
PAIRS = [("The capital of France is", " Paris"), ("The capital of France is", " Rome"),
         ("Question: what is two plus two?\nAnswer:", " four, of course"),
         ("A", " B C D E"), ("", "Hello world")]
TEXTS = ["Hello world, this is a short text.",
         "The quick brown fox jumps over the lazy dog. " * 5 + "It was the best of times."]


def requests(kind: str, args) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a if isinstance(a, tuple) else (a,),
                     idx=i) for i, a in enumerate(args)]


# ---------------------------------------------------------------- references, by hand


@torch.no_grad()
def logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(next token) at each position of one unpadded row, plain HF forward."""
    return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)


def reference_loglikelihood(model, tok, context: str, continuation: str):
    """Summed log-probs of the continuation's tokens (those that context + continuation adds
    to the context's encoding; an empty context is the end-of-text token)."""
    if context:
        ctx = tok.encode(context)
        cont = tok.encode(context + continuation)[len(ctx):]
    else:
        ctx, cont = [tok.eos_token_id], tok.encode(continuation)
    ids = ctx + cont
    lp = logprobs(model, ids)
    steps = range(len(ctx) - 1, len(ids) - 1)
    return (sum(lp[p, ids[p + 1]].item() for p in steps),
            all(lp[p].argmax().item() == ids[p + 1] for p in steps))


def reference_rolling(model, tok, text: str, window: int) -> float:
    """Total log-likelihood of every token of ``text``: chunks of ``window`` predicted tokens,
    each read with the ``window`` tokens before it (end-of-text first)."""
    seq = [tok.eos_token_id] + tok.encode(text)
    total = 0.0
    for a in range(0, len(seq) - 1, window):  # chunk predicts seq[a + 1 .. b]
        b = min(a + window, len(seq) - 1)
        start = max(0, b - window)
        lp = logprobs(model, seq[start:b])
        total += sum(lp[j - 1 - start, seq[j]].item() for j in range(a + 1, b + 1))
    return total


@torch.no_grad()
def reference_generate(model, tok, context: str, max_new: int, until: list[str]) -> str:
    ids = torch.tensor([tok.encode(context)])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                         do_sample=False, pad_token_id=tok.eos_token_id, temperature=None,
                         top_p=None, top_k=None)
    text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    for stop in until:
        text = text.split(stop)[0]
    return text


def close(got, want, atol=1e-4):
    assert len(got) == len(want)
    for (g, g_greedy), (w, w_greedy) in zip(got, want):
        assert g == pytest.approx(w, abs=atol) and g_greedy == w_greedy, (got, want)


# ---------------------------------------------------------------- plain models


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-gpt2"])
def test_loglikelihood_equals_hf_by_hand_at_any_batch_size(tiny, arch):
    model, tok = tiny(arch)
    want = [reference_loglikelihood(model, tok, c, x) for c, x in PAIRS]
    for batch_size in (1, 4):
        lm = PruningBridgeLM(model, tok, batch_size=batch_size)
        close(lm.loglikelihood(requests("loglikelihood", PAIRS), disable_tqdm=True), want)
    # greedy: a continuation that is the model's own argmax token is greedy
    ids = tok.encode("The capital of France is")
    top = tok.decode([logprobs(model, ids)[-1].argmax().item()])
    [(_, greedy)] = lm.loglikelihood(requests("loglikelihood", [("The capital of France is",
                                                                 top)]), disable_tqdm=True)
    assert greedy == reference_loglikelihood(model, tok, "The capital of France is", top)[1]


def test_rolling_loglikelihood_equals_hf_total_in_one_and_several_windows(tiny):
    model, tok = tiny("tiny-llama")
    assert len(tok.encode(TEXTS[1])) > 3 * 16
    for window in (1024, 16):  # one window each; then several, the last one short
        want = [reference_rolling(model, tok, text, window) for text in TEXTS]
        for batch_size in (1, 4):
            lm = PruningBridgeLM(model, tok, batch_size=batch_size, max_length=window)
            got = lm.loglikelihood_rolling(requests("loglikelihood_rolling", TEXTS),
                                           disable_tqdm=True)
            assert got == pytest.approx(want, abs=2e-4)
    # one window: the plain HF loss of end-of-text + text, summed
    ids = torch.tensor([[tok.eos_token_id] + tok.encode(TEXTS[0])])
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item() * (ids.shape[1] - 1)
    assert reference_rolling(model, tok, TEXTS[0], 1024) == pytest.approx(-loss, abs=2e-4)


def test_generate_until_equals_hf_greedy_cut_at_the_stop_string(tiny):
    model, tok = tiny("tiny-llama")
    contexts = ["Once upon a time", "The capital of France is Paris. The capital of Italy is",
                "1, 2, 3,"]
    full = reference_generate(model, tok, contexts[1], 12, [])
    stop = full[len(full) // 2:len(full) // 2 + 3]
    assert stop.strip()
    gen = {"until": [stop], "max_gen_toks": 12, "do_sample": False}
    want = [reference_generate(model, tok, c, 12, [stop]) for c in contexts]
    assert want[1] == full.split(stop)[0] and len(want[1]) < len(full)
    for batch_size in (1, 4):  # 4: one left-padded batch
        lm = PruningBridgeLM(model, tok, batch_size=batch_size)
        got = lm.generate_until(requests("generate_until", [(c, gen) for c in contexts]),
                                disable_tqdm=True)
        assert got == want


# ---------------------------------------------------------------- under hooks


def test_skipped_layer_equals_the_model_with_that_layer_deleted(tiny):
    model, tok = tiny("tiny-llama")
    dropped = drop_layers(copy.deepcopy(model), [1])
    lm = PruningBridgeLM(model, tok, skip_layers=[1], batch_size=4)
    close(lm.loglikelihood(requests("loglikelihood", PAIRS), disable_tqdm=True),
          [reference_loglikelihood(dropped, tok, c, x) for c, x in PAIRS])
    small = PruningBridgeLM(model, tok, skip_layers="1", batch_size=2, max_length=16)
    assert small.loglikelihood_rolling(requests("loglikelihood_rolling", TEXTS[1:]),
                                       disable_tqdm=True) == pytest.approx(
        [reference_rolling(dropped, tok, TEXTS[1], 16)], abs=2e-4)
    gen = {"until": ["\n\n"], "max_gen_toks": 8, "do_sample": False}
    assert lm.generate_until(requests("generate_until", [("Once upon a time", gen)]),
                             disable_tqdm=True) == [
        reference_generate(dropped, tok, "Once upon a time", 8, ["\n\n"])]
    # the model itself is untouched, and the model_args spelling gives the same numbers
    close(PruningBridgeLM(model, tok).loglikelihood(requests("loglikelihood", PAIRS[:1]),
                                                    disable_tqdm=True),
          [reference_loglikelihood(model, tok, *PAIRS[0])])
    from lm_eval.api.registry import get_model

    spec = get_model("pruning-bridge").create_from_arg_string(
        "pretrained=tiny-llama,skip_layers=1", {"batch_size": 4})
    close(spec.loglikelihood(requests("loglikelihood", PAIRS), disable_tqdm=True),
          [reference_loglikelihood(dropped, tok, c, x) for c, x in PAIRS])


def test_a_saved_edit_equals_the_bridges_logits_under_that_edit(tiny, tmp_path):
    from lens_safety.edits.edit import Edit

    from pruning_bridge.bridge import HookBridge

    model, tok = tiny("tiny-llama")
    direction = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    edit = Edit.from_direction(direction, "subtract", layers=[1, 2], alpha=4.0)
    folder = edit.save(tmp_path / "edit")
    bridge = HookBridge(model, tok)

    def under_edit(context, continuation):
        ctx = tok.encode(context)
        ids = tok.encode(context + continuation)
        with edit.apply(bridge), torch.no_grad():
            lp = torch.log_softmax(bridge(torch.tensor([ids]))[0].float(), -1)
        return sum(lp[p, ids[p + 1]].item() for p in range(len(ctx) - 1, len(ids) - 1))

    pairs = PAIRS[:4]
    want = [under_edit(c, x) for c, x in pairs]
    plain = [reference_loglikelihood(model, tok, c, x)[0] for c, x in pairs]
    assert max(abs(w - p) for w, p in zip(want, plain)) > 1e-2  # the edit does something
    for edit_arg in (str(folder), edit):
        lm = PruningBridgeLM(model, tok, edit=edit_arg, batch_size=4)
        got = [score for score, _ in lm.loglikelihood(requests("loglikelihood", pairs),
                                                      disable_tqdm=True)]
        assert got == pytest.approx(want, abs=1e-4)
    assert not bridge._hooks  # nothing left behind


# ---------------------------------------------------------------- saved models, the CLI


def _head_removed(model):
    from pruning_bridge.heads import remove_heads

    return remove_heads(model, {0: [1, 3], 2: [0, 2]})  # per-layer layout (head_layout)


def _layer_dropped(model):
    return drop_layers(model, [2])


def _magnitude_pruned(model):
    prune_permanently(model, magnitude_masks(model, 0.5))
    return model


@pytest.mark.parametrize("prune", [_head_removed, _layer_dropped, _magnitude_pruned])
def test_a_saved_pruned_model_evaluates_through_the_cli(prune, tmp_path, data_dir, capsys):
    model, tok = load_model("tiny-llama")
    prune(model)
    folder = tmp_path / "pruned"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    out = tmp_path / "results.json"
    assert bridge_main(["lm-eval", "--model", str(folder), "--tasks", "pb_mmlu", "--data-dir",
                        str(data_dir), "--metadata", '{"mmlu_limit": 4}', "--batch-size", "4",
                        "--log-samples", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "pb_mmlu" in printed and f"wrote {out}" in printed
    results = json.loads(out.read_text())
    assert results["config"]["model_num_parameters"] == sum(p.numel()
                                                            for p in model.parameters())
    want = mmlu_accuracy(load_model(str(folder))[0], tok, limit=4, data_dir=data_dir,
                         progress=False)
    assert predictions(results["samples"]["pb_mmlu"]) == {r["id"]: r["prediction"]
                                                          for r in want.records}
    assert results["results"]["pb_mmlu"]["acc,none"] == pytest.approx(want.value)


def test_a_saved_uniform_model_loads_in_plain_lm_eval_hf(tmp_path):
    from lm_eval.api.registry import get_model

    from pruning_bridge.heads import remove_heads

    model, tok = load_model("tiny-llama")
    remove_heads(model, {layer: [1, 3] for layer in range(4)})  # 2 query / 2 kv heads each
    assert getattr(model.config, "head_layout", None) is None
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    hf = get_model("hf").create_from_arg_string(
        f"pretrained={tmp_path},dtype=float32,device=cpu", {"batch_size": 2})
    ours = PruningBridgeLM(str(tmp_path), batch_size=2)
    pairs = PAIRS[:4]
    close(ours.loglikelihood(requests("loglikelihood", pairs), disable_tqdm=True),
          hf.loglikelihood(requests("loglikelihood", pairs), disable_tqdm=True))
    assert ours.loglikelihood_rolling(requests("loglikelihood_rolling", TEXTS[:1]),
                                      disable_tqdm=True) == pytest.approx(
        hf.loglikelihood_rolling(requests("loglikelihood_rolling", TEXTS[:1]),
                                 disable_tqdm=True), abs=2e-4)


# ---------------------------------------------------------------- the toolkit's own protocols


def predictions(samples) -> dict[str, str]:
    """Question id -> the letter lm-eval picked (highest log-likelihood, first on ties)."""
    picked = {}
    for sample in samples:
        lls = [float(resp[0]) for resp in sample["filtered_resps"]]
        picked[sample["doc"]["id"]] = "ABCD"[max(range(4), key=lls.__getitem__)]
    return picked


@pytest.mark.slow
def test_smollm2_mmlu_through_lm_eval_predicts_as_mmlu_accuracy(smollm2, data_dir):
    model, tok = smollm2
    results = evaluate_with_lm_eval(model, tok, "pb_mmlu", data_dir=data_dir, log_samples=True,
                                    metadata={"mmlu_limit": 10})
    want = mmlu_accuracy(model, tok, limit=10, data_dir=data_dir, progress=False)
    samples = results["samples"]["pb_mmlu"]
    _, prompts = mmlu_prompts(tok, limit=10, data_dir=data_dir)
    assert [s["arguments"][0][0] for s in samples] == prompts  # the same prompt, word for word
    assert [s["arguments"][i][1] for s in samples[:1] for i in range(4)] == [" A", " B", " C",
                                                                              " D"]
    assert predictions(samples) == {r["id"]: r["prediction"] for r in want.records}
    assert results["results"]["pb_mmlu"]["acc,none"] == pytest.approx(want.value)


def test_gsm8k_through_lm_eval_extracts_as_gsm8k_accuracy(tiny, data_dir):
    model, tok = tiny("tiny-llama")
    results = evaluate_with_lm_eval(model, tok, ["pb_gsm8k"], data_dir=data_dir,
                                    log_samples=True, batch_size=2,
                                    metadata={"gsm8k_limit": 2, "gsm8k_shots": 2})
    want = gsm8k_accuracy(model, tok, limit=2, shots=2, data_dir=data_dir, batch_size=2,
                          progress=False)
    samples = results["samples"]["pb_gsm8k"]
    assert [s["filtered_resps"][0] for s in samples] == [r["completion"] for r in want.records]
    assert results["results"]["pb_gsm8k"]["exact_match,none"] == pytest.approx(want.value)


# ---------------------------------------------------------------- errors


def test_lm_eval_missing_says_how_to_install(monkeypatch, capsys):
    import pruning_bridge.evals as evals

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    monkeypatch.delitem(sys.modules, ADAPTER)
    monkeypatch.delattr(evals, "lm_eval_adapter")
    with pytest.raises(UsageError, match=r"layers-to-latents\[lm-eval\]"):
        importlib.import_module(ADAPTER)
    with pytest.raises(UsageError, match="lm-evaluation-harness"):
        evals.PruningBridgeLM
    assert bridge_main(["lm-eval", "--model", "tiny-gpt2", "--tasks", "pb_mmlu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "pip install" in err


@pytest.mark.parametrize("batch_size", [0, -2, "auto", "eight"])
def test_bad_batch_size(tiny, batch_size):
    model, tok = tiny("tiny-gpt2")
    with pytest.raises(UsageError, match="batch_size"):
        PruningBridgeLM(model, tok, batch_size=batch_size)


def test_unknown_task_and_model_given_twice(tiny, capsys):
    model, tok = tiny("tiny-gpt2")
    with pytest.raises(UsageError, match="pb_mmlu"):
        evaluate_with_lm_eval(model, tok, "pb_mmlu_typo")
    with pytest.raises(UsageError, match="once"):
        PruningBridgeLM(model, tok, pretrained="tiny-gpt2")
    lm = PruningBridgeLM(model, tok)
    with pytest.raises(UsageError, match="PruningBridgeLM"):
        evaluate_with_lm_eval(lm, tasks="pb_mmlu", skip_layers=[1])
    with pytest.raises(UsageError, match="skip_layers"):
        PruningBridgeLM(model, tok, skip_layers="one")
    with pytest.raises(SystemExit, match="2"):  # refused while parsing, before any import
        bridge_main(["lm-eval", "--model", "tiny-gpt2", "--tasks", "pb_mmlu",
                     "--batch-size", "0"])
    assert "--batch-size: must be at least 1" in capsys.readouterr().err


def test_a_remote_bridge_evaluates_as_the_local_model(tiny):
    """lm-eval over a remote bridge (the server round trip simulated in this process)."""
    from pruning_bridge.bridge import HookBridge

    model, tok = tiny("tiny-llama")
    remote = HookBridge.remote(model, tokenizer=tok, simulate=True)
    local_lm = PruningBridgeLM(model, tok, batch_size=4, max_length=16)
    remote_lm = PruningBridgeLM(remote, tok, batch_size=4, max_length=16)
    for kind, items in (("loglikelihood", PAIRS), ("loglikelihood_rolling", TEXTS)):
        method = getattr(local_lm, kind)
        want = method(requests(kind, items), disable_tqdm=True)
        got = getattr(remote_lm, kind)(requests(kind, items), disable_tqdm=True)
        assert got == want
    gen = {"until": ["\n"], "max_gen_toks": 6, "do_sample": False}
    reqs = requests("generate_until", [("Once upon a time", gen), ("1, 2, 3,", gen)])
    assert remote_lm.generate_until(reqs, disable_tqdm=True) == local_lm.generate_until(
        reqs, disable_tqdm=True)
    assert remote.traffic.requests > 0
