"""TransformerLens's call surface on ``HookBridge``, so code written for ``HookedTransformer``
(``transformer_lens.patching``, ``ActivationCache`` methods, circuitsvis helpers, SAE tooling)
runs on a Hugging Face model unchanged:

- ``bridge.cfg``: the sizes under TransformerLens's config names (``n_layers``, ``d_model``,
  ``n_heads``, ``d_head``, ``n_key_value_heads``, ``d_mlp``, ``d_vocab``, ``n_ctx``, ``act_fn``,
  ``normalization_type``, ``positional_embedding_type``, ...) and the flags
  ``use_attn_result``, ``use_split_qkv_input``, ``use_attn_in``, ``use_hook_mlp_in`` (set with
  ``set_use_attn_result(True)``...: they add those hook points to ``hook_names``, so to every
  full cache; a trace that names one computes it whatever the flags say);
- ``run_with_hooks(input, fwd_hooks=[(name or filter, fn)], return_type=...)``; hooks are
  called ``fn(activation, hook)`` where ``hook`` is the name (a ``str``) with ``hook.name`` and
  ``hook.layer()``, so ``fn(act, name)`` hooks work too;
- ``to_tokens`` / ``to_string`` / ``to_str_tokens`` / ``to_single_token`` with TransformerLens's
  semantics (the bridge's own ``(ids, mask)`` tokenization is ``bridge.tokenize``);
- the weights as TransformerLens shapes them, views of the HF parameters: ``blocks[l].attn.W_Q``
  ``[head, d_model, d_head]`` (``W_K``/``W_V`` per key/value head), ``W_O`` ``[head, d_head,
  d_model]``, ``b_*``; ``blocks[l].mlp.W_in`` / ``W_gate`` / ``W_out``; ``W_E``, ``W_pos``,
  ``W_U``, ``b_U``; ``ln_final`` and ``blocks[l].ln1`` / ``ln2`` (the HF norm modules);
  ``accumulated_bias`` and ``tokens_to_residual_directions``: what TransformerLens's
  ``ActivationCache`` methods read from their model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from ..common.errors import UsageError
from .architectures import architecture_of, model_dims
from .extra_hooks import GATED, qkv_weight

FwdHooks = Sequence[tuple[str | Callable[[str], bool], Callable]]
RETURN_TYPES = ("logits", "loss", "both", None)


@dataclass
class BridgeConfig:
    """The model under TransformerLens's config field names (``bridge.cfg``)."""

    n_layers: int
    d_model: int
    n_heads: int
    d_head: int
    n_key_value_heads: int | None  # None without grouped-query attention, as TransformerLens
    d_mlp: int
    d_vocab: int
    d_vocab_out: int
    n_ctx: int
    act_fn: str
    eps: float
    normalization_type: str  # "RMS" or "LN"
    final_rms: bool
    positional_embedding_type: str  # "rotary" or "standard"
    rotary_dim: int | None
    rotary_base: float
    gated_mlp: bool
    parallel_attn_mlp: bool
    use_qk_norm: bool
    original_architecture: str | None
    model_name: str
    device: torch.device
    dtype: torch.dtype
    default_prepend_bos: bool  # whether the tokenizer itself starts text with BOS: the bridge
    # runs text as the tokenizer makes it
    attn_only: bool = False
    use_attn_result: bool = False
    use_split_qkv_input: bool = False
    use_attn_in: bool = False
    use_hook_mlp_in: bool = False


def rope_settings(config) -> tuple[float, float]:
    """``(rope_theta, partial_rotary_factor)`` from an HF config (old and new names)."""
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0
    fraction = (params.get("partial_rotary_factor") or getattr(config, "partial_rotary_factor",
                                                               None)
                or getattr(config, "rotary_pct", None) or 1.0)
    return float(theta), float(fraction)


def _prepends_bos(tokenizer) -> bool:
    if tokenizer is None or tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def tl_config(model, tokenizer=None) -> BridgeConfig:
    """``model``'s ``BridgeConfig`` (from its HF config and the architecture table)."""
    config, arch, dims = model.config, architecture_of(model), model_dims(model)
    first = next(model.parameters())
    theta, fraction = rope_settings(config)
    rotary = arch.pos_embed is None
    eps = next((getattr(config, name) for name in ("rms_norm_eps", "layer_norm_eps",
                                                   "layer_norm_epsilon")
                if getattr(config, name, None) is not None), 1e-5)
    return BridgeConfig(
        n_layers=dims.n_layers, d_model=dims.d_model, n_heads=dims.n_heads, d_head=dims.d_head,
        n_key_value_heads=dims.n_kv_heads if dims.n_kv_heads != dims.n_heads else None,
        d_mlp=dims.d_mlp, d_vocab=config.vocab_size, d_vocab_out=config.vocab_size,
        n_ctx=dims.context or 2048,
        act_fn=getattr(config, "hidden_act", None) or config.activation_function,
        eps=eps, normalization_type="RMS" if arch.norm == "rms" else "LN",
        final_rms=arch.norm == "rms",
        positional_embedding_type="rotary" if rotary else "standard",
        rotary_dim=int(dims.d_head * fraction) if rotary else None, rotary_base=theta,
        gated_mlp=arch.gated_mlp,
        parallel_attn_mlp=arch.parallel(config), use_qk_norm=arch.qk_norm,
        original_architecture=arch.tl_architecture,
        model_name=getattr(config, "_name_or_path", "") or arch.family,
        device=first.device, dtype=first.dtype, default_prepend_bos=_prepends_bos(tokenizer))


# ---------------------------------------------------------------- weights, TransformerLens-shaped


def _zeros_if_none(bias: Tensor | None, shape, like: Tensor) -> Tensor:
    return torch.zeros(shape, dtype=like.dtype, device=like.device) if bias is None else bias


class AttentionWeights:
    """One layer's attention weights as TransformerLens shapes them (views of the HF ones)."""

    def __init__(self, block, arch, d_head: int):
        self._block, self._arch, self._d_head = block, arch, d_head

    def _qkv(self, part: int) -> tuple[Tensor, Tensor]:
        arch = self._arch
        w, b = qkv_weight(self._block, arch.qkv, arch.qkv_layout, arch.weights_in_out, part,
                          self._d_head)
        return w.transpose(-1, -2), _zeros_if_none(b, w.shape[:2], w)

    W_Q = property(lambda self: self._qkv(0)[0], doc="[head, d_model, d_head]")
    W_K = property(lambda self: self._qkv(1)[0], doc="[kv head, d_model, d_head]")
    W_V = property(lambda self: self._qkv(2)[0], doc="[kv head, d_model, d_head]")
    b_Q = property(lambda self: self._qkv(0)[1], doc="[head, d_head]")
    b_K = property(lambda self: self._qkv(1)[1], doc="[kv head, d_head]")
    b_V = property(lambda self: self._qkv(2)[1], doc="[kv head, d_head]")

    @property
    def W_O(self) -> Tensor:
        """``[head, d_head, d_model]``."""
        proj = self._block.get_submodule(self._arch.attn_out)
        w = proj.weight if self._arch.weights_in_out else proj.weight.T  # [head * d_head, d_model]
        return w.reshape(-1, self._d_head, w.shape[-1])

    @property
    def b_O(self) -> Tensor:
        """``[d_model]``."""
        proj = self._block.get_submodule(self._arch.attn_out)
        w = self.W_O
        return _zeros_if_none(proj.bias, w.shape[-1], w)


class MLPWeights:
    """One layer's MLP weights as TransformerLens shapes them (``[d_model, d_mlp]`` in,
    ``[d_mlp, d_model]`` out; gated MLPs: ``W_gate`` is the activated projection)."""

    def __init__(self, block, arch):
        self._block, self._arch = block, arch

    def _in_out(self, path: str) -> tuple[Tensor, Tensor | None]:
        module = self._block.get_submodule(path)
        return (module.weight if self._arch.weights_in_out else module.weight.T), module.bias

    @property
    def W_in(self) -> Tensor:
        return self._in_out(self._arch.mlp_in_linear or self._arch.mlp_in)[0]

    @property
    def b_in(self) -> Tensor:
        w, b = self._in_out(self._arch.mlp_in_linear or self._arch.mlp_in)
        return _zeros_if_none(b, w.shape[-1], w)

    @property
    def W_gate(self) -> Tensor | None:
        return self._in_out(self._arch.mlp_in)[0] if self._arch.gated_mlp else None

    @property
    def W_out(self) -> Tensor:
        return self._in_out(self._arch.mlp_out)[0]

    @property
    def b_out(self) -> Tensor:
        w, b = self._in_out(self._arch.mlp_out)
        return _zeros_if_none(b, w.shape[-1], w)


class BlockWeights:
    """``bridge.blocks[l]``: ``attn``, ``mlp`` and the norm modules ``ln1`` / ``ln2``."""

    def __init__(self, block, arch, d_head: int):
        self.attn = AttentionWeights(block, arch, d_head)
        self.mlp = MLPWeights(block, arch)
        self.ln1 = block.get_submodule(arch.ln1)
        self.ln2 = block.get_submodule(arch.ln2)


# ---------------------------------------------------------------- the mixin


class TransformerLensAPI:
    """TransformerLens's verbs, config and weights on ``HookBridge`` (see the module doc).

    Needs from the bridge: ``model``, ``tokenizer``, ``adapter``, ``hook_names``, ``_order``,
    ``hooks``, ``forward`` and ``tokenize``.
    """

    @property
    def cfg(self) -> BridgeConfig:
        """TransformerLens's config fields for this model (the flags are the bridge's own)."""
        if getattr(self, "_cfg", None) is None:
            self._cfg = tl_config(self.model, self.tokenizer)
        self._cfg.device = self.device
        return self._cfg

    def _default_names(self) -> list[str]:
        """Every hook point whose TransformerLens flag (if any) is on, in execution order."""
        cfg = self.cfg
        flags = {name: GATED.get(name.split(".", 2)[-1]) for name in self._order}
        return [name for name, flag in flags.items() if flag is None or getattr(cfg, flag)]

    def _set_flag(self, flag: str, value: bool) -> None:
        setattr(self.cfg, flag, bool(value))
        self.hook_names = self._default_names()

    def set_use_attn_result(self, use_attn_result: bool) -> None:
        """Include ``attn.hook_result`` (per-head outputs) in ``hook_names``."""
        self._set_flag("use_attn_result", use_attn_result)

    def set_use_split_qkv_input(self, use_split_qkv_input: bool) -> None:
        """Include ``hook_q_input`` / ``hook_k_input`` / ``hook_v_input`` in ``hook_names``."""
        self._set_flag("use_split_qkv_input", use_split_qkv_input)

    def set_use_attn_in(self, use_attn_in: bool) -> None:
        """Include ``hook_attn_in`` in ``hook_names``."""
        self._set_flag("use_attn_in", use_attn_in)

    def set_use_hook_mlp_in(self, use_hook_mlp_in: bool) -> None:
        """Include ``hook_mlp_in`` in ``hook_names``."""
        self._set_flag("use_hook_mlp_in", use_hook_mlp_in)

    # ------------------------------------------------------------ hooks
    def expand_hooks(self, fwd_hooks: FwdHooks) -> list[tuple[str, Callable]]:
        """``(name or filter, fn)`` pairs as ``(name, fn)``: a filter ``fn(name) -> bool`` selects
        among ``hook_names``, as TransformerLens's among the hook points that run."""
        pairs = []
        for name, fn in fwd_hooks:
            if callable(name):
                pairs.extend((n, fn) for n in self.hook_names if name(n))
            else:
                pairs.append((name, fn))
        return pairs

    def run_with_hooks(self, input, fwd_hooks: FwdHooks = (), bwd_hooks: FwdHooks = (),
                       reset_hooks_end: bool = True, clear_contexts: bool = False,
                       return_type: str | None = "logits", **kwargs):
        """TransformerLens's ``run_with_hooks``: the output of ``return_type`` under the hooks
        (only for this call; ``reset_hooks_end=False`` is not supported)."""
        with self.hooks(fwd_hooks=fwd_hooks, bwd_hooks=bwd_hooks, reset_hooks_end=reset_hooks_end,
                        clear_contexts=clear_contexts):
            return self(input, return_type=return_type, **kwargs)

    def _output(self, logits: Tensor | None, ids: Tensor, attention_mask: Tensor,
                return_type: str | None, loss_per_token: bool = False):
        """``logits``, the next-token loss, both, or None (TransformerLens's ``return_type``)."""
        if return_type not in RETURN_TYPES:
            raise UsageError(f"return_type must be one of {RETURN_TYPES}, not {return_type!r}.")
        if return_type in ("logits", None):
            return logits if return_type else None
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        targets = torch.as_tensor(ids, device=logits.device)[:, 1:]
        nll = -log_probs[:, :-1].gather(-1, targets[..., None])[..., 0]
        real = (attention_mask[:, 1:] * attention_mask[:, :-1]).to(nll.device).bool()
        loss = nll * real if loss_per_token else nll[real].mean()
        return loss if return_type == "loss" else (logits, loss)

    # ------------------------------------------------------------ tokens
    def to_tokens(self, input: str | Sequence[str], prepend_bos: bool | None = None,
                  padding_side: str | None = None, move_to_device: bool = True,
                  truncate: bool = True) -> Tensor:
        """Token ids ``[batch, pos]`` (TransformerLens's ``to_tokens``): padded on the
        tokenizer's side unless ``padding_side``; ``prepend_bos`` True makes sure the first token
        is BOS, False that it is not, None follows ``cfg.default_prepend_bos`` (by default what
        the tokenizer itself does, as the bridge's own calls on text)."""
        tokenizer = self._need_tokenizer()
        adds_bos = _prepends_bos(tokenizer)
        prepend = self.cfg.default_prepend_bos if prepend_bos is None else prepend_bos
        texts = [input] if isinstance(input, str) else list(input)
        if prepend and not adds_bos:
            texts = [tokenizer.bos_token + text for text in texts]
        side = tokenizer.padding_side
        tokenizer.padding_side = padding_side or side
        try:
            ids = tokenizer(texts, return_tensors="pt", padding=True, truncation=truncate,
                            max_length=self.cfg.n_ctx if truncate else None,
                            add_special_tokens=prepend or not adds_bos)["input_ids"]
        finally:
            tokenizer.padding_side = side
        return ids.to(self.device) if move_to_device else ids

    def to_string(self, tokens) -> str | list[str]:
        """Text of token ids: ``[pos]`` or a list of ints -> one string, ``[batch, pos]`` ->
        one per row (TransformerLens's ``to_string``)."""
        tokenizer = self._need_tokenizer()
        tokens = torch.as_tensor(tokens)
        if tokens.ndim == 2:
            return [tokenizer.decode(row, clean_up_tokenization_spaces=False) for row in tokens]
        return tokenizer.decode(tokens, clean_up_tokenization_spaces=False)

    def to_str_tokens(self, input, prepend_bos: bool | None = None,
                      padding_side: str | None = None) -> list[str] | list[list[str]]:
        """Each token as text: of a string, of token ids ``[pos]``, or per row / per string."""
        tokenizer = self._need_tokenizer()
        if isinstance(input, (list, tuple)) and input and isinstance(input[0], str):
            return [self.to_str_tokens(text, prepend_bos, padding_side) for text in input]
        if isinstance(input, str):
            input = self.to_tokens(input, prepend_bos, padding_side, move_to_device=False)[0]
        ids = torch.as_tensor(input)
        if ids.ndim == 2:
            return [self.to_str_tokens(row) for row in ids]
        return tokenizer.batch_decode(ids.reshape(-1, 1), clean_up_tokenization_spaces=False)

    def to_single_token(self, string: str) -> int:
        """The id of ``string``, which must be one token."""
        ids = self.to_tokens(string, prepend_bos=False, move_to_device=False)[0]
        if ids.numel() != 1:
            raise UsageError(f"{string!r} is {ids.numel()} tokens, not one.")
        return int(ids.item())

    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise UsageError("Pass a tokenizer to HookBridge to work with text.")
        return self.tokenizer

    # ------------------------------------------------------------ weights
    @property
    def blocks(self) -> list[BlockWeights]:
        """Each layer's weights as TransformerLens shapes them (views of the HF parameters)."""
        from .architectures import blocks_of

        return [BlockWeights(block, self.adapter.arch, self.cfg.d_head)
                for block in blocks_of(self.model)]

    @property
    def ln_final(self) -> torch.nn.Module:
        """The final norm (the HF module: weight and bias applied)."""
        return self.model.get_submodule(self.adapter.arch.final_norm)

    @property
    def W_U(self) -> Tensor:
        """``[d_model, d_vocab]``."""
        return self.model.get_submodule(self.adapter.arch.unembed).weight.T

    @property
    def b_U(self) -> Tensor:
        """``[d_vocab]`` (zeros: no family in the table has an LM-head bias)."""
        head = self.model.get_submodule(self.adapter.arch.unembed)
        return _zeros_if_none(head.bias, head.weight.shape[0], head.weight)

    @property
    def W_E(self) -> Tensor:
        """``[d_vocab, d_model]``."""
        return self.model.get_submodule(self.adapter.arch.embed).weight

    @property
    def W_pos(self) -> Tensor:
        """``[n_ctx, d_model]``: learned absolute positions (families without them: an error)."""
        if self.adapter.arch.pos_embed is None:
            raise UsageError(f"{self.adapter.arch.family} has rotary positions, no W_pos.")
        return self.model.get_submodule(self.adapter.arch.pos_embed).weight

    def tokens_to_residual_directions(self, tokens) -> Tensor:
        """The unembedding direction of each token: ``[d_model]`` for one, ``[..., d_model]``."""
        if isinstance(tokens, Tensor) and tokens.numel() > 1:
            return self.W_U[:, tokens].movedim(0, -1)
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        elif isinstance(tokens, Tensor):
            tokens = int(tokens.item())
        return self.W_U[:, tokens]

    def accumulated_bias(self, layer: int, mlp_input: bool = False,
                         include_mlp_biases: bool = True) -> Tensor:
        """Sum of the attention (and MLP) output biases before ``layer`` (TransformerLens's)."""
        blocks = self.blocks
        total = torch.zeros(self.cfg.d_model, device=self.device)
        for block in blocks[:layer]:
            total = total + block.attn.b_O
            if include_mlp_biases:
                total = total + block.mlp.b_out
        if mlp_input:
            total = total + blocks[layer].attn.b_O
        return total
