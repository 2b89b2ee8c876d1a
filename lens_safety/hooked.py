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
from transformer_lens.pretrained import weight_conversions as conversions

from pruning_bridge.common.errors import UsageError

SUPPORTED = ("gpt2", "llama", "qwen2", "qwen3")


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0)


def hooked_config(hf_config, n_ctx: int | None = None) -> HookedTransformerConfig:
    """The ``HookedTransformerConfig`` equivalent of an HF GPT-2 / Llama / Qwen2 / Qwen3 config."""
    kind = hf_config.model_type
    if kind == "gpt2":
        return HookedTransformerConfig(
            d_model=hf_config.n_embd, d_head=hf_config.n_embd // hf_config.n_head,
            n_heads=hf_config.n_head, d_mlp=hf_config.n_inner or 4 * hf_config.n_embd,
            n_layers=hf_config.n_layer, n_ctx=n_ctx or hf_config.n_positions,
            eps=hf_config.layer_norm_epsilon, d_vocab=hf_config.vocab_size,
            act_fn=hf_config.activation_function, normalization_type="LN",
            positional_embedding_type="standard", original_architecture="GPT2LMHeadModel",
            default_prepend_bos=False, dtype=torch.float32,
        )
    if kind not in SUPPORTED:
        raise UsageError(f"No TransformerLens conversion for model_type {kind!r}; supported: "
                         f"{', '.join(SUPPORTED)}.")
    n_heads = hf_config.num_attention_heads
    d_head = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // n_heads
    n_kv = getattr(hf_config, "num_key_value_heads", None) or n_heads
    architecture = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                    "qwen3": "Qwen3ForCausalLM"}[kind]
    return HookedTransformerConfig(
        d_model=hf_config.hidden_size, d_head=d_head, n_heads=n_heads,
        n_key_value_heads=n_kv if n_kv != n_heads else None, d_mlp=hf_config.intermediate_size,
        n_layers=hf_config.num_hidden_layers,
        n_ctx=n_ctx or min(hf_config.max_position_embeddings, 8192), eps=hf_config.rms_norm_eps,
        d_vocab=hf_config.vocab_size, act_fn=hf_config.hidden_act, normalization_type="RMS",
        positional_embedding_type="rotary", rotary_dim=d_head, rotary_base=_rope_theta(hf_config),
        rotary_adjacent_pairs=False, final_rms=True, gated_mlp=True,
        use_qk_norm=kind == "qwen3", original_architecture=architecture,
        default_prepend_bos=False, dtype=torch.float32,
    )


_CONVERTERS = {
    "gpt2": conversions.convert_gpt2_weights,
    "llama": conversions.convert_llama_weights,
    "qwen2": conversions.convert_qwen2_weights,
    "qwen3": conversions.convert_qwen3_weights,
}


def hooked_from_hf(model, tokenizer=None, n_ctx: int | None = None) -> HookedTransformer:
    """A ``HookedTransformer`` with exactly ``model``'s (unprocessed) weights; no hub access."""
    cfg = hooked_config(model.config, n_ctx)
    state_dict = _CONVERTERS[model.config.model_type](model, cfg)
    hooked = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    hooked.load_and_process_state_dict(state_dict, fold_ln=False, center_writing_weights=False,
                                       center_unembed=False, fold_value_biases=False)
    return hooked.to(next(model.parameters()).device).eval()


def _official_name(spec: str) -> str | None:
    """TransformerLens's official name for ``spec`` (a hub id or alias), or None."""
    from transformer_lens.loading_from_pretrained import get_official_model_name

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
    from pruning_bridge.models import ModelLoadError, load_model, resolve_dtype

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
