"""The data of the ``pb_*`` lm-eval tasks, read with ``pruning_bridge.evals``' own loaders.

lm-eval calls these through ``custom_dataset: !function local_data.<name>`` with the task's
metadata as keyword arguments (the YAML's ``version``, the model arguments, and whatever
``TaskManager(metadata=...)`` / ``--metadata`` adds: ``data_dir``, ``seed``, ``mmlu_limit``,
``mmlu_shots``, ``gsm8k_limit``, ``gsm8k_shots``, ``wikitext_chars``); unknown keys are
ignored. Each returns a ``datasets.DatasetDict`` with a ``test`` split of plain rows.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from pruning_bridge.evals.data import load_gsm8k, load_mmlu, load_wikitext2, mmlu_subset, sample
from pruning_bridge.evals.gsm8k import extract_answer, format_exemplar, is_correct
from pruning_bridge.evals.mmlu import format_question, format_subject


def _count(value: Any) -> int | None:
    """A metadata count: an int, or "all" (or None) for every item."""
    if value is None or (isinstance(value, str) and value.lower() in ("all", "none")):
        return None
    return int(value)


def _number(value: float) -> str:
    """The gold number as text (``18.0`` -> ``"18"``)."""
    return str(int(value)) if value == int(value) else str(value)


def _dataset(rows: list[dict]):
    from datasets import Dataset, DatasetDict

    return DatasetDict({"test": Dataset.from_list(rows)})


def mmlu_rows(data_dir=None, mmlu_limit: Any = 451, mmlu_shots: Any = 0, seed: Any = 0,
              **_) -> list[dict]:
    """The MMLU questions ``mmlu_accuracy`` asks (same subset, same order), with their shots."""
    limit, shots, seed = _count(mmlu_limit), int(mmlu_shots or 0), int(seed or 0)
    questions = mmlu_subset(load_mmlu("test", data_dir), limit, seed)
    dev = defaultdict(list)
    if shots:
        for d in load_mmlu("dev", data_dir, subjects=sorted({q.subject for q in questions})):
            dev[d.subject].append(d)
    return [{"id": q.id, "subject": q.subject, "subject_text": format_subject(q.subject),
             "shots": "".join(format_question(s, True) for s in dev[q.subject][:shots]),
             "question": q.question, "choices": list(q.choices), "answer": q.answer}
            for q in questions]


def mmlu(**metadata):
    """``pb_mmlu``'s data set (see :func:`mmlu_rows`)."""
    return _dataset(mmlu_rows(**metadata))


def gsm8k_rows(data_dir=None, gsm8k_limit: Any = 131, gsm8k_shots: Any = 8, seed: Any = 0,
               **_) -> list[dict]:
    """The GSM8K problems ``gsm8k_accuracy`` solves (same subset and exemplars)."""
    limit, seed = _count(gsm8k_limit), int(seed or 0)
    shots = 8 if gsm8k_shots is None else int(gsm8k_shots)
    problems = sample(load_gsm8k("test", data_dir), limit, seed)
    exemplars = sample(load_gsm8k("train", data_dir), shots, seed) if shots else []
    text = "".join(map(format_exemplar, exemplars))
    return [{"id": p.id, "question": p.question, "target": _number(p.target),
             "gold": p.target, "shots": text} for p in problems]


def gsm8k(**metadata):
    """``pb_gsm8k``'s data set (see :func:`gsm8k_rows`)."""
    return _dataset(gsm8k_rows(**metadata))


def gsm8k_results(doc: dict, results: list[str]) -> dict:
    """Exact match as ``gsm8k_accuracy`` scores it: the last number of the completion."""
    return {"exact_match": int(is_correct(extract_answer(results[0]), doc["gold"]))}


def wikitext(data_dir=None, wikitext_chars: Any = None, **_):
    """``pb_wikitext``'s one document: WikiText-2 test as ``load_wikitext2`` returns it (its
    first ``wikitext_chars`` characters when given, for a quick run)."""
    text, chars = load_wikitext2("test", data_dir), _count(wikitext_chars)
    return _dataset([{"page": text[:chars] if chars else text}])
