"""TransformerLens hook names on Hugging Face models (``HookBridge``), and the architecture
table that says where every hook point and weight lives in each supported family."""

from .adapters import UnsupportedArchitectureError, adapter_for
from .hook_bridge import ActivationCache, HookBridge, UnknownHookError

__all__ = ["ActivationCache", "HookBridge", "UnknownHookError", "UnsupportedArchitectureError",
           "adapter_for"]
