"""TransformerLens ``HookedTransformer`` built offline from a Hugging Face model.

This is the one module of the project that touches TransformerLens classes directly, so that
moving to ``TransformerBridge`` later is a one-file change. The config is built from the HF
config and the weights are converted with TransformerLens's own converters, without any hub
call and without weight processing (no LayerNorm folding or centring), so hook activations and
directions match the raw HF weights.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.loading_from_pretrained import get_official_model_name
from transformer_lens.pretrained import weight_conversions as conversions

from pruning_bridge.bridge import architecture_of, model_dims
from pruning_bridge.common import UsageError
from pruning_bridge.models import ModelLoadError, load_model, resolve_dtype

def _rope(config) -> tuple[float, float]:
    """``(rope_theta, partial_rotary_factor)`` from a config (old and new transformers names)."""
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0
    fraction = (params.get("partial_rotary_factor") or getattr(config, "partial_rotary_factor",
                                                               None)
                or getattr(config, "rotary_pct", None) or 1.0)
    return float(theta), float(fraction)


def hooked_config(hf_config, n_ctx: int | None = None) -> HookedTransformerConfig:
    """The ``HookedTransformerConfig`` equivalent of an HF config of a family in the table."""
    arch = architecture_of(hf_config)
    if arch.tl_converter is None:
        raise UsageError(f"No TransformerLens conversion for {arch.family}.")
    dims = model_dims(hf_config)
    rotary = arch.pos_embed is None
    theta, fraction = _rope(hf_config)
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


def hooked_from_hf(model, tokenizer=None, n_ctx: int | None = None) -> HookedTransformer:
    """A ``HookedTransformer`` with exactly ``model``'s (unprocessed) weights; no hub access."""
    cfg = hooked_config(model.config, n_ctx)
    converter = getattr(conversions, architecture_of(model).tl_converter)
    state_dict = converter(model, cfg)
    hooked = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    hooked.load_and_process_state_dict(state_dict, fold_ln=False, center_writing_weights=False,
                                       center_unembed=False, fold_value_biases=False)
    return hooked.to(next(model.parameters()).device).eval()


def _official_name(spec: str) -> str | None:
    """TransformerLens's official name for ``spec`` (a hub id or alias), or None."""
    try:
        return get_official_model_name(spec)
    except (ValueError, KeyError):
        return None


def load_hooked(spec, dtype=None, device=None, n_ctx: int | None = None) -> HookedTransformer:
    """A ``HookedTransformer`` (unprocessed weights, so directions transfer to the HF weights).

    - an official TransformerLens name that is a hub id (``"gpt2-large"``, ``"Qwen/Qwen3-0.6B"``):
      ``HookedTransformer.from_pretrained_no_processing`` (needs the network; on failure a
      :class:`pruning_bridge.models.ModelLoadError` says to download elsewhere and pass a local
      directory);
    - anything else, with no hub call: a local checkpoint directory, ``"smollm2-135m"``,
      ``"tiny-*"`` (loaded with :func:`pruning_bridge.models.load_model`), or an in-memory HF
      model (its ``.tokenizer`` attribute, if any, is used; else no tokenizer) or a
      ``(model, tokenizer)`` pair, converted with :func:`hooked_from_hf`.
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
                hooked = HookedTransformer.from_pretrained_no_processing(
                    official, dtype=torch_dtype or torch.float32, device=device)
            except Exception as error:  # offline hubs raise OSError, ValueError, HTTP errors...
                raise ModelLoadError(
                    f"Could not load {name!r} from the Hugging Face hub with TransformerLens "
                    f"({error.__class__.__name__}: {str(error)[:200]}). Without a network, "
                    f"download it elsewhere (`hf download {official} --local-dir DIR`) and pass "
                    f"that local directory: load_hooked('DIR'); or use the embedded "
                    f"'smollm2-135m'.") from error
            return hooked.eval()
        model, tokenizer = load_model(name)  # fp32 on CPU; converted, then cast below
        hooked = hooked_from_hf(model, tokenizer, n_ctx=n_ctx)
    if torch_dtype is not None:
        hooked = hooked.to(torch_dtype)
    if device is not None:
        hooked = hooked.to(device)
    return hooked.eval()
