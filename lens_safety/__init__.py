"""lens_safety: harmful directions in the residual stream, found with probes and edited away."""

from .hooked import hooked_from_hf
from .prompts import Prompt, PromptSet

__all__ = ["Prompt", "PromptSet", "hooked_from_hf"]
