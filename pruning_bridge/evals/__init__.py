"""Evaluation of any causal LM + tokenizer: data, MMLU, GSM8K, perplexity, and tasks by name."""

from .data import (DataNotFoundError, GSM8KProblem, MMLUQuestion, load_gsm8k, load_mmlu,
                   load_wikitext2, mmlu_subset)
from .gsm8k import extract_answer, gsm8k_accuracy, gsm8k_prompt
from .lm import forward_logits, greedy_generate
from .mmlu import letter_token_ids, mmlu_accuracy, mmlu_prompt
from .perplexity import default_window, perplexity
from .result import EvalResult
from .tasks import METRICS, TASKS, EvalSettings, TaskEvaluator, evaluate, parse_tasks

__all__ = [
    "DataNotFoundError", "EvalResult", "EvalSettings", "GSM8KProblem", "METRICS",
    "MMLUQuestion", "TASKS", "TaskEvaluator", "default_window", "evaluate", "extract_answer",
    "forward_logits", "greedy_generate", "gsm8k_accuracy", "gsm8k_prompt", "letter_token_ids",
    "load_gsm8k", "load_mmlu", "load_wikitext2", "mmlu_accuracy", "mmlu_prompt", "mmlu_subset",
    "parse_tasks", "perplexity",
]

# lm-evaluation-harness is an optional extra: its adapter is imported only when asked for.
LM_EVAL_NAMES = ("PruningBridgeLM", "evaluate_with_lm_eval")


def __getattr__(name: str):
    if name in LM_EVAL_NAMES:
        from . import lm_eval_adapter

        return getattr(lm_eval_adapter, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
