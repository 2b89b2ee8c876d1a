"""TransformerLens hook names on Hugging Face models (``HookBridge``), and the architecture
table that says where every hook point and weight lives in each supported family."""

from .adapters import adapter_for
from .architectures import (ARCHITECTURES, Architecture, ModelDims, UnsupportedArchitectureError,
                            architecture_of, blocks_of, head_counts, model_dims,
                            residual_writers)
from .hook_bridge import ActivationCache, HookBridge, UnknownHookError

__all__ = ["ARCHITECTURES", "ActivationCache", "Architecture", "HookBridge", "ModelDims",
           "UnknownHookError", "UnsupportedArchitectureError", "adapter_for", "architecture_of",
           "blocks_of", "head_counts", "model_dims", "residual_writers"]
