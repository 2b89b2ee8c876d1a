"""lens_safety: harmful directions in the residual stream, found with probes and edited away."""

from .caching import cache_residuals
from .directions import harmful_direction, load_direction, save_direction
from .editing import ablate, orthogonalize, orthogonalize_permanently
from .evaluation import EditReport, evaluate_edit
from .hooked import hooked_from_hf, load_hooked
from .probes import LayerProbes, binary_labels
from .prompts import Prompt, PromptSet
from .study import ProbeSettings, ProbeStudy, run_probe_study
from .sweep import alpha_sweep
from .toxicity import get_scorer, profanity_scorer

__all__ = [
    "EditReport", "LayerProbes", "ProbeSettings", "ProbeStudy", "Prompt", "PromptSet", "ablate",
    "alpha_sweep", "binary_labels", "cache_residuals", "evaluate_edit", "get_scorer",
    "harmful_direction", "hooked_from_hf", "load_direction", "load_hooked", "orthogonalize",
    "orthogonalize_permanently", "profanity_scorer", "run_probe_study", "save_direction",
]
