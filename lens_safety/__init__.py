"""lens_safety: harmful directions in the residual stream, found with probes and edited away."""

from .hooked import hooked_from_hf

__all__ = ["hooked_from_hf"]
