"""pruning_bridge: TransformerLens hook names on Hugging Face models, and model compression.

Subpackages: ``bridge`` (HookBridge and the architecture table), ``evals`` (data, MMLU, GSM8K,
perplexity), ``pruning`` (layers and weights), ``heads`` (routing, importance, removal) and
``common`` (results log, figures, report). Everything public is re-exported here.
"""

# The deprecated modules named like the sweep functions load first, so that the functions below
# keep these attribute names (importing a submodule later would rebind them to the module).
from . import head_sweep, layer_sweep, weight_sweep  # noqa: F401  isort: skip
from .bridge import (ARCHITECTURES, ActivationCache, HookBridge, UnknownHookError,
                     UnsupportedArchitectureError, architecture_of, model_dims)
from .common import ResultsLog, UsageError, save_figure
from .evals import (DataNotFoundError, EvalResult, EvalSettings, GSM8KProblem, MMLUQuestion,
                    evaluate, gsm8k_accuracy, load_gsm8k, load_mmlu, load_wikitext2,
                    mmlu_accuracy, mmlu_subset, perplexity)
from .heads import (HeadRouter, HeadStudy, RoutedHeads, RouterTrainingError, RouterTrainingLog,
                    gradient_head_importance, head_counts, head_sweep, heads_to_remove,
                    load_balancing_loss, load_head_pruned, mean_gate_importance, remove_heads,
                    run_head_study, train_router)
from .models import ModelLoadError, load_model
from .pruning import (SparsityReport, block_influence, drop_layers, input_norms, layer_sweep,
                      magnitude_prune, nm_prune, prune_permanently, skip_layers, sparsity_report,
                      wanda_prune, weight_sweep)

__all__ = [
    "ARCHITECTURES", "ActivationCache", "DataNotFoundError", "EvalResult", "EvalSettings",
    "GSM8KProblem", "HeadRouter", "HeadStudy", "HookBridge", "MMLUQuestion", "ModelLoadError",
    "ResultsLog", "RoutedHeads", "RouterTrainingError", "RouterTrainingLog", "SparsityReport",
    "UnknownHookError", "UnsupportedArchitectureError", "UsageError", "architecture_of",
    "block_influence", "drop_layers", "evaluate", "gradient_head_importance", "gsm8k_accuracy",
    "head_counts", "head_sweep", "heads_to_remove", "input_norms", "layer_sweep",
    "load_balancing_loss", "load_gsm8k", "load_head_pruned", "load_mmlu", "load_model",
    "load_wikitext2", "magnitude_prune", "mean_gate_importance", "mmlu_accuracy", "mmlu_subset",
    "model_dims", "nm_prune", "perplexity", "prune_permanently", "remove_heads", "run_head_study",
    "save_figure", "skip_layers", "sparsity_report", "train_router", "wanda_prune", "weight_sweep",
]
