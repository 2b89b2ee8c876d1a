"""lens_safety: harmful directions in the residual stream, found with probes and edited away.

Everything public is re-exported here, imported on first use (a module ``__getattr__``), so
that ``lens-safety --help`` starts without torch.
"""

from pruning_bridge.common.lazy import lazy_exports

_EXPORTS = {
    "caching": ("cache_residuals",),
    "directions": ("harmful_direction", "load_direction", "save_direction"),
    "edit": ("Edit",),
    "editing": ("ablate", "orthogonalize", "orthogonalize_permanently"),
    "evaluation": ("EditReport", "evaluate_edit"),
    "hooked": ("hooked_from_hf", "load_hooked"),
    "leace": ("LeaceEraser", "fit_leace"),
    "probes": ("LayerProbes", "binary_labels"),
    "prompts": ("Prompt", "PromptSet"),
    "protocol": ("ProtocolReport", "ProtocolSettings", "rtp_protocol", "run_protocol"),
    "rtp": ("RtpPrompt", "RtpSplit", "load_rtp", "split_rtp"),
    "selection": ("edit_for", "edit_grid", "edit_sweep", "select_edit"),
    "stats": ("Interval", "bootstrap_interval", "format_interval", "paired_difference",
              "relative_change"),
    "study": ("ProbeSettings", "ProbeStudy", "run_probe_study"),
    "sweep": ("alpha_sweep",),
    "toxicity": ("ScorerAgreement", "get_scorer", "profanity_scorer", "scorer_agreement"),
}

__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
