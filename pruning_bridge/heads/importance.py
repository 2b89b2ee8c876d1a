"""Which attention heads matter: the learned router's mean gates (the report's Figure 3), and
the static baseline of Michel et al. (2019), the gradient of the loss with respect to a head mask.

Both return a ``[n_layers, n_heads]`` tensor, higher = more important, ready for
``heads_to_remove`` and ``head_importance_figure``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..bridge import HookBridge, model_dims
from ..common.errors import require_local_weights
from .routing import RoutedHeads
from .training import frozen, lm_loss


def mean_gate_importance(router: RoutedHeads, bridge: HookBridge, windows: Tensor,
                         batch_size: int = 4, progress: bool = True) -> Tensor:
    """Mean gate of each (layer, head) over every token of ``windows`` (shared heads are 1).

    Gates average 1 over the heads a token uses and 0 over the others, so a head's mean gate is
    how much the router relies on it; unrouted layers are reported as 1.
    """
    with router.record(), router.routing(bridge):
        for start in tqdm(range(0, len(windows), batch_size), desc="mean gates",
                          disable=not progress):
            bridge(windows[start:start + batch_size])
    return router.mean_gates()


def gradient_head_importance(model, tokenizer, windows: Tensor, batch_size: int = 4,
                             normalize: bool = True, progress: bool = True) -> Tensor:
    """Michel et al.: ``E_batch |dL/d xi_h|`` for a head mask ``xi`` (all ones) on ``hook_z``.

    ``normalize`` divides each layer's scores by their l2 norm, as the paper does before
    comparing heads across layers. The model is not changed.
    """
    require_local_weights(model, "Gradient head importance")
    bridge = model if isinstance(model, HookBridge) else HookBridge(model, tokenizer)
    dims = model_dims(bridge.config)
    n_layers, n_heads = dims.n_layers, dims.n_heads
    mask = torch.ones(n_layers, n_heads, device=bridge.device, requires_grad=True)
    hooks = [(f"blocks.{layer}.attn.hook_z",
              lambda z, name, layer=layer: z.float() * mask[layer][:, None])
             for layer in range(n_layers)]
    total = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    n_batches = 0
    with frozen(bridge.model), bridge.hooks(hooks):
        for start in tqdm(range(0, len(windows), batch_size), desc="head-mask gradients",
                          disable=not progress):
            batch = windows[start:start + batch_size]
            logits, _ = bridge.forward(batch, grad=True)
            grad, = torch.autograd.grad(lm_loss(logits, batch), mask)
            total += grad.abs().double().cpu()
            n_batches += 1
    scores = (total / max(n_batches, 1)).float()
    if normalize:
        scores = scores / scores.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return scores
