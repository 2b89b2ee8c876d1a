"""lens_safety: harmful directions in the residual stream, found with probes and edited away."""

from .caching import cache_residuals
from .directions import harmful_direction, load_direction, save_direction
from .editing import ablate, orthogonalize, orthogonalize_permanently
from .hooked import hooked_from_hf
from .probes import LayerProbes, binary_labels
from .prompts import Prompt, PromptSet

__all__ = [
    "LayerProbes", "Prompt", "PromptSet", "ablate", "binary_labels", "cache_residuals",
    "harmful_direction", "hooked_from_hf", "load_direction", "orthogonalize",
    "orthogonalize_permanently", "save_direction",
]
