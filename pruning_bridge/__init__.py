"""pruning_bridge: TransformerLens hook names on Hugging Face models, and model compression.

Subpackages: ``bridge`` (HookBridge and the architecture table), ``evals`` (data, MMLU, GSM8K,
perplexity), ``pruning`` (layers and weights), ``heads`` (routing, importance, removal),
``figures`` (the figures, saving them, the report) and ``common`` (errors, results log, the
plumbing below everything else). Modules: ``models`` (``load_model``), ``random_models`` (tiny
and true-size models with random weights), ``smollm2`` (the embedded model), ``preflight``,
``cli`` and ``cli_options``. Everything public is re-exported here, imported on
first use (a module ``__getattr__``), so that ``pruning-bridge --help`` starts without torch.
"""

from .common.lazy import lazy_exports

_EXPORTS = {
    "bridge": ("ARCHITECTURES", "ActivationCache", "HookBridge", "UnknownHookError",
               "UnsupportedArchitectureError", "architecture_of", "model_dims"),
    "common": ("ResultsLog", "UsageError"),
    "figures": ("save_figure", "write_report"),
    "evals": ("DataNotFoundError", "EvalResult", "EvalSettings", "GSM8KProblem", "MMLUQuestion",
              "evaluate", "gsm8k_accuracy", "load_gsm8k", "load_mmlu", "load_wikitext2",
              "mmlu_accuracy", "mmlu_subset", "perplexity"),
    "heads": ("HeadRouter", "HeadStudy", "RoutedHeads", "RouterTrainingError",
              "RouterTrainingLog", "gradient_head_importance", "head_counts", "head_sweep",
              "heads_to_remove", "load_balancing_loss", "load_head_pruned",
              "mean_gate_importance", "remove_heads", "run_head_study", "train_router"),
    "models": ("ModelLoadError", "load_model"),
    "pruning": ("SparsityReport", "block_influence", "drop_layers", "input_norms", "layer_sweep",
                "magnitude_prune", "nm_prune", "prune_permanently", "skip_layers",
                "sparsity_report", "wanda_prune", "weight_sweep"),
}

__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
