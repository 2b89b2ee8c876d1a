"""Evaluation harness against independent plain-transformers computations."""

import importlib
import json
import math
import random
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from pruning_bridge.cli import main as cli_main
from pruning_bridge.evals import extract_answer, gsm8k_accuracy, mmlu_accuracy, perplexity
from pruning_bridge.evals.data import load_gsm8k, load_mmlu, load_wikitext2, mmlu_subset

ARCHS = ["tiny-gpt2", "tiny-qwen3", "tiny-llama"]
gsm8k = importlib.import_module("pruning_bridge.evals.gsm8k")  # the module, not the function


def reference_mmlu_prompt(q, shots):
    """The prompt of DESIGN.md, written out independently of the package."""
    def block(x, answer):
        return (f"{x.question}\nA. {x.choices[0]}\nB. {x.choices[1]}\nC. {x.choices[2]}\n"
                f"D. {x.choices[3]}\nAnswer:" + (f" {'ABCD'[x.answer]}\n\n" if answer else ""))
    subject = q.subject.replace("_", " ")
    return (f"The following are multiple choice questions (with answers) about {subject}.\n\n"
            + "".join(block(s, True) for s in shots) + block(q, False))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("shots", [0, 2])
def test_mmlu_matches_unbatched_reference(tiny, data_dir, arch, shots):
    check_mmlu(*tiny(arch), data_dir, shots, n=10)


def test_smollm2_mmlu_matches_unbatched_reference(smollm2, data_dir):
    check_mmlu(*smollm2, data_dir, shots=1, n=8)


def check_mmlu(model, tok, data_dir, shots, n):
    questions = mmlu_subset(load_mmlu("test", data_dir), 60, seed=1)[:n]
    dev = {q.subject: [] for q in questions}
    for d in load_mmlu("dev", data_dir, subjects=sorted(dev)):
        dev[d.subject].append(d)
    result = mmlu_accuracy(model, tok, questions, shots=shots, data_dir=data_dir, batch_size=4,
                           progress=False)
    letters = [tok(f" {c}", add_special_tokens=False)["input_ids"][-1] for c in "ABCD"]
    correct = 0
    for q, record in zip(questions, result.records):
        prompt = reference_mmlu_prompt(q, dev[q.subject][:shots])
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = model(ids).logits[0, -1, letters]
        assert record["id"] == q.id
        torch.testing.assert_close(torch.tensor(record["letter_logits"]), logits,
                                   rtol=1e-4, atol=1e-4)
        assert record["prediction"] == "ABCD"[int(logits.argmax())]
        correct += int(logits.argmax()) == q.answer
    assert result.value == pytest.approx(correct / len(questions))
    assert len(result.records) == n and result.per_subject


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("batch_size", [1, 3])
def test_perplexity_matches_hf_loss(tiny, data_dir, arch, batch_size):
    model, tok = tiny(arch)
    text = load_wikitext2("test", data_dir)[:20000]
    window = 64
    ids = tok(text, return_tensors="pt")["input_ids"][0]
    losses = []
    with torch.no_grad():
        for i in range(5):
            w = ids[i * window:(i + 1) * window][None]
            losses.append(model(input_ids=w, labels=w).loss.item())
    expected = math.exp(sum(losses) / len(losses))
    got = perplexity(model, tok, text, window=window, max_windows=5, batch_size=batch_size,
                     progress=False)
    assert got.value == pytest.approx(expected, rel=1e-5)
    assert (got.task, got.metric, got.settings["window"], got.settings["limit"]) == (
        "perplexity", "perplexity", window, 5)
    assert len(got.records) == 5 and all(r["tokens"] == window - 1 for r in got.records)
    per_window = [math.exp(r["nll"] / r["tokens"]) for r in got.records]  # each window's own
    assert per_window == pytest.approx([math.exp(loss) for loss in losses], rel=1e-5)


def test_perplexity_errors(tiny):
    model, tok = tiny("tiny-llama")
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(model, tok, "too short", window=64, progress=False)
    with pytest.raises(ValueError, match="at least 2"):
        perplexity(model, tok, "too short", window=1, progress=False)


@pytest.mark.parametrize("text, expected", [
    ("so 3 + 4 = 7. The answer is 1,000.", 1000.0),
    ("#### -3", -3.0),
    ("It costs $5.50 in total", 5.5),
    ("She has 12 apples and gives 3.", 3.0),
    ("no digits here", None),
    ("", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def reference_greedy(model, ids, steps):
    """Greedy decoding without a KV cache: one full forward per new token."""
    for _ in range(steps):
        with torch.no_grad():
            nxt = model(ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


@pytest.mark.parametrize("arch", ARCHS)
def test_gsm8k_generation_matches_stepwise_greedy(tiny, data_dir, arch):
    model, tok = tiny(arch)
    problems = load_gsm8k("test", data_dir)[:3]
    result = gsm8k_accuracy(model, tok, problems, shots=1, data_dir=data_dir, max_new_tokens=6,
                            batch_size=3, progress=False)
    exemplar = result.settings
    assert exemplar["shots"] == 1 and len(result.records) == 3
    train = load_gsm8k("train", data_dir)
    shot = train[sorted(random.Random(0).sample(range(len(train)), 1))[0]]
    shot_text = f"Question: {shot.question}\nAnswer: {re.sub(r'<<[^>]*>>', '', shot.solution)}\n\n"
    for p, record in zip(problems, result.records):
        prompt = shot_text + f"Question: {p.question}\nAnswer:"
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        out = reference_greedy(model, ids, 6)
        completion = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        completion = completion.split("Question:")[0]
        assert record["completion"] == completion
        assert record["gold"] == p.target and record["id"] == p.id


def test_gsm8k_scores_a_model_that_copies_the_gold_answer(tiny, data_dir, monkeypatch):
    """The scoring pipeline: completions holding the gold number count as correct."""
    problems = load_gsm8k("test", data_dir)[:4]
    answers = iter([f" so the answer is {problems[0].target:,.0f}.", " 2 and 3", "", " 7"])
    monkeypatch.setattr(gsm8k, "greedy_generate",
                        lambda m, t, prompts, n, stop: [next(answers) for _ in prompts])
    result = gsm8k.gsm8k_accuracy(None, None, problems, shots=0, batch_size=1, progress=False)
    by_id = {r["id"]: r for r in result.records}
    assert by_id[problems[0].id]["correct"]  # longest prompts go first; find ours by id
    assert result.value == pytest.approx(sum(r["correct"] for r in result.records) / 4)
    assert any(r["prediction"] is None for r in result.records)


def test_cli_eval_writes_json(data_dir, tmp_path, capsys):
    out = tmp_path / "r.json"
    code = cli_main(["eval", "--model", "tiny-gpt2", "--task", "mmlu", "--limit", "6",
                     "--data-dir", str(data_dir), "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["task"] == "mmlu" and result["metric"] == "accuracy"
    assert result["settings"]["model"] == "tiny-gpt2" and result["settings"]["shots"] == 0
    assert len(result["records"]) == 6
    subject, row = result["records"][0]["id"].split("/")
    assert row.isdigit() and {"prediction", "gold", "correct"} <= set(result["records"][0])
    code = cli_main(["eval", "--model", "tiny-gpt2", "--task", "perplexity", "--limit", "2",
                     "--window", "128", "--data-dir", str(data_dir), "--out", str(out)])
    assert code == 0 and json.loads(out.read_text())["settings"]["window"] == 128


def test_cli_reports_missing_data(tmp_path, capsys):
    code = cli_main(["eval", "--model", "tiny-gpt2", "--task", "gsm8k",
                     "--data-dir", str(tmp_path)])
    assert code == 2 and "data_dir" in capsys.readouterr().err


def test_smollm2_perplexity_is_far_below_a_random_model(smollm2, data_dir):
    model, tok = smollm2
    text = load_wikitext2("test", data_dir)[:30000]
    real = perplexity(model, tok, text, window=512, max_windows=2, progress=False).value
    torch.manual_seed(0)
    random_model = AutoModelForCausalLM.from_config(model.config).eval()
    rand = perplexity(random_model, tok, text, window=512, max_windows=2, progress=False).value
    assert math.isfinite(real) and real < 60
    assert rand > 20 * real
