"""The bridge's ``ActivationCache``: a dict of activations by hook name that also answers
TransformerLens's keys (``cache["resid_post", 5]``, ``cache["z", 2, "attn"]``, ``cache["embed"]``)
and runs TransformerLens's own ``ActivationCache`` methods on its contents.

Those methods (``accumulated_resid``, ``decompose_resid``, ``stack_head_results``,
``apply_ln_to_stack``, ``logit_attrs``, ...) are TransformerLens's code, called on a
TransformerLens ``ActivationCache`` that shares this dict and sees the ``HookBridge`` as its
model (``cfg``, ``blocks[l].attn.W_O``, ``ln_final``, ``W_U``, ... from ``tl_api``). So they
give what TransformerLens gives, on the installed version (3.9 or 4.x), and TransformerLens is
imported only when one of them is called.
"""

from __future__ import annotations

import difflib
from typing import Any

import torch
from torch import Tensor

from ..common.errors import UnknownHookError, UsageError


def get_act_name(name: str, layer: int | None = None, layer_type: str | None = None) -> str:
    """TransformerLens's ``get_act_name`` (``"resid_post", 5`` -> ``blocks.5.hook_resid_post``)."""
    from transformer_lens.utilities import get_act_name as tl_get_act_name  # 3.9 and 4.x

    return tl_get_act_name(name, layer, layer_type)


class ActivationCache(dict):
    """Cached activations by hook name, plus the batch's ``attention_mask`` (1 = real token).

    ``model`` is the bridge that made it (for TransformerLens's methods and negative layers).
    """

    def __init__(self, values: dict[str, Tensor], attention_mask: Tensor, model: Any = None,
                 has_batch_dim: bool = True):
        super().__init__(values)
        self.attention_mask = attention_mask
        self.model = model
        self.has_batch_dim = has_batch_dim

    def __missing__(self, key) -> Tensor:
        full = key
        if isinstance(key, tuple):  # ("resid_post", 5[, "attn"]), negative layers from the end
            if len(key) > 1 and key[1] is not None and key[1] < 0:
                key = (key[0], self._n_layers() + key[1], *key[2:])
            full = get_act_name(*key)
        elif isinstance(key, str) and "." not in key and not key.startswith("hook_"):
            full = get_act_name(key)  # a shorthand ("embed", "scale", "ln_final")
        if full != key and dict.__contains__(self, full):
            return dict.__getitem__(self, full)
        close = difflib.get_close_matches(str(full), list(self), n=5, cutoff=0.5)
        raise UnknownHookError(f"{full!r} is not in this cache (cached: {len(self)} names"
                               + (f"; closest: {', '.join(close)}" if close else "") + ").")

    def _n_layers(self) -> int:
        if self.model is not None:
            return self.model.cfg.n_layers
        return 1 + max((int(k.split(".")[1]) for k in self if k.startswith("blocks.")),
                       default=-1)

    def to(self, device: str | torch.device) -> "ActivationCache":
        """Every activation (and the mask) moved to ``device``, in place."""
        for name, value in self.items():
            self[name] = value.to(device)
        self.attention_mask = self.attention_mask.to(device)
        return self

    @property
    def cache_dict(self) -> dict[str, Tensor]:
        """The activations by name (this cache itself), as TransformerLens's attribute."""
        return self

    def apply_slice_to_batch_dim(self, batch_slice) -> "ActivationCache":
        """A new cache of the rows ``batch_slice`` selects (TransformerLens's method)."""
        from transformer_lens.utilities import Slice

        batch_slice = batch_slice if isinstance(batch_slice, Slice) else Slice(batch_slice)
        sliced = self.transformer_lens().apply_slice_to_batch_dim(batch_slice)
        return ActivationCache(sliced.cache_dict, batch_slice.apply(self.attention_mask, dim=0),
                               self.model, sliced.has_batch_dim)

    def toggle_autodiff(self, mode: bool = False) -> None:
        """TransformerLens's ``toggle_autodiff``: torch's autograd on or off, globally."""
        self.transformer_lens().toggle_autodiff(mode)

    def remove_batch_dim(self) -> "ActivationCache":
        """Drop the batch dimension of a batch of one, in place (TransformerLens's method)."""
        tl = self.transformer_lens()
        tl.remove_batch_dim()
        if self.has_batch_dim and not tl.has_batch_dim:
            self.attention_mask = self.attention_mask[0]
        self.has_batch_dim = tl.has_batch_dim
        return self

    # ------------------------------------------------------- TransformerLens's methods
    def transformer_lens(self):
        """This cache as TransformerLens's ``ActivationCache`` (same dict, the bridge as model)."""
        from transformer_lens import ActivationCache as TLActivationCache

        if self.model is None:
            raise UsageError("This cache has no model; TransformerLens's methods need the bridge "
                             "that made it (bridge.run_with_cache gives one).")
        return TLActivationCache(self, self.model, has_batch_dim=self.has_batch_dim)

    def accumulated_resid(self, *args, **kwargs):
        """TransformerLens's ``accumulated_resid``: the residual stream before each layer."""
        return self.transformer_lens().accumulated_resid(*args, **kwargs)

    def decompose_resid(self, *args, **kwargs):
        """TransformerLens's ``decompose_resid``: embeddings and each attention / MLP output."""
        return self.transformer_lens().decompose_resid(*args, **kwargs)

    def stack_activation(self, *args, **kwargs) -> Tensor:
        """TransformerLens's ``stack_activation``: one activation of every layer, stacked."""
        return self.transformer_lens().stack_activation(*args, **kwargs)

    def compute_head_results(self) -> None:
        """TransformerLens's ``compute_head_results``: adds ``attn.hook_result`` from ``hook_z``."""
        self.transformer_lens().compute_head_results()

    def stack_head_results(self, *args, **kwargs):
        """TransformerLens's ``stack_head_results``: every head's output (from ``hook_z`` if
        ``attn.hook_result`` was not cached)."""
        return self.transformer_lens().stack_head_results(*args, **kwargs)

    def apply_ln_to_stack(self, *args, **kwargs) -> Tensor:
        """TransformerLens's ``apply_ln_to_stack``: a stack scaled by a layer's cached norm."""
        return self.transformer_lens().apply_ln_to_stack(*args, **kwargs)

    def logit_attrs(self, *args, **kwargs) -> Tensor:
        """TransformerLens's ``logit_attrs``: each component's contribution to token logits."""
        return self.transformer_lens().logit_attrs(*args, **kwargs)

    def get_full_resid_decomposition(self, *args, **kwargs):
        """TransformerLens's ``get_full_resid_decomposition``: heads, neurons, embeddings, bias."""
        return self.transformer_lens().get_full_resid_decomposition(*args, **kwargs)

    def get_neuron_results(self, *args, **kwargs) -> Tensor:
        """TransformerLens's ``get_neuron_results``: each neuron's output in a layer."""
        return self.transformer_lens().get_neuron_results(*args, **kwargs)

    def stack_neuron_results(self, *args, **kwargs):
        """TransformerLens's ``stack_neuron_results``: every neuron's output, stacked."""
        return self.transformer_lens().stack_neuron_results(*args, **kwargs)
