"""Evaluation of any causal LM + tokenizer: MMLU, GSM8K and perplexity."""

from .gsm8k import extract_answer, gsm8k_accuracy, gsm8k_prompt
from .lm import forward_logits, greedy_generate
from .mmlu import letter_token_ids, mmlu_accuracy, mmlu_prompt
from .perplexity import default_window, perplexity
from .result import EvalResult

__all__ = [
    "EvalResult", "default_window", "extract_answer", "forward_logits", "greedy_generate",
    "gsm8k_accuracy", "gsm8k_prompt", "letter_token_ids", "mmlu_accuracy", "mmlu_prompt",
    "perplexity",
]
