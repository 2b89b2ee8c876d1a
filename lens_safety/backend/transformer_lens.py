"""TransformerLens models built offline from Hugging Face models, on TransformerLens 3.9 and 4.x.

The one module of the project that touches TransformerLens, so the one that knows which line is
installed. Both lines give a model that speaks TransformerLens's API (``cfg``, ``run_with_cache``,
``hooks``, ``generate``) on exactly the HF model's raw weights, built without a hub call:

- **3.x**: a ``HookedTransformer`` built from the HF config and filled by TransformerLens's own
  weight converters, unprocessed (no LayerNorm folding, no centring), so directions found on it
  transfer to the HF weights;
- **4.x** (which removed ``HookedTransformer``): a ``TransformerBridge`` booted on a *copy* of the
  HF model (booting rewires the model's modules in place and switches it to eager attention)
  with ``enable_compatibility_mode(no_processing=True)``: TransformerLens's legacy hook names
  and shapes, and no ``process_weights`` at all (by default it folds LayerNorm and centres; even
  with every option off it rewrites the weights into the bridge's components and unties GPT-2's
  unembedding), so the bridge runs the HF modules on their raw weights: its logits equal the HF
  model's with eager attention, and directions found on it transfer to the HF weights.

TransformerBridge differs from HookedTransformer where it changes a result, and
``lens_safety.backend`` takes the exact path through the verbs below:

- ``blocks.L.hook_resid_mid`` is an alias of ``blocks.L.ln2.hook_in``: an edit there changes only
  the MLP's input, not the residual stream carried forward. :func:`edit_hooks` also adds what
  the edit changed to ``blocks.L.hook_resid_post``, which is HookedTransformer's semantics.
- Generation with its KV cache departs from uncached decoding (TransformerLens 4.3, measured:
  from the second new token on Llama-family models, within 20 tokens on GPT-2; also when HF's
  cache is fed back through ``past_key_values``); :func:`generate` decodes without the cache on
  a bridge (the same tokens as HF, but quadratic in length; HookedTransformer keeps its cache).
- Weights are the HF parameters under the bridge: :func:`residual_writers` lists those (a weight
  edit there is what the bridge runs).
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import os
import sys
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from pruning_bridge.bridge import architecture_of, model_dims
from pruning_bridge.bridge import residual_writers as hf_residual_writers
from pruning_bridge.bridge.tl_api import rope_settings
from pruning_bridge.common import UsageError
from pruning_bridge.models import ModelLoadError, load_model, resolve_dtype

EditFn = Callable[[Tensor], Tensor]


@functools.cache
def transformer_lens_4() -> bool:
    """True when the installed TransformerLens is 4.x (``TransformerBridge`` only)."""
    return importlib.util.find_spec("transformer_lens.HookedTransformer") is None


def is_transformer_bridge(model) -> bool:
    """True for a TransformerLens 4 ``TransformerBridge`` (never imports TransformerLens)."""
    bridge = sys.modules.get("transformer_lens.model_bridge")
    return bridge is not None and isinstance(model, bridge.TransformerBridge)


# ---------------------------------------------------------------- 3.x: HookedTransformer


def hooked_config(hf_config, n_ctx: int | None = None):
    """The ``HookedTransformerConfig`` equivalent of an HF config of a family in the table
    (TransformerLens 3.x)."""
    from transformer_lens import HookedTransformerConfig

    arch = architecture_of(hf_config)
    if arch.tl_converter is None:
        raise UsageError(f"No TransformerLens conversion for {arch.family}.")
    dims = model_dims(hf_config)
    rotary = arch.pos_embed is None
    theta, fraction = rope_settings(hf_config)
    eps = next(getattr(hf_config, name) for name in ("rms_norm_eps", "layer_norm_eps",
                                                     "layer_norm_epsilon")
               if getattr(hf_config, name, None) is not None)
    act_fn = getattr(hf_config, "hidden_act", None) or hf_config.activation_function
    return HookedTransformerConfig(
        d_model=dims.d_model, d_head=dims.d_head, n_heads=dims.n_heads,
        n_key_value_heads=dims.n_kv_heads if dims.n_kv_heads != dims.n_heads else None,
        d_mlp=dims.d_mlp, n_layers=dims.n_layers,
        n_ctx=n_ctx or min(dims.context or 2048, 8192), eps=eps, d_vocab=hf_config.vocab_size,
        act_fn=act_fn, normalization_type="RMS" if arch.norm == "rms" else "LN",
        final_rms=arch.norm == "rms", gated_mlp=arch.gated_mlp, use_qk_norm=arch.qk_norm,
        parallel_attn_mlp=arch.parallel(hf_config),
        positional_embedding_type="rotary" if rotary else "standard",
        **(dict(rotary_dim=int(dims.d_head * fraction), rotary_base=theta,
                rotary_adjacent_pairs=False) if rotary else {}),
        original_architecture=arch.tl_architecture, default_prepend_bos=False,
        dtype=torch.float32,
    )


def _hooked_transformer(model, tokenizer, n_ctx: int | None):
    from transformer_lens import HookedTransformer
    from transformer_lens.pretrained import weight_conversions as conversions

    cfg = hooked_config(model.config, n_ctx)
    converter = getattr(conversions, architecture_of(model).tl_converter)
    state_dict = converter(model, cfg)
    hooked = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    hooked.load_and_process_state_dict(state_dict, fold_ln=False, center_writing_weights=False,
                                       center_unembed=False, fold_value_biases=False)
    return hooked.to(next(model.parameters()).device)


# ---------------------------------------------------------------- 4.x: TransformerBridge


def _transformer_bridge(model, tokenizer):
    """A compatibility-mode TransformerBridge on ``model`` itself (booting rewires it)."""
    from transformer_lens.model_bridge import TransformerBridge

    name = getattr(model.config, "_name_or_path", None) or model.config.model_type
    device = next(model.parameters()).device
    bridge = TransformerBridge.boot_transformers(
        name, hf_model=model, tokenizer=tokenizer, device=device,
        dtype=next(model.parameters()).dtype)
    bridge.enable_compatibility_mode(no_processing=True, disable_warnings=True)
    return bridge


# ---------------------------------------------------------------- loading


def hooked_from_hf(model, tokenizer=None, n_ctx: int | None = None):
    """A TransformerLens model with exactly ``model``'s (unprocessed) weights; no hub access.

    3.x: a ``HookedTransformer`` (``n_ctx``: its context, default the model's up to 8192);
    4.x: a ``TransformerBridge`` booted on a deep copy, so ``model`` itself is left untouched
    (``n_ctx`` is then the HF model's own). The tokenizer is needed on 4.x: without one,
    TransformerLens would fetch the model's tokenizer from the hub.
    """
    if not transformer_lens_4():
        return _hooked_transformer(model, tokenizer, n_ctx).eval()
    if tokenizer is None:
        raise UsageError("TransformerLens 4 needs the tokenizer with the model (it would fetch "
                         "one from the hub): pass hooked_from_hf(model, tokenizer) or "
                         "load_hooked((model, tokenizer)).")
    return _transformer_bridge(copy.deepcopy(model), tokenizer).eval()


def _official_name(spec: str) -> str | None:
    """TransformerLens's official name for ``spec`` (a hub id or alias), or None."""
    if transformer_lens_4():
        from transformer_lens.supported_models import OFFICIAL_MODEL_NAMES
        from transformer_lens.tools.model_registry.registry_io import resolve_model_alias

        return resolve_model_alias(spec) or (spec if spec in OFFICIAL_MODEL_NAMES else None)
    from transformer_lens.loading_from_pretrained import get_official_model_name
    try:
        return get_official_model_name(spec)
    except (ValueError, KeyError):
        return None


def _from_hub(official: str, dtype: torch.dtype, device):
    """TransformerLens's own loader for a hub model, unprocessed (needs the network)."""
    if transformer_lens_4():
        from transformer_lens.model_bridge import TransformerBridge

        bridge = TransformerBridge.boot_transformers(official, dtype=dtype, device=device)
        bridge.enable_compatibility_mode(no_processing=True, disable_warnings=True)
        return bridge
    from transformer_lens import HookedTransformer
    return HookedTransformer.from_pretrained_no_processing(official, dtype=dtype, device=device)


def load_hooked(spec, dtype=None, device=None, n_ctx: int | None = None):
    """A TransformerLens model on unprocessed weights (directions transfer to the HF weights):
    a ``HookedTransformer`` on TransformerLens 3.x, a compatibility-mode ``TransformerBridge``
    on 4.x (see the module doc).

    - an official TransformerLens name that is a hub id (``"gpt2-large"``, ``"Qwen/Qwen3-0.6B"``):
      TransformerLens's own loader (needs the network; on failure a
      :class:`pruning_bridge.models.ModelLoadError` says to download elsewhere and pass a local
      directory);
    - anything else, with no hub call: a local checkpoint directory, ``"smollm2-135m"``,
      ``"tiny-*"`` (loaded with :func:`pruning_bridge.models.load_model`), or an in-memory HF
      model (its ``.tokenizer`` attribute, if any, is used) or a ``(model, tokenizer)`` pair,
      converted with :func:`hooked_from_hf` (the model passed in is not modified).
    """
    torch_dtype = resolve_dtype(dtype)
    if not isinstance(spec, (str, os.PathLike)):
        if isinstance(spec, tuple) and len(spec) == 2:
            model, tokenizer = spec
        else:
            model, tokenizer = spec, getattr(spec, "tokenizer", None)
        hooked = hooked_from_hf(model, tokenizer, n_ctx=n_ctx)
    else:
        name = os.fspath(spec)
        official = None if Path(name).expanduser().exists() else _official_name(name)
        if official is not None:
            try:
                hooked = _from_hub(official, torch_dtype or torch.float32, device)
            except Exception as error:  # offline hubs raise OSError, ValueError, HTTP errors...
                raise ModelLoadError(
                    f"Could not load {name!r} from the Hugging Face hub with TransformerLens "
                    f"({error.__class__.__name__}: {str(error)[:200]}). Without a network, "
                    f"download it elsewhere (`hf download {official} --local-dir DIR`) and pass "
                    f"that local directory: load_hooked('DIR'); or use the embedded "
                    f"'smollm2-135m'.") from error
            return hooked.eval()
        model, tokenizer = load_model(name)  # fp32 on CPU; ours alone, so booted in place
        hooked = (_transformer_bridge(model, tokenizer) if transformer_lens_4() else
                  _hooked_transformer(model, tokenizer, n_ctx))
    if torch_dtype is not None:
        hooked = hooked.to(torch_dtype)
    if device is not None:
        hooked = hooked.to(device)
    return hooked.eval()


# ---------------------------------------------------------------- the verbs the backend uses


def edit_hooks(model, edits: dict[str, EditFn]) -> list[tuple[str, Callable]]:
    """``fwd_hooks`` for ``model.hooks`` that replace the activation at each name by
    ``edits[name](x)``, with HookedTransformer's semantics on both lines: on a
    TransformerBridge an edit of ``blocks.L.hook_resid_mid`` (an alias of the MLP's input there)
    is also added to ``blocks.L.hook_resid_post``, so the residual stream carried forward is
    the edited one (before that layer's own ``hook_resid_post`` edit, if any)."""
    def replacing(f: EditFn) -> Callable:
        return lambda x, hook: f(x)

    if not is_transformer_bridge(model):
        return [(name, replacing(f)) for name, f in edits.items()]

    def recording(f: EditFn, change: dict) -> Callable:
        def mid(x: Tensor, hook) -> Tensor:
            out = f(x)
            change["delta"] = out - x
            return out
        return mid

    def adding(change: dict | None, f: EditFn | None) -> Callable:
        def post(x: Tensor, hook) -> Tensor:
            if change is not None:
                x = x + change.pop("delta")
            return x if f is None else f(x)
        return post

    hooks, changes = [], {}  # changes: resid_post name -> what its layer's resid_mid edit did
    for name, f in edits.items():
        if name.endswith(".hook_resid_mid"):
            change = changes[name.removesuffix("mid") + "post"] = {}
            hooks.append((name, recording(f, change)))
        elif not name.endswith(".hook_resid_post"):
            hooks.append((name, replacing(f)))
    posts = [n for n in edits if n.endswith(".hook_resid_post")]
    posts += [n for n in changes if n not in edits]
    return hooks + [(name, adding(changes.get(name), edits.get(name))) for name in posts]


def generate(model, ids: Tensor, max_new_tokens: int, do_sample: bool = False,
             **sampling) -> Tensor:
    """``ids`` ``[batch, pos]`` (unpadded) followed by exactly ``max_new_tokens`` new tokens
    (end-of-text not stopping); active hooks apply. A TransformerBridge decodes without its KV
    cache (see the module doc), a HookedTransformer with it."""
    return model.generate(ids, max_new_tokens=max_new_tokens, do_sample=do_sample,
                          stop_at_eos=False, verbose=False,
                          use_past_kv_cache=not is_transformer_bridge(model), **sampling)


def residual_writers(model) -> list[tuple[nn.Parameter, int]]:
    """Every parameter of a TransformerLens model that writes to the residual stream, with its
    d_model axis: HookedTransformer's W_E, W_pos (learned positions), W_O, b_O, W_out, b_out; a
    TransformerBridge's HF parameters (the architecture table's writers)."""
    if is_transformer_bridge(model):
        return hf_residual_writers(model.original_model)
    writers = [(model.embed.W_E, -1)]
    if model.cfg.positional_embedding_type == "standard":
        writers.append((model.pos_embed.W_pos, -1))
    for block in model.blocks:
        for module, names in ((block.attn, ("W_O", "b_O")),
                              (getattr(block, "mlp", None), ("W_out", "b_out"))):
            for name in names:
                if module is not None and getattr(module, name, None) is not None:
                    writers.append((getattr(module, name), -1))
    return writers


def hf_model_under(model) -> nn.Module | None:
    """The HF model a TransformerBridge runs (None for a HookedTransformer: it has its own)."""
    return model.original_model if is_transformer_bridge(model) else None
