"""MMLU accuracy: one forward per question, argmax over the four answer-letter logits.

Prompt (Hendrycks et al.; as in the report and lm-evaluation-harness)::

    The following are multiple choice questions (with answers) about {subject}.

    [k solved dev questions, each "{question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer: X\\n\\n"]
    {question}
    A. ..
    B. ..
    C. ..
    D. ..
    Answer:

The prediction is the argmax of the logits, at the last position, of the last token of " A",
" B", " C", " D" (with the leading space).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from ..common.errors import UsageError
from ..common.tokens import encode_batch
from .data import MMLUQuestion, load_mmlu, mmlu_subset
from .lm import batches_by_length, context_length, forward_logits
from .result import EvalResult

LETTERS = "ABCD"


def format_subject(subject: str) -> str:
    """``high_school_physics`` -> ``high school physics`` (as in the MMLU prompt)."""
    return subject.replace("_", " ")


def format_question(q: MMLUQuestion, with_answer: bool) -> str:
    """The question, its lettered choices and "Answer:" (with the letter for exemplars)."""
    lines = [q.question, *(f"{letter}. {choice}" for letter, choice in zip(LETTERS, q.choices))]
    answer = f"Answer: {LETTERS[q.answer]}\n\n" if with_answer else "Answer:"
    return "\n".join(lines) + "\n" + answer


def mmlu_prompt(q: MMLUQuestion, shots: Sequence[MMLUQuestion] = ()) -> str:
    """The full prompt for ``q`` with the solved examples ``shots`` in front."""
    header = ("The following are multiple choice questions (with answers) about "
              f"{format_subject(q.subject)}.\n\n")
    return header + "".join(format_question(s, True) for s in shots) + format_question(q, False)


def letter_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The last token of " A", " B", " C", " D"."""
    return [tokenizer.encode(f" {letter}", add_special_tokens=False)[-1] for letter in LETTERS]


def _fit_prompt(q, shots, tokenizer, max_length: int | None) -> str:
    """The prompt with as many shots as fit in ``max_length`` tokens (dropping from the end)."""
    shots = list(shots)
    while True:
        prompt = mmlu_prompt(q, shots)
        if max_length is None or not shots or len(tokenizer.encode(prompt)) <= max_length:
            return prompt
        shots.pop()


def mmlu_prompts(tokenizer: PreTrainedTokenizerBase,
                 questions: Sequence[MMLUQuestion] | None = None, *, shots: int = 0,
                 limit: int | None = 451, seed: int = 0, data_dir=None,
                 max_length: int | None = None) -> tuple[list[MMLUQuestion], list[str]]:
    """The questions to ask and their full prompts (see ``mmlu_accuracy``)."""
    if questions is None:
        questions = mmlu_subset(load_mmlu("test", data_dir), limit, seed)
    elif limit is not None:
        questions = list(questions)[:limit]
    if not questions:
        raise UsageError("No MMLU questions to evaluate.")
    dev = defaultdict(list)
    if shots:
        for d in load_mmlu("dev", data_dir, subjects=sorted({q.subject for q in questions})):
            dev[d.subject].append(d)
    prompts = [_fit_prompt(q, dev[q.subject][:shots], tokenizer, max_length) for q in questions]
    return list(questions), prompts


def mmlu_result(questions: Sequence[MMLUQuestion], scores: torch.Tensor,
                settings: dict) -> EvalResult:
    """Accuracy overall and per subject from the ``[n, 4]`` answer-letter logits."""
    predictions = scores.argmax(-1).tolist()
    records, by_subject = [], defaultdict(list)
    for q, pred, row in zip(questions, predictions, scores.tolist()):
        correct = pred == q.answer
        by_subject[q.subject].append(correct)
        records.append({"id": q.id, "subject": q.subject, "prediction": LETTERS[pred],
                        "gold": LETTERS[q.answer], "correct": correct, "letter_logits": row})
    accuracy = sum(r["correct"] for r in records) / len(records)
    return EvalResult(
        task="mmlu", metric="accuracy", value=accuracy, settings=dict(settings, n=len(records)),
        per_subject={s: sum(c) / len(c) for s, c in sorted(by_subject.items())},
        records=records,
    )


def mmlu_accuracy(model, tokenizer: PreTrainedTokenizerBase,
                  questions: Sequence[MMLUQuestion] | None = None, *, shots: int = 0,
                  limit: int | None = 451, seed: int = 0, data_dir=None, batch_size: int = 8,
                  max_length: int | None = None, progress: bool = True) -> EvalResult:
    """Accuracy of ``model`` on MMLU, overall and per subject.

    ``questions`` default to a deterministic subset of the test split stratified over the 57
    subjects (``limit`` questions, 451 as in the report; ``None`` for all 14,042). ``shots``
    solved examples come from the dev split of the same subject; shots that would make the
    prompt longer than ``max_length`` tokens (default: the model's context) are dropped.
    """
    questions, prompts = mmlu_prompts(tokenizer, questions, shots=shots, limit=limit, seed=seed,
                                      data_dir=data_dir,
                                      max_length=max_length or context_length(model))
    letters = letter_token_ids(tokenizer)
    scores = torch.empty(len(questions), 4)
    groups = batches_by_length([len(p) for p in prompts], batch_size)
    for group in tqdm(groups, desc=f"MMLU {shots}-shot", disable=not progress):
        enc = encode_batch(tokenizer, [prompts[i] for i in group])
        logits = forward_logits(model, enc["input_ids"], enc["attention_mask"], last_only=True)
        scores[group] = logits[:, -1, letters].float().cpu()
    return mmlu_result(questions, scores, {"shots": shots, "limit": limit, "seed": seed})
