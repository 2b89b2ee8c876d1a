"""pruning_bridge: TransformerLens hook names on Hugging Face models, and model compression."""

from .adapters import UnsupportedArchitectureError
from .bridge import ActivationCache, HookBridge, UnknownHookError
from .data import (DataNotFoundError, GSM8KProblem, MMLUQuestion, load_gsm8k, load_mmlu,
                   load_wikitext2, mmlu_subset)
from .evals import EvalResult, gsm8k_accuracy, mmlu_accuracy, perplexity
from .layer_sweep import layer_sweep
from .layers import block_influence, drop_layers, skip_layers
from .models import ModelLoadError, load_model
from .results import ResultsLog
from .weight_sweep import weight_sweep
from .weights import (SparsityReport, input_norms, magnitude_prune, nm_prune, prune_permanently,
                      sparsity_report, wanda_prune)

__all__ = [
    "ActivationCache", "DataNotFoundError", "EvalResult", "GSM8KProblem", "HookBridge",
    "MMLUQuestion", "ModelLoadError", "UnknownHookError", "UnsupportedArchitectureError",
    "gsm8k_accuracy", "load_gsm8k", "load_mmlu", "load_model", "load_wikitext2",
    "mmlu_accuracy", "mmlu_subset", "perplexity", "layer_sweep", "block_influence",
    "drop_layers", "skip_layers", "ResultsLog", "weight_sweep", "SparsityReport", "input_norms",
    "magnitude_prune", "nm_prune", "prune_permanently", "sparsity_report", "wanda_prune",
]
