"""lens_safety: harmful directions in the residual stream, found with probes and edited away.

Everything public is re-exported here, imported on first use (a module ``__getattr__``), so
that ``lens-safety --help`` starts without torch.
"""

from importlib import import_module

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
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_MODULE_OF[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
