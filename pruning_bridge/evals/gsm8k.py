"""GSM8K accuracy: k-shot chain-of-thought prompts, greedy decoding, last number vs the gold one.

Exemplars are ``shots`` problems drawn from the train split with the seed, shown with their
original worked solutions (calculator annotations ``<<...>>`` removed, ``#### N`` kept). The
model continues "Question: ...\\nAnswer:" greedily until it starts the next "Question:"; the
prediction is the last number in its completion.
"""

from __future__ import annotations

import re
from typing import Sequence

from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from ..common.errors import UsageError
from .data import GSM8KProblem, load_gsm8k, sample
from .lm import batches_by_length, greedy_generate
from .result import EvalResult

STOP = ("Question:",)
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\$?\.\d+")
_CALCULATOR = re.compile(r"<<[^>]*>>")


def extract_answer(text: str) -> float | None:
    """The last number in ``text`` (commas, a leading ``$`` and a trailing period allowed)."""
    matches = _NUMBER.findall(text)
    if not matches:
        return None
    number = matches[-1].replace(",", "").replace("$", "")
    try:
        return float(number)
    except ValueError:
        return None


def format_exemplar(problem: GSM8KProblem) -> str:
    """A solved exemplar: question, worked solution (calculator annotations stripped)."""
    solution = _CALCULATOR.sub("", problem.solution)
    return f"Question: {problem.question}\nAnswer: {solution}\n\n"


def gsm8k_prompt(problem: GSM8KProblem, exemplars: Sequence[GSM8KProblem] = ()) -> str:
    """The few-shot prompt: the exemplars, then the question and "Answer:"."""
    return "".join(map(format_exemplar, exemplars)) + f"Question: {problem.question}\nAnswer:"


def is_correct(prediction: float | None, target: float) -> bool:
    """Whether the extracted number equals the target (relative tolerance 1e-6)."""
    return prediction is not None and abs(prediction - target) < 1e-6 * max(1.0, abs(target))


def gsm8k_accuracy(model, tokenizer: PreTrainedTokenizerBase,
                   problems: Sequence[GSM8KProblem] | None = None, *, shots: int = 8,
                   limit: int | None = 131, seed: int = 0, data_dir=None,
                   max_new_tokens: int = 256, batch_size: int = 8,
                   progress: bool = True) -> EvalResult:
    """Accuracy of ``model`` on GSM8K test problems with greedy chain-of-thought decoding.

    ``problems`` default to ``limit`` test problems drawn with ``seed`` (131 as in the report).
    """
    if problems is None:
        problems = sample(load_gsm8k("test", data_dir), limit, seed)
    elif limit is not None:
        problems = list(problems)[:limit]
    if not problems:
        raise UsageError("No GSM8K problems to evaluate.")
    exemplars = sample(load_gsm8k("train", data_dir), shots, seed) if shots else []
    prompts = [gsm8k_prompt(p, exemplars) for p in problems]
    completions: list[str] = [""] * len(prompts)
    groups = batches_by_length([len(p) for p in prompts], batch_size)
    bar = tqdm(total=len(prompts), desc=f"GSM8K {shots}-shot", disable=not progress)
    for group in groups:
        outs = greedy_generate(model, tokenizer, [prompts[i] for i in group], max_new_tokens, STOP)
        for i, text in zip(group, outs):
            completions[i] = text
        bar.update(len(group))
    bar.close()
    records = []
    for problem, completion in zip(problems, completions):
        prediction = extract_answer(completion)
        records.append({"id": problem.id, "prediction": prediction, "gold": problem.target,
                        "correct": is_correct(prediction, problem.target),
                        "completion": completion})
    accuracy = sum(r["correct"] for r in records) / len(records)
    return EvalResult(
        task="gsm8k", metric="accuracy", value=accuracy,
        settings={"shots": shots, "limit": limit, "seed": seed, "n": len(records),
                  "max_new_tokens": max_new_tokens},
        records=records,
    )
