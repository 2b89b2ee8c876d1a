"""lens_safety: harmful directions in the residual stream, found with probes and edited away.

- ``backend``: HookBridge vs TransformerLens (``backend.transformer_lens``) in one place;
- ``data``: ToxiGen / CrowS-Pairs prompts, RealToxicityPrompts, neutral openings;
- ``probing``: residual caching, layer probes, directions, the probe study;
- ``edits``: ``Edit`` (the one activation-edit API), LEACE, the math run inside traces, the
  published detox edits (``peers``: AurA, Mean-AcT, Linear-AcT, ITI-c, CAA), several edits at
  once (``combined``);
- ``evaluation``: toxicity scorers, the RTP protocol, statistics, sweeping and selecting edits,
  comparing the published detox edits (``compare``);
- ``detox``: the end-to-end detoxification study; ``figures``; ``cli`` (``lens-safety``).

Everything public is re-exported here, imported on first use (a module ``__getattr__``), so
that ``lens-safety --help`` starts without torch.
"""

from pruning_bridge.common.lazy import lazy_exports

_EXPORTS = {
    "backend": ("block_hooks", "residual_hooks"),
    "backend.transformer_lens": ("hooked_from_hf", "load_hooked"),
    "data.prompts": ("Prompt", "PromptSet"),
    "data.openings": ("NEUTRAL_OPENINGS", "neutral_openings"),
    "data.rtp": ("RtpPrompt", "RtpSplit", "load_rtp", "split_rtp"),
    "detox": ("DetoxResult", "DetoxSettings", "run_detox_study"),
    "edits.combined": ("CombinedEdit",),
    "edits.edit": ("HOWS", "RESIDUAL", "Edit"),
    "edits.leace": ("LeaceEraser", "fit_leace"),
    "edits.peers": ("PeerEdit", "fit_peer", "peer_edits"),
    "evaluation.compare": ("CompareSettings", "ComparisonResult", "compare_edits",
                           "comparison_figure", "format_table"),
    "evaluation.held_out": ("held_out_identity", "held_out_values", "text_prefix"),
    "evaluation.protocol": ("ProtocolReport", "ProtocolSettings", "rtp_protocol",
                            "run_protocol"),
    "evaluation.selection": ("edit_for", "edit_grid", "edit_sweep", "select_edit",
                             "validation_sweep"),
    "evaluation.stats": ("Interval", "bootstrap_interval", "format_interval",
                         "paired_difference", "relative_change"),
    "evaluation.toxicity": ("ScorerAgreement", "get_scorer", "profanity_scorer",
                            "scorer_agreement"),
    "probing.caching": ("cache_residuals",),
    "probing.directions": ("harmful_direction", "load_direction", "save_direction"),
    "probing.probes": ("LayerProbes", "binary_labels", "harmful_probability"),
    "probing.study": ("ProbeSettings", "ProbeStudy", "run_probe_study"),
}

__all__, __getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
