"""lens_safety: harmful directions in the residual stream, found with probes and edited away."""

from .caching import cache_residuals
from .directions import harmful_direction, load_direction, save_direction
from .edit import Edit
from .editing import ablate, orthogonalize, orthogonalize_permanently
from .evaluation import EditReport, evaluate_edit
from .hooked import hooked_from_hf, load_hooked
from .leace import LeaceEraser, fit_leace
from .probes import LayerProbes, binary_labels
from .prompts import Prompt, PromptSet
from .protocol import ProtocolReport, ProtocolSettings, rtp_protocol, run_protocol
from .rtp import RtpPrompt, RtpSplit, load_rtp, split_rtp
from .selection import edit_for, edit_grid, edit_sweep, select_edit
from .stats import (Interval, bootstrap_interval, format_interval, paired_difference,
                    relative_change)
from .study import ProbeSettings, ProbeStudy, run_probe_study
from .sweep import alpha_sweep
from .toxicity import ScorerAgreement, get_scorer, profanity_scorer, scorer_agreement

__all__ = [
    "Edit", "Interval", "LeaceEraser", "ProtocolReport", "ProtocolSettings", "RtpPrompt",
    "RtpSplit", "ScorerAgreement", "bootstrap_interval", "edit_for", "edit_grid", "edit_sweep",
    "fit_leace", "format_interval", "load_rtp", "paired_difference", "relative_change",
    "rtp_protocol", "run_protocol", "scorer_agreement", "select_edit", "split_rtp",
    "EditReport", "LayerProbes", "ProbeSettings", "ProbeStudy", "Prompt", "PromptSet", "ablate",
    "alpha_sweep", "binary_labels", "cache_residuals", "evaluate_edit", "get_scorer",
    "harmful_direction", "hooked_from_hf", "load_direction", "load_hooked", "orthogonalize",
    "orthogonalize_permanently", "profanity_scorer", "run_probe_study", "save_direction",
]
